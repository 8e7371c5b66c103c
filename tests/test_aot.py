"""`imagpose aot`: the real tiny stage-2 train step (the function `imagpose train` runs: config, partition rules,
`abstract_train_state`, `TrainStep.lower`) compiled for a Cloud TPU v5e 2x2 slice on this CPU-only machine, with the
per-chip report, and a program too large for the chip named with the bytes needed and available."""
import pytest

from train_fixtures import tiny_config

GIB = 2**30


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("libtpu", reason="the tpu-aot extra (libtpu) is part of the test extra")
    from imagpose_jax.train.aot import compile_train_step, topology_devices
    devices, chip = topology_devices("v5e:2x2")
    c = tiny_config(2)
    c.mesh.update(data=2, fsdp=2)
    c.data.batch_size = 4
    return compile_train_step(c, devices, chip), chip


def test_tiny_stage2_step_compiles_for_v5e(compiled):
    report, chip = compiled
    p = report["per_chip"]
    assert report["devices"] == 4 and report["mesh"] == {"data": 2, "fsdp": 2}
    assert chip.hbm_bytes == 16 * GIB and p["hbm_bytes"] == chip.hbm_bytes
    assert 0 < p["params_bytes"] < p["argument_bytes"] and p["batch_bytes"] > 0
    assert 0 < p["peak_bytes"] < chip.hbm_bytes and p["flops"] > 1e8
    print({k: v for k, v in report.items() if k != "per_chip"}, p)


def test_too_large_for_the_chip_is_named(compiled):
    from imagpose_jax.train.aot import DoesNotFit, check_fits
    report, _ = compiled
    small = {**report, "per_chip": {**report["per_chip"], "hbm_bytes": report["per_chip"]["peak_bytes"] // 2}}
    with pytest.raises(DoesNotFit, match=r"needs 0\.\d+ GiB per chip, the chip has 0\.\d+ GiB \(short by"):
        check_fits(small)
    check_fits(report)
