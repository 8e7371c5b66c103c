"""The launch scripts (launch/): they parse (`bash -n`), and with stub `srun`, `scontrol`, `gcloud` and
`imagpose` commands on PATH they run the intended commands, SLURM tasks getting the right JAX_* settings."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parent.parent / "launch"
SCRIPTS = ("tpu_pod.sh", "gpu_single.sh", "slurm_gpu.sbatch", "slurm_env.sh")
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")

# `imagpose` stand-in: prints its arguments (one per line) and the jax.distributed variables.
IMAGPOSE_STUB = """#!/usr/bin/env bash
for a in "$@"; do echo "ARG $a"; done
for v in JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID JAX_LOCAL_DEVICE_IDS XLA_PYTHON_CLIENT_MEM_FRACTION; do
  echo "ENV $v=${!v-unset}"
done
echo END
"""
# `scontrol show hostnames LIST` stand-in: logs its arguments, prints two host names.
SCONTROL_STUB = """#!/usr/bin/env bash
echo "$*" >> "$STUB_LOG"
[[ "$1 $2" == "show hostnames" ]] || exit 1
printf 'gpu-node-07\\ngpu-node-08\\n'
"""
# `srun` stand-in: logs its arguments, then runs the command after its options as two tasks (procid 0, 1).
SRUN_STUB = """#!/usr/bin/env bash
echo "srun $*" >> "$STUB_LOG"
while [[ "$1" == -* ]]; do shift; done
for i in 0 1; do SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_STEP_NODELIST='gpu-node-[07-08]' "$@" || exit $?; done
"""
# `gcloud` stand-in: logs each call's arguments, one per line, then a separator.
GCLOUD_STUB = """#!/usr/bin/env bash
for a in "$@"; do echo "$a"; done >> "$STUB_LOG"
echo "----" >> "$STUB_LOG"
"""

SLURM_ENV = {"SLURM_JOB_ID": "123456", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
             "SLURM_JOB_NODELIST": "gpu-node-[07-08]", "SLURM_SUBMIT_DIR": str(LAUNCH.parent)}


@pytest.fixture
def stubs(tmp_path):
    """A folder of stub commands; returns (env with it first on PATH, the log the stubs write)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in (("imagpose", IMAGPOSE_STUB), ("scontrol", SCONTROL_STUB), ("srun", SRUN_STUB),
                       ("gcloud", GCLOUD_STUB)):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    log = tmp_path / "stub.log"
    log.touch()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "JAX_", "TPU_", "IMAGPOSE", "XLA_PYTHON_CLIENT"))}
    env.update(PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", STUB_LOG=str(log))
    return env, log


def run(args, env, **kw):
    return subprocess.run([BASH, *map(str, args)], env=env, capture_output=True, text=True, timeout=60, **kw)


def stub_calls(stdout: str) -> list[tuple[list[str], dict[str, str]]]:
    """The imagpose stub's output -> [(arguments, JAX_* variables)] per call."""
    calls, args, env = [], [], {}
    for line in stdout.splitlines():
        if line.startswith("ARG "):
            args.append(line[4:])
        elif line.startswith("ENV "):
            k, _, v = line[4:].partition("=")
            env[k] = v
        elif line == "END":
            calls.append((args, env))
            args, env = [], {}
    return calls


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_parse(name):
    out = subprocess.run([BASH, "-n", str(LAUNCH / name)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


def test_slurm_env_derivation(stubs):
    env, log = stubs
    out = run([LAUNCH / "slurm_env.sh", "env"], dict(env, **SLURM_ENV))
    assert out.returncode == 0, out.stderr
    got = dict(line.split("=", 1) for line in out.stdout.splitlines() if line.startswith("JAX_"))
    port = 61440 + 123456 % 4096
    assert got == {"JAX_COORDINATOR_ADDRESS": f"gpu-node-07:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert log.read_text().split("\n")[0] == "show hostnames gpu-node-[07-08]"
    # a step's node list and task count win over the job's; an explicit port; one process per GPU
    out = run([LAUNCH / "slurm_env.sh", "env"],
              {**env, **SLURM_ENV, "SLURM_STEP_NODELIST": "gpu-node-[08]", "SLURM_STEP_NUM_TASKS": "1",
               "IMAGPOSE_COORDINATOR_PORT": "7777", "IMAGPOSE_ONE_PROCESS_PER_GPU": "1", "SLURM_LOCALID": "3"})
    assert out.returncode == 0, out.stderr
    assert "JAX_COORDINATOR_ADDRESS=gpu-node-07:7777" in out.stdout.splitlines()
    assert "JAX_NUM_PROCESSES=1" in out.stdout.splitlines()
    assert "JAX_LOCAL_DEVICE_IDS=3" in out.stdout.splitlines()
    assert log.read_text().splitlines()[-1] == "show hostnames gpu-node-[08]"
    # sourced: the function exports into the calling shell
    out = run(["-c", f"source {shlex.quote(str(LAUNCH / 'slurm_env.sh'))} && imagpose_slurm_env && "
                     "echo $JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES $JAX_PROCESS_ID"], dict(env, **SLURM_ENV))
    assert out.returncode == 0 and out.stdout.split() == [f"gpu-node-07:{port}", "2", "1"], out.stderr


@pytest.mark.parametrize("drop", ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_NODELIST"])
def test_slurm_env_outside_a_task(stubs, drop):
    env, _ = stubs
    slurm = {k: v for k, v in SLURM_ENV.items() if k != drop}
    out = run([LAUNCH / "slurm_env.sh", "env"], dict(env, **slurm))
    assert out.returncode == 1 and "JAX_COORDINATOR_ADDRESS" not in out.stdout
    assert (drop if drop != "SLURM_JOB_NODELIST" else "NODELIST") in out.stderr


def test_slurm_sbatch(stubs):
    env, log = stubs
    slurm = {k: v for k, v in SLURM_ENV.items() if k not in ("SLURM_PROCID", "SLURM_LOCALID")}  # the batch step
    out = run([LAUNCH / "slurm_gpu.sbatch", "configs/stage1.py", "/shared/runs/s1", "--config.steps=10"],
              dict(env, **slurm))
    assert out.returncode == 0, out.stderr
    srun = [line for line in log.read_text().splitlines() if line.startswith("srun ")]
    assert srun == [f"srun --kill-on-bad-exit=1 bash {LAUNCH}/slurm_env.sh imagpose train --config configs/stage1.py "
                    "--workdir /shared/runs/s1 --distributed on --config.steps=10"]
    calls = stub_calls(out.stdout)
    assert len(calls) == 2
    port = 61440 + 123456 % 4096
    for i, (args, jax_env) in enumerate(calls):
        assert args == ["train", "--config", "configs/stage1.py", "--workdir", "/shared/runs/s1", "--distributed", "on",
                        "--config.steps=10"]
        assert jax_env == {"JAX_COORDINATOR_ADDRESS": f"gpu-node-07:{port}", "JAX_NUM_PROCESSES": "2",
                           "JAX_PROCESS_ID": str(i), "JAX_LOCAL_DEVICE_IDS": "unset",
                           "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.92"}
    assert run([LAUNCH / "slurm_gpu.sbatch", "configs/stage1.py"], dict(env, **slurm)).returncode == 2


def test_gpu_single(stubs):
    env, _ = stubs
    out = run([LAUNCH / "gpu_single.sh", "configs/stage2.py", "runs/s2", "--config.steps=5", "--config.seed=3"],
              dict(env, XLA_PYTHON_CLIENT_MEM_FRACTION="0.5"))
    assert out.returncode == 0, out.stderr
    [(args, jax_env)] = stub_calls(out.stdout)
    assert args == ["train", "--config", "configs/stage2.py", "--workdir", "runs/s2", "--distributed", "off",
                    "--config.steps=5", "--config.seed=3"]
    assert jax_env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5" and jax_env["JAX_PROCESS_ID"] == "unset"
    out = run([LAUNCH / "gpu_single.sh"], env)
    assert out.returncode == 2 and "usage" in out.stderr


def _gcloud_calls(log: Path) -> list[list[str]]:
    return [c.strip("\n").split("\n") for c in log.read_text().split("----\n") if c.strip()]


def test_tpu_pod(stubs):
    env, log = stubs
    env = dict(env, TPU_NAME="pod", ZONE="us-central2-b", PROJECT="proj")
    out = run([LAUNCH / "tpu_pod.sh", "configs/stage1.py", "gs://b/runs/s1", "--config.data.index=gs://b/a b.json"],
              env)
    assert out.returncode == 0, out.stderr
    scp, install, train = _gcloud_calls(log)
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert install[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pod"] and "--worker=all" in install
    assert train[:9] == ["compute", "tpus", "tpu-vm", "ssh", "pod", "--zone", "us-central2-b", "--project", "proj"]
    assert train[9:11] == ["--worker=all", "--command"]
    assert "pip install" in install[-1] and "jax\\[tpu\\]\\>=0.7\\,\\<0.11" in install[-1]
    # the remote command line, run through a shell, gives back the arguments exactly
    remote = train[-1]
    assert remote.startswith("export PATH=$HOME/.local/bin:$PATH; cd imagpose-jax && imagpose train ")
    argv = shlex.split(remote.split(" && ", 1)[1])
    assert argv == ["imagpose", "train", "--config", "configs/stage1.py", "--workdir", "gs://b/runs/s1",
                    "--distributed", "on", "--config.data.index=gs://b/a b.json"]
    log.write_text("")
    out = run([LAUNCH / "tpu_pod.sh", "configs/stage1.py", "gs://b/runs/s1"], dict(env, SKIP_INSTALL="1"))
    assert out.returncode == 0 and len(_gcloud_calls(log)) == 1
    out = run([LAUNCH / "tpu_pod.sh", "configs/stage1.py", "runs/local"], env)
    assert out.returncode == 2 and "gs://" in out.stderr
    out = run([LAUNCH / "tpu_pod.sh", "configs/stage1.py", "gs://b/r"], {k: v for k, v in env.items() if k != "ZONE"})
    assert out.returncode != 0 and "ZONE" in out.stderr
