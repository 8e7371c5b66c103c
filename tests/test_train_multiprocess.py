"""Multi-process training: `sharding.distributed` (environment detection, `initialize_distributed`,
`host_batch_to_global`) and a real two-process run on localhost.

The two-process test starts two CPU processes (2 fake devices each, gloo collectives, coordinator on
127.0.0.1) that initialise through `initialize_distributed("auto")` from the JAX_* variables, build the
tiny stage-1 train state sharded over a global mesh data 2 x fsdp 2, read their own shares of a synthetic
dataset (`make_train_iterator` with shard_index/shard_count = process index/count), make them global with
`host_batch_to_global` and take two train steps. A third process with 4 fake devices runs the same global
batches (host 0's rows then host 1's) on one process. All three must report the same losses.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from imagpose_jax.sharding import distributed as dist
from imagpose_jax.sharding import host_batch_to_global, make_mesh
from cpu_env import cpu_env

WORKER = textwrap.dedent("""
    import json, sys, time
    t0 = time.monotonic()
    import jax, numpy as np
    from imagpose_jax.sharding import host_batch_to_global, initialize_distributed, make_mesh

    started = initialize_distributed("auto")   # before any device is touched
    from jax.experimental import multihost_utils
    from imagpose_jax.data.index import read_imagpose_json
    from imagpose_jax.data.pipeline import make_train_iterator
    from train_fixtures import build, tiny_config

    index_json, hosts, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    assert jax.device_count() == 4, jax.devices()
    persons = read_imagpose_json(index_json)
    c = tiny_config(1)

    def host_batches(shard):  # what host `shard` of `hosts` reads
        it = make_train_iterator(persons, 64, 64, batch_size=2, seed=0, shard_index=shard, shard_count=hosts)
        return [next(it) for _ in range(steps)]

    if jax.process_count() > 1:
        assert started and jax.process_count() == hosts and jax.local_device_count() == 2
        local = host_batches(jax.process_index())
    else:   # one process standing for all hosts: the union of their batches, host 0's rows first
        shares = [host_batches(h) for h in range(hosts)]
        local = [{k: np.concatenate([s[i][k] for s in shares]) for k in shares[0][i]} for i in range(steps)]
    mesh = make_mesh(data=2, fsdp=2)
    owner = host_batch_to_global({"p": np.full((4 // jax.process_count(),), jax.process_index())}, mesh)["p"]
    owner = np.asarray(multihost_utils.process_allgather(owner, tiled=True)).tolist()
    t1 = time.monotonic()
    graphdef, state, shardings, step = build(c, mesh, drawn=False)   # the sharded init across hosts itself
    t2 = time.monotonic()
    losses = []
    for batch in local:
        batch = host_batch_to_global(batch, mesh)
        assert batch["grid"].shape[0] == 4
        assert batch["grid"].is_fully_addressable == (jax.process_count() == 1)
        state, metrics = step(state, batch)
        losses.append(float(np.asarray(metrics["loss"].addressable_data(0))))
    print("RESULT " + json.dumps({"process": jax.process_index(), "count": jax.process_count(),
                                  "row_owner": owner, "losses": losses, "seconds": {"start_and_data": round(t1 - t0),
                                  "init": round(t2 - t1), "steps": round(time.monotonic() - t2)}}), flush=True)
""")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict[str, str]:
    env = {k: v for k, v in cpu_env(devices).items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                                                                           "JAX_PROCESS_ID", "SLURM_", "OMPI_", "TPU_",
                                                                           "MEGASCALE_"))}
    return {**env, **extra}


def _result(out: str) -> dict:
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, out[-4000:]
    return json.loads(lines[0][len("RESULT "):])


@pytest.mark.slow  # 2.5-3.5 min on 2 loaded CPU cores: three processes each compile the init and the step
def test_two_processes_match_one_process(tmp_path):
    from imagpose_jax.data.synthetic import make_synthetic_dataset
    files = make_synthetic_dataset(tmp_path, num_persons=3, poses_per_person=3, height=64, width=64, seed=0,
                                   test_fraction=0.0)
    args = [sys.executable, "-c", WORKER, files["train"].index_json, "2", "2"]
    address = f"127.0.0.1:{_free_port()}"
    envs = [_env(2, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)) for i in range(2)]
    envs.append(_env(4))  # the one-process reference, run alongside
    procs, logs, killed = [], [], set()
    start = time.monotonic()
    try:
        for env in envs:
            log = tmp_path / f"worker{len(procs)}.log"
            logs.append(log)
            with open(log, "w") as f:  # files, not pipes: nothing blocks on a full pipe
                procs.append(subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        # Until all are done, one fails (its partner would wait for it until jax's timeouts) or 15 min pass.
        while any(p.poll() is None for p in procs) and time.monotonic() - start < 900:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.5)
    finally:
        for i, p in enumerate(procs):  # on a timeout or any failure, leave nothing running
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                killed.add(i)
    outs = [log.read_text() for log in logs]
    for i in sorted(range(len(procs)), key=lambda i: i in killed):  # the failed ones first, then the killed
        assert procs[i].returncode == 0, (f"worker {i} {'killed' if i in killed else 'exited with'} "
                                          f"{procs[i].returncode}:\n{outs[i][-4000:]}")
    r0, r1, ref = (_result(out) for out in outs)
    print(f"wall {time.monotonic() - start:.0f}s; losses: process 0 {r0['losses']}, process 1 {r1['losses']}, "
          f"one process {ref['losses']}; "
          f"seconds: {[r['seconds'] for r in (r0, r1, ref)]}")
    assert (r0["process"], r0["count"], r1["process"], r1["count"], ref["count"]) == (0, 2, 1, 2, 1)
    assert r0["row_owner"] == r1["row_owner"] == [0, 0, 1, 1]   # host 0's rows first, as the reference has them
    assert r0["losses"] == r1["losses"]
    np.testing.assert_allclose(r0["losses"], ref["losses"], rtol=1e-5)
    assert r0["losses"][0] != r0["losses"][1]


# --- environment detection and the helpers (no second process) ---

def test_detect_nothing_on_a_plain_machine():
    assert dist.detect_multiprocess({}, on_tpu_vm=False) is None
    assert dist.explicit_settings({}) is None


def test_explicit_variables():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert dist.explicit_settings(env) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                           "process_id": 3}
    assert dist.detect_multiprocess(env, on_tpu_vm=False) == "JAX_NUM_PROCESSES=4"
    assert dist.detect_multiprocess(dict(env, JAX_NUM_PROCESSES="1", JAX_PROCESS_ID="0"), on_tpu_vm=False) is None


@pytest.mark.parametrize("env, message", [
    ({"JAX_NUM_PROCESSES": "2"}, "JAX_NUM_PROCESSES set but not JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "but not JAX_PROCESS_ID"),
    ({"JAX_COORDINATOR_ADDRESS": "h", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "is not host:port"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "is not an integer"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, r"not in \[0, "),
])
def test_explicit_variables_errors(env, message):
    with pytest.raises(dist.DistributedConfigError, match=message):
        dist.explicit_settings(env)
    with pytest.raises(dist.DistributedConfigError, match=message):
        dist.detect_multiprocess(env, on_tpu_vm=False)


def test_detect_slurm():
    step = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_STEP_NODELIST": "n[1-2]"}
    assert dist.detect_multiprocess(dict(step, SLURM_NTASKS="2"), on_tpu_vm=False) == "SLURM with 2 tasks"
    assert dist.detect_multiprocess(dict(step, SLURM_NTASKS="8", SLURM_STEP_NUM_TASKS="4"),
                                    on_tpu_vm=False) == "SLURM with 4 tasks"
    assert dist.detect_multiprocess(dict(step, SLURM_NTASKS="1"), on_tpu_vm=False) is None
    # `srun -n1 ...` inside a larger allocation: one process
    assert dist.detect_multiprocess(dict(step, SLURM_NTASKS="8", SLURM_STEP_NUM_TASKS="1"), on_tpu_vm=False) is None
    # the batch script itself (not an srun step) of a multi-task job: say so rather than hang
    with pytest.raises(dist.DistributedConfigError, match="not an srun step"):
        dist.detect_multiprocess({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, on_tpu_vm=False)


def test_detect_tpu_and_mpi():
    assert dist.detect_multiprocess({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}, on_tpu_vm=True) == \
        "TPU_WORKER_HOSTNAMES lists 4 TPU hosts"
    assert dist.detect_multiprocess({"TPU_PROCESS_ADDRESSES": "a:1,b:1", "TPU_WORKER_HOSTNAMES": "a"},
                                    on_tpu_vm=True) == "TPU_PROCESS_ADDRESSES lists 2 TPU hosts"
    assert dist.detect_multiprocess({"TPU_WORKER_HOSTNAMES": "localhost"}, on_tpu_vm=True) is None
    assert dist.detect_multiprocess({"MEGASCALE_NUM_SLICES": "2"}, on_tpu_vm=True) == "2 TPU slices"
    assert dist.detect_multiprocess({"OMPI_COMM_WORLD_SIZE": "4"}, on_tpu_vm=False) == "Open MPI with 4 processes"


def test_detect_gce_tpu_pod_from_metadata(monkeypatch):
    monkeypatch.setattr(dist, "_gce_tpu_process_count", lambda: 4)
    assert dist.detect_multiprocess({}, on_tpu_vm=True) == "Cloud TPU pod with 4 hosts"
    monkeypatch.setattr(dist, "_gce_tpu_process_count", lambda: 1)
    assert dist.detect_multiprocess({}, on_tpu_vm=True) is None

    def broken():
        raise ConnectionError("metadata server unreachable")
    monkeypatch.setattr(dist, "_gce_tpu_process_count", broken)
    with pytest.raises(RuntimeError, match="--distributed on"):
        dist.detect_multiprocess({}, on_tpu_vm=True)


def test_initialize_distributed_modes(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(dist, "_running_on_cloud_tpu_vm", lambda: False)
    for var in dist.EXPLICIT_VARS + ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE",
                                     "MEGASCALE_NUM_SLICES") + dist.TPU_HOST_LIST_VARS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="must be one of"):
        dist.initialize_distributed("yes")
    assert dist.initialize_distributed("off") is False and dist.initialize_distributed("auto") is False
    assert calls == []
    monkeypatch.setattr(jax, "process_index", lambda: 0)  # the log line after a (faked) start
    assert dist.initialize_distributed("on") is True      # jax's own cluster detection
    assert calls == [{"initialization_timeout": 300}]
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert dist.initialize_distributed("auto") is True
    assert calls[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1,
                         "cluster_detection_method": "deactivate", "initialization_timeout": 300}
    monkeypatch.delenv("JAX_PROCESS_ID")
    with pytest.raises(dist.DistributedConfigError, match="but not JAX_PROCESS_ID"):
        dist.initialize_distributed("on")


def test_host_batch_to_global_single_process():
    mesh = make_mesh(devices=jax.devices()[:1])
    batch = {"x": np.arange(12, dtype=np.float32).reshape(4, 3), "k": np.array([True, False, True, True])}
    out = host_batch_to_global(batch, mesh)
    assert out["x"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(out["x"]), batch["x"])
    np.testing.assert_array_equal(np.asarray(out["k"]), batch["k"])
    with pytest.raises(ValueError, match="leading batch axis"):
        host_batch_to_global({"s": np.float32(1.0)}, mesh)
