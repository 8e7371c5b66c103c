"""`imagpose aot`: the real tiny stage-2 train step (the function `imagpose train` runs: config, partition rules,
`abstract_train_state`, `TrainStep.lower`) and the tiny sampler (`Sampler.lower`) compiled for a Cloud TPU v5e 2x2
slice on this CPU-only machine, each with splash attention in the program and the per-chip report, and a program
too large for the chip named with the bytes needed and available.

Compiled as the SD1.5 configs run on TPU, float32 matmuls at TPU's default precision (`step.matmul_precision`
"default"; this suite's conftest makes "highest" the default for the CPU tests, which on TPU is six bf16 passes per
matmul), and with XLA's execution-time optimisation effort at its lowest (-1): both halve the compile time (the
tiny step: 273 -> 141 -> 70 s here; the sampler 31 s); `imagpose aot` itself keeps XLA's default effort.
"""
import jax
import pytest

from train_fixtures import tiny_config

GIB = 2**30


@pytest.fixture(scope="module", autouse=True)
def quick_compiles():
    before = jax.config.jax_exec_time_optimization_effort
    jax.config.update("jax_exec_time_optimization_effort", -1.0)
    with jax.default_matmul_precision("default"):
        yield
    jax.config.update("jax_exec_time_optimization_effort", before)


@pytest.fixture(scope="module")
def v5e():
    pytest.importorskip("libtpu", reason="the tpu-aot extra (libtpu) is part of the test extra")
    from imagpose_jax.train.aot import topology_devices
    c = tiny_config(2)
    c.mesh.update(data=2, fsdp=2)
    c.data.batch_size = 4
    c.step.matmul_precision = "default"
    return c, *topology_devices("v5e:2x2")


@pytest.fixture(scope="module")
def compiled(v5e):
    from imagpose_jax.train.aot import compile_train_step
    c, devices, chip = v5e
    hlo = []
    report = compile_train_step(c, devices, chip, on_compiled=lambda p: hlo.append(p.as_text()))
    report["hlo"] = hlo[0]
    return report, chip


def test_tiny_stage2_step_compiles_for_v5e(compiled):
    report, chip = compiled
    p = report["per_chip"]
    assert report["devices"] == 4 and report["mesh"] == {"data": 2, "fsdp": 2}
    assert chip.hbm_bytes == 16 * GIB and p["hbm_bytes"] == chip.hbm_bytes
    assert 0 < p["params_bytes"] < p["argument_bytes"] and p["batch_bytes"] > 0
    assert 0 < p["peak_bytes"] < chip.hbm_bytes and p["flops"] > 1e8
    # splash attention (a Mosaic kernel) forward and backward, in the program for the TPU, not interpreted
    assert report["tpu_custom_calls"] >= 3, report["tpu_custom_calls"]
    print({k: v for k, v in report.items() if k not in ("per_chip", "hlo")}, p)


def test_activations_stay_split_over_the_batch(compiled):
    """Global batch 4 (grids 128x128) on 4 chips: no chip holds tensors of the global batch at grid size, only its own grid (the
    VAE encodes the targets and the masked grid together: 2 per chip). Before the frozen encoders were replicated
    and the UNet's blocks pinned to the batch split, XLA followed the FSDP-sharded kernels' channel split into the
    VAE's activations and held tensors of 4 and 8 grids on every chip (temporaries 100 MB against 76 MB)."""
    import re
    report, _ = compiled
    lead = {int(m.group(1)) for m in re.finditer(r"\[(\d+),128,128,\d+\]", report["hlo"])}
    assert {1, 2} <= lead and not lead & {4, 8}, sorted(lead)


def test_tiny_sampler_compiles_for_v5e(v5e):
    from imagpose_jax.train.aot import compile_sampler, format_report
    c, devices, chip = v5e
    report = compile_sampler(c, devices, chip, steps=2)
    p = report["per_chip"]
    assert report["batch_size"] == 4 and report["mesh"] == {"data": 4, "fsdp": 1}
    assert report["tpu_custom_calls"] >= 1 and 0 < p["peak_bytes"] < chip.hbm_bytes and p["flops"] > 1e8
    assert p["argument_bytes"] >= p["weights_bytes"] > 0   # the weights replicated on every chip
    assert "sampler: 4 chips, batch 4 grids of 64x64 views, 2 steps" in format_report(report)


def test_too_large_for_the_chip_is_named(compiled):
    from imagpose_jax.train.aot import DoesNotFit, check_fits
    report, _ = compiled
    small = {**report, "per_chip": {**report["per_chip"], "hbm_bytes": report["per_chip"]["peak_bytes"] // 2}}
    with pytest.raises(DoesNotFit, match=r"needs 0\.\d+ GiB per chip, the chip has 0\.\d+ GiB \(short by"):
        check_fits(small)
    check_fits(report)
