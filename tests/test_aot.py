"""`imagpose aot`: the real tiny stage-2 train step (the function `imagpose train` runs: config, partition rules,
`abstract_train_state`, `TrainStep.lower`) and the tiny sampler (`Sampler.lower`) compiled for a Cloud TPU v5e 2x2
slice on this CPU-only machine, each with splash attention in the program and the per-chip report, and a program
too large for the chip named with the bytes needed and available; the memory plan without code emission
(`--plan_only`) read from XLA's buffer assignment and checked against the compiled program's.

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
def compiled(v5e, tmp_path_factory):
    """The compiled tiny step's report, its HLO and XLA's buffer assignment of it (dumped while compiling)."""
    from imagpose_jax.train.aot import compile_train_step
    c, devices, chip = v5e
    hlo, dump = [], tmp_path_factory.mktemp("xla_dump")
    report = compile_train_step(c, devices, chip, on_compiled=lambda p: hlo.append(p.as_text()),
                                compiler_options={"xla_dump_to": str(dump), "xla_dump_hlo_as_text": True})
    report["hlo"] = hlo[0]
    [ba] = dump.glob("*jit__step*after_optimizations-buffer-assignment.txt")
    report["buffer_assignment"] = ba.read_text()
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
    print({k: v for k, v in report.items() if k not in ("per_chip", "hlo", "buffer_assignment")}, p)


def test_activations_stay_split_over_the_batch(compiled):
    """Global batch 4 (grids 128x128) on 4 chips: no chip holds tensors of the global batch at grid size, only its own grid (the
    VAE encodes the targets and the masked grid together: 2 per chip). Before the frozen encoders were replicated
    and the UNet's blocks pinned to the batch split, XLA followed the FSDP-sharded kernels' channel split into the
    VAE's activations and held tensors of 4 and 8 grids on every chip (temporaries 100 MB against 76 MB)."""
    import re
    report, _ = compiled
    lead = {int(m.group(1)) for m in re.finditer(r"\[(\d+),128,128,\d+\]", report["hlo"])}
    assert {1, 2} <= lead and not lead & {4, 8}, sorted(lead)


def test_buffer_assignment_is_the_compiled_programs_memory_plan(compiled):
    """XLA's buffer assignment, read without the compiled program: its parameters are exactly the compiled
    program's arguments; its heap is the temporaries before the TPU back end's own scratch (here 66.3 MB of the
    final 78.8 MB), and the planned total bounds the program's peak from above."""
    from imagpose_jax.train.aot import buffer_assignment_bytes
    report, _ = compiled
    p, plan = report["per_chip"], buffer_assignment_bytes(report["buffer_assignment"])
    print(plan, {k: p[k] for k in ("argument_bytes", "temp_bytes", "peak_bytes")})
    assert plan["argument_bytes"] == p["argument_bytes"]
    assert 0.7 * p["temp_bytes"] < plan["temp_bytes"] <= p["temp_bytes"]
    assert p["peak_bytes"] <= plan["planned_bytes"] < p["argument_bytes"] + p["temp_bytes"]
    with pytest.raises(ValueError, match="no allocations"):
        buffer_assignment_bytes("HloModule x\n")


def test_plan_only_reads_the_plan_and_stops_the_compile(v5e, compiled, monkeypatch):
    """`plan_train_step` (`imagpose aot --plan_only`): the same program compiled in a child process, stopped once
    the buffer assignment is written; its figures are that plan's, its kernels the optimised HLO's."""
    from imagpose_jax.train.aot import buffer_assignment_bytes, plan_train_step
    c, _, _ = v5e
    report, _ = compiled
    monkeypatch.setenv("JAX_EXEC_TIME_OPTIMIZATION_EFFORT", "-1")   # the child compiles as this module's fixture
    monkeypatch.setenv("JAX_DEFAULT_MATMUL_PRECISION", "default")
    plan = plan_train_step(c, "v5e:2x2", poll_s=0.5)
    assert plan["plan_only"] and plan["per_chip"]["flops_estimated"]
    # the estimate (dense attention, lowered for the CPU at one example per chip) against the compiled TPU program
    assert 0.8 * report["per_chip"]["flops"] < plan["per_chip"]["flops"] < 1.2 * report["per_chip"]["flops"]
    assert plan["per_chip"]["plan"] == buffer_assignment_bytes(report["buffer_assignment"])
    assert plan["per_chip"]["peak_bytes"] == plan["per_chip"]["plan"]["planned_bytes"]
    assert plan["tpu_custom_calls"] == report["tpu_custom_calls"] >= 3
    for k in ("params_bytes", "frozen_encoders_bytes", "optimizer_bytes", "batch_bytes", "argument_bytes"):
        assert plan["per_chip"][k] == report["per_chip"][k], k


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


def test_mesh_leftover_devices_go_to_fsdp_or_data(v5e):
    """The SD1.5 stage configs shard over every chip (`mesh.data=1, mesh.fsdp=-1`); -1 takes what is left."""
    from imagpose_jax.sharding import make_mesh
    _, devices, _ = v5e
    assert dict(make_mesh(data=1, fsdp=-1, devices=devices).shape) == {"data": 1, "fsdp": 4}
    assert dict(make_mesh(data=2, fsdp=-1, devices=devices).shape) == {"data": 2, "fsdp": 2}
    assert dict(make_mesh(data=-1, fsdp=2, devices=devices).shape) == {"data": 2, "fsdp": 2}
    with pytest.raises(ValueError, match="cannot both be -1"):
        make_mesh(data=-1, fsdp=-1, devices=devices)
    with pytest.raises(ValueError, match="4 devices do not divide into data=3"):
        make_mesh(data=3, fsdp=-1, devices=devices)


def test_plan_only_is_for_the_train_step():
    from imagpose_jax.train.aot import main
    with pytest.raises(SystemExit, match="--plan_only plans the train step: add --program train"):
        main(["--config", "configs/stage2.py:tiny", "--topology", "v5e:2x2", "--plan_only"])
