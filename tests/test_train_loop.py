"""The training loop end to end (`imagpose train` on the tiny stage-2 config, as `test_train_step` builds it): a run killed with SIGKILL
mid-training (an asynchronous checkpoint save possibly in flight) and resumed gives exactly the losses and the
final parameters of an uninterrupted run. Subprocesses share a persistent compilation cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY, KILL_AT = 14, 4, 10


# The killed run: the loop's own `train`, with an `on_step` callback that sends the process a signal after step
# KILL_AT: SIGKILL (no cleanup, like a lost host; an asynchronous save may be in flight) or SIGTERM (a preemption:
# the loop checkpoints that step and stops; handled as `imagpose train` handles it).
KILLED = """
import os, signal, sys
from imagpose_jax.train.config import load_config
from imagpose_jax.train.loop import Interrupted, train
config, workdir, kill_at, sig, *overrides = sys.argv[1:]
def kill(step):
    if step == int(kill_at):
        os.kill(os.getpid(), getattr(signal, sig))
try:
    train(load_config(config, overrides), workdir, progress=False, on_step=kill)
except Interrupted as err:
    print(err, file=sys.stderr)
    sys.exit(128 + err.signum)
"""
COMMON = (f"steps={STEPS}", f"train.checkpoint_every={EVERY}", "ema=True", "optim.learning_rate=1e-3")


def run_train(workdir: str, env: dict, *extra: str, kill_at: int = 0, sig: str = "SIGKILL") -> subprocess.CompletedProcess:
    config = os.path.join(ROOT, "configs/stage2.py:tiny")
    if kill_at:
        cmd = [sys.executable, "-c", KILLED, config, workdir, str(kill_at), sig, *COMMON, *extra]
    else:
        cmd = [sys.executable, "-m", "imagpose_jax.train", "--config", config, "--workdir", workdir, "--no-progress",
               *(f"--config.{o}" for o in COMMON + extra)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)


def losses(workdir: str) -> dict[int, float]:
    """The last logged loss of each step (a resumed run logs the steps after its checkpoint again)."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out[r["step"]] = r["loss"]
    return out


def exported(workdir: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    return {f"{sub}/{k}": v for sub in ("denoiser", "denoiser_ema")
            for k, v in load_file(os.path.join(workdir, "export", sub, "params.safetensors")).items()}


@pytest.fixture(scope="module")
def env():
    return dict(os.environ, JAX_PLATFORMS="cpu")  # conftest's compilation cache is inherited


@pytest.fixture(scope="module")
def straight(tmp_path_factory, env):
    """The uninterrupted run (with sample grids: sampling leaves training alone) -> (workdir, summary)."""
    work = str(tmp_path_factory.mktemp("straight"))
    a = run_train(work, env, f"train.sample_every={STEPS // 2}")
    assert a.returncode == 0, a.stderr[-3000:]
    return work, json.loads(a.stdout[a.stdout.index("{"):])


def test_kill_and_resume_is_bit_exact(tmp_path, env, straight):
    (straight, straight_summary), killed = straight, str(tmp_path / "killed")
    for step in (STEPS // 2, STEPS):
        assert os.path.isfile(os.path.join(straight, "samples", f"step_{step}.png"))
    assert straight_summary["sample_traces"] == 1, "the sample grids' sampler was traced again"
    b = run_train(killed, env, kill_at=KILL_AT)
    assert b.returncode == -9, f"expected SIGKILL, got {b.returncode}: {b.stderr[-2000:]}"
    assert not os.path.isdir(os.path.join(killed, "export"))
    c = run_train(killed, env)
    assert c.returncode == 0, c.stderr[-3000:]
    summary = json.loads(c.stdout[c.stdout.index("{"):])
    assert 0 < summary["start_step"] <= KILL_AT and summary["start_step"] % EVERY == 0, summary
    la, lc = losses(straight), losses(killed)
    assert sorted(la) == sorted(lc) == list(range(1, STEPS + 1))
    print("resumed from", summary["start_step"], "losses", [round(la[s], 5) for s in sorted(la)])
    assert [la[s] for s in sorted(la)] == [lc[s] for s in sorted(lc)]  # bit-exact floats
    pa, pc = exported(straight), exported(killed)
    assert pa.keys() == pc.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pc[k], err_msg=k)


def test_sigterm_checkpoints_the_step_reached_and_resumes_from_it(tmp_path, env, straight):
    """SIGTERM after step 6 (checkpoints every 4): the loop finishes that step, saves step 6 and exits 143 with one
    line; the rerun's first step is 7 and its losses are those of the uninterrupted run."""
    straight, stopped = straight[0], str(tmp_path / "stopped")
    r = run_train(stopped, env, kill_at=6, sig="SIGTERM")
    assert r.returncode == 143, r.stderr[-2000:]
    assert "stopped by SIGTERM after step 6" in r.stderr.strip().splitlines()[-1]
    assert not os.path.isdir(os.path.join(stopped, "export"))
    c = run_train(stopped, env)
    assert c.returncode == 0, c.stderr[-3000:]
    assert json.loads(c.stdout[c.stdout.index("{"):])["start_step"] == 6
    la, lc = losses(straight), losses(stopped)
    assert [la[s] for s in sorted(la)] == [lc[s] for s in sorted(lc)]


def test_nonfinite_loss_stops_without_saving_nonfinite_weights(tmp_path, env):
    """learning rate 1e6: the loss goes non-finite; those updates are skipped, the run stops after max_nonfinite in a
    row with one line naming the step and the last good checkpoint, exit 1, no export; every checkpoint is finite and
    metrics.jsonl is strict JSON. (Before: NaN checkpoints rotated out the good ones, a NaN export, exit 0.)"""
    work = str(tmp_path / "nan")
    r = run_train(work, env, "optim.learning_rate=1e6", "steps=40", "train.checkpoint_every=2")
    assert r.returncode == 1, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
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
