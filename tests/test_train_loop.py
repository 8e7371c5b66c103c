"""The training loop end to end on the tiny stage-2 config: a run killed with SIGKILL mid-training (a subprocess; an
asynchronous checkpoint save possibly in flight) or stopped by SIGTERM, then resumed, gives exactly the losses and
the final parameters of an uninterrupted run; a run whose loss goes non-finite stops without saving non-finite
weights. The runs other than the killed one go through `imagpose train`'s own `main` (or the loop's `train` with an
`on_step` hook) in this process, sharing its compiled train step; the SIGTERM and non-finite runs start from a copy
of the uninterrupted run's step-3 checkpoint (no initialisation); all share the session's persistent compilation
cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cpu_env import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY, KILL_AT, TERM_AT = 8, 3, 7, 5


# The killed run: the loop's own `train` in a subprocess, with an `on_step` callback that SIGKILLs it after step
# KILL_AT (no cleanup, like a lost host; an asynchronous save may be in flight).
KILLED = """
import os, signal, sys
from imagpose_jax.train.config import load_config
from imagpose_jax.train.loop import train
config, workdir, kill_at, sig, *overrides = sys.argv[1:]
def kill(step):
    if step == int(kill_at):
        os.kill(os.getpid(), getattr(signal, sig))
train(load_config(config, overrides), workdir, progress=False, on_step=kill)
"""
COMMON = (f"steps={STEPS}", f"train.checkpoint_every={EVERY}", "ema=True", "optim.learning_rate=1e-3")


def config_path() -> str:
    return os.path.join(ROOT, "configs/stage2.py:tiny")


def kill_train(workdir: str, env: dict, kill_at: int) -> subprocess.CompletedProcess:
    """The run SIGKILLed after step `kill_at`, in a subprocess."""
    cmd = [sys.executable, "-c", KILLED, config_path(), workdir, str(kill_at), "SIGKILL", *COMMON]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)


def run_main(workdir: str, capsys, *extra: str) -> tuple[int, dict | None, str]:
    """`imagpose train` (its `main`) in this process -> (exit code, the printed summary or None, stderr)."""
    from imagpose_jax.train.main import main
    capsys.readouterr()
    rc = main(["--config", config_path(), "--workdir", workdir, "--no-progress", *(f"--config.{o}" for o in COMMON + extra)])
    out = capsys.readouterr()
    return rc, json.loads(out.out[out.out.index("{"):]) if rc == 0 else None, out.err


def losses(workdir: str) -> dict[int, float]:
    """The last logged loss of each step (a resumed run logs the steps after its checkpoint again)."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out[r["step"]] = r["loss"]
    return out


def start_from_checkpoint(straight: str, workdir: str, step: int) -> None:
    """`workdir` holding only the uninterrupted run's checkpoint of `step`: a run there resumes from it."""
    import shutil
    shutil.copytree(os.path.join(straight, "checkpoints", str(step)), os.path.join(workdir, "checkpoints", str(step)))


def exported(workdir: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    return {f"{sub}/{k}": v for sub in ("denoiser", "denoiser_ema")
            for k, v in load_file(os.path.join(workdir, "export", sub, "params.safetensors")).items()}


@pytest.fixture(scope="module")
def env():
    return cpu_env()  # conftest's compilation cache and XLA flags are inherited


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run (with sample grids: sampling leaves training alone) -> (workdir, summary)."""
    import contextlib
    import io
    from imagpose_jax.train.main import main
    work, out, err = str(tmp_path_factory.mktemp("straight")), io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):   # capsys is per test, this per module
        rc = main(["--config", config_path(), "--workdir", work, "--no-progress",
                   *(f"--config.{o}" for o in COMMON + (f"train.sample_every={STEPS // 2}",))])
    assert rc == 0, err.getvalue()[-3000:]
    text = out.getvalue()
    return work, json.loads(text[text.index("{"):])


def test_kill_and_resume_is_bit_exact(tmp_path, env, straight, capsys):
    (straight, straight_summary), killed = straight, str(tmp_path / "killed")
    for step in (STEPS // 2, STEPS):
        assert os.path.isfile(os.path.join(straight, "samples", f"step_{step}.png"))
    assert straight_summary["sample_traces"] == 1, "the sample grids' sampler was traced again"
    b = kill_train(killed, env, KILL_AT)
    assert b.returncode == -9, f"expected SIGKILL, got {b.returncode}: {b.stderr[-2000:]}"
    assert not os.path.isdir(os.path.join(killed, "export"))
    rc, summary, err = run_main(killed, capsys)
    assert rc == 0, err[-3000:]
    assert 0 < summary["start_step"] <= KILL_AT and summary["start_step"] % EVERY == 0, summary
    la, lc = losses(straight), losses(killed)
    assert sorted(la) == sorted(lc) == list(range(1, STEPS + 1))
    print("resumed from", summary["start_step"], "losses", [round(la[s], 5) for s in sorted(la)])
    assert [la[s] for s in sorted(la)] == [lc[s] for s in sorted(lc)]  # bit-exact floats
    pa, pc = exported(straight), exported(killed)
    assert pa.keys() == pc.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pc[k], err_msg=k)


def test_sigterm_checkpoints_the_step_reached_and_resumes_from_it(tmp_path, straight, capsys, monkeypatch):
    """From the uninterrupted run's step-3 checkpoint, SIGTERM after step 5 (checkpoints every 3): the loop finishes
    that step, saves step 5 and stops with one line (`imagpose train` exits 128 + 15 with it); the rerun's first step
    is 6; both runs restore straight into the abstract state (no random initialisation), and the losses and final
    parameters are those of the uninterrupted run."""
    import signal
    from imagpose_jax.train import loop
    from imagpose_jax.train.config import load_config
    from imagpose_jax.train.loop import Interrupted, train
    straight, stopped = straight[0], str(tmp_path / "stopped")
    start_from_checkpoint(straight, stopped, EVERY)
    monkeypatch.setattr(loop, "jit_state", lambda *a: pytest.fail("a resumed run initialised the state"))

    def term(step):
        if step == TERM_AT:
            os.kill(os.getpid(), signal.SIGTERM)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as info:
        train(load_config(config_path(), COMMON), stopped, progress=False, on_step=term)
    assert info.value.signum == signal.SIGTERM and f"stopped by SIGTERM after step {TERM_AT}" in str(info.value)
    assert signal.getsignal(signal.SIGTERM) == before   # the loop's handler is gone again
    assert not os.path.isdir(os.path.join(stopped, "export"))
    rc, summary, err = run_main(stopped, capsys)
    assert rc == 0, err[-3000:]
    assert summary["start_step"] == TERM_AT
    la, lc = losses(straight), losses(stopped)
    assert sorted(lc) == list(range(EVERY + 1, STEPS + 1))
    assert [la[s] for s in sorted(lc)] == [lc[s] for s in sorted(lc)]
    pa, pc = exported(straight), exported(stopped)
    for k in pa:
        np.testing.assert_array_equal(pa[k], pc[k], err_msg=k)


def test_nonfinite_loss_stops_without_saving_nonfinite_weights(tmp_path, straight, capsys):
    """Resumed from the uninterrupted run's step-3 checkpoint at learning rate 1e6: the loss goes non-finite; those
    updates are skipped, the run stops after max_nonfinite in a row with one line naming the step and the last good
    checkpoint, exit 1, no export; every checkpoint is finite and metrics.jsonl is strict JSON. (Before: NaN
    checkpoints rotated out the good ones, a NaN export, exit 0.)"""
    work = str(tmp_path / "nan")
    start_from_checkpoint(straight[0], work, EVERY)
    rc, _, err = run_main(work, capsys, "optim.learning_rate=1e6", "steps=40", "train.checkpoint_every=2")
    assert rc == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert "not finite for 5 steps in a row" in last and "last good checkpoint: step" in last, last
    assert not os.path.isdir(os.path.join(work, "export"))

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"metrics.jsonl holds {c}"))
    with open(os.path.join(work, "metrics.jsonl")) as f:
        records = [strict(line) for line in f]
    assert any(r["loss"] is None for r in records)
    from imagpose_jax.checkpoint.train_state import restore_params
    from imagpose_jax.models.imagpose import IMAGPose
    from imagpose_jax.models.init import abstract
    from imagpose_jax.train import config as tc
    from flax import nnx
    from train_fixtures import tiny_config
    like = nnx.state(abstract(lambda k: IMAGPose(tc.model_config(tiny_config(2)), rngs=k)), nnx.Param)
    params = restore_params(os.path.join(work, "checkpoints"), like)
    assert all(np.isfinite(np.asarray(v.get_value())).all() for _, v in nnx.to_flat_state(params))
