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


# The killed run: the loop's own `train`, with an `on_step` callback that kills the process with no cleanup (like
# a lost host) after step KILL_AT's checkpoint save was started.
KILLED = """
import os, signal, sys
from imagpose_jax.train.config import load_config
from imagpose_jax.train.loop import train
config, workdir, kill_at, *overrides = sys.argv[1:]
def kill(step):
    if step == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)
train(load_config(config, overrides), workdir, progress=False, on_step=kill)
"""
COMMON = (f"steps={STEPS}", f"train.checkpoint_every={EVERY}", "ema=True", "optim.learning_rate=1e-3")


def run_train(workdir: str, env: dict, *extra: str, kill_at: int = 0) -> subprocess.CompletedProcess:
    config = os.path.join(ROOT, "configs/stage2.py:tiny")
    if kill_at:
        cmd = [sys.executable, "-c", KILLED, config, workdir, str(kill_at), *COMMON, *extra]
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


def test_kill_and_resume_is_bit_exact(tmp_path, env):
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    a = run_train(straight, env, f"train.sample_every={STEPS // 2}")  # sampling leaves training alone
    assert a.returncode == 0, a.stderr[-3000:]
    straight_summary = json.loads(a.stdout[a.stdout.index("{"):])
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
