"""Multi-process (multi-host) start-up and the host-to-global batch conversion.

`initialize_distributed(mode)` runs before anything touches a device (`imagpose train --distributed ...`):

  "off"   single process; nothing is done.
  "on"    `jax.distributed.initialize()`. With `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and
          `JAX_PROCESS_ID` set (all three, or none), those are used and jax's cluster auto-detection
          is switched off (so that, e.g., inside SLURM jax does not also restrict each process to the
          one GPU `SLURM_LOCALID` names); without them jax detects the cluster itself (Cloud TPU pods,
          SLURM `srun` steps, Open MPI, Kubernetes).
  "auto"  "on" iff a multi-process environment is detected (`detect_multiprocess`), else "off".

`host_batch_to_global(batch, mesh)` turns each process's own batch (numpy, leading axis = the
per-process batch) into global `jax.Array`s split over the mesh's ('data', 'fsdp') axes.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from imagpose_jax.sharding.mesh import batch_sharding

MODES = ("auto", "on", "off")
EXPLICIT_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# Variables set on Cloud TPU VMs of a multi-host slice (GKE/JobSet) or of several slices (multislice),
# as read by jax's `jax._src.clusters.cloud_tpu_cluster`.
TPU_HOST_LIST_VARS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")

log = logging.getLogger(__name__)


class DistributedConfigError(ValueError):
    """The environment describes a multi-process run inconsistently; the message says how."""


def _int_var(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or not value.strip():
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedConfigError(f"{name}={value!r} is not an integer") from None


def explicit_settings(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """(coordinator_address, num_processes, process_id) from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID, or None when none is set. Setting only some of them is an error."""
    env = os.environ if env is None else env
    present = [v for v in EXPLICIT_VARS if env.get(v, "").strip()]
    if not present:
        return None
    missing = [v for v in EXPLICIT_VARS if v not in present]
    if missing:
        raise DistributedConfigError(
            f"{', '.join(present)} set but not {', '.join(missing)}: a multi-process run needs all of "
            f"{', '.join(EXPLICIT_VARS)} (or none, to let jax detect the cluster)")
    address = env["JAX_COORDINATOR_ADDRESS"].strip()
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DistributedConfigError(f"JAX_COORDINATOR_ADDRESS={address!r} is not host:port")
    num, pid = _int_var(env, "JAX_NUM_PROCESSES"), _int_var(env, "JAX_PROCESS_ID")
    if num < 1:
        raise DistributedConfigError(f"JAX_NUM_PROCESSES={num} must be >= 1")
    if not 0 <= pid < num:
        raise DistributedConfigError(f"JAX_PROCESS_ID={pid} is not in [0, JAX_NUM_PROCESSES={num})")
    return {"coordinator_address": address, "num_processes": num, "process_id": pid}


def _running_on_cloud_tpu_vm() -> bool:
    try:  # set by jax at import (cloud_tpu_init) when libtpu and TPU chips are present
        from jax._src import cloud_tpu_init
        return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))
    except ImportError:
        return False


def _gce_tpu_process_count() -> int | None:
    """Workers of this GCE TPU slice (times slices) from the VM's metadata server, as jax reads them;
    None when this is not a GCE TPU VM."""
    from jax._src.clusters import cloud_tpu_cluster
    cluster = cloud_tpu_cluster.GceTpuCluster
    if not cluster.is_env_present():
        return None
    return cluster.get_process_count()


def detect_multiprocess(env: Mapping[str, str] | None = None, *, on_tpu_vm: bool | None = None) -> str | None:
    """Why this process looks like one of several (a short reason), or None for a single-process run.

    Checked in order: the explicit JAX_* variables (JAX_NUM_PROCESSES > 1); a SLURM step with more than
    one task (`SLURM_STEP_NUM_TASKS`, else `SLURM_NTASKS`, > 1 with `SLURM_PROCID` set); Open MPI
    (`OMPI_COMM_WORLD_SIZE` > 1); a multi-host or multislice Cloud TPU (`MEGASCALE_NUM_SLICES` > 1,
    `TPU_PROCESS_ADDRESSES`/`TPU_WORKER_HOSTNAMES` listing several hosts, or, on a GCE TPU VM, the
    metadata server's worker list, read through jax's own cluster detection).
    """
    env = os.environ if env is None else env
    explicit = explicit_settings(env)
    if explicit is not None:
        return f"JAX_NUM_PROCESSES={explicit['num_processes']}" if explicit["num_processes"] > 1 else None
    tasks = _int_var(env, "SLURM_STEP_NUM_TASKS") or _int_var(env, "SLURM_NTASKS")
    if tasks and tasks > 1 and "SLURM_PROCID" in env:
        if "SLURM_STEP_NODELIST" not in env and "SLURM_STEP_ID" not in env:
            raise DistributedConfigError(
                f"SLURM_NTASKS={tasks} but this is not an srun step (no SLURM_STEP_NODELIST): start one process "
                "per task with srun (launch/slurm_gpu.sbatch), or pass --distributed off")
        return f"SLURM with {tasks} tasks"
    ompi = _int_var(env, "OMPI_COMM_WORLD_SIZE")
    if ompi and ompi > 1:
        return f"Open MPI with {ompi} processes"
    slices = _int_var(env, "MEGASCALE_NUM_SLICES")
    if slices and slices > 1:
        return f"{slices} TPU slices"
    for var in TPU_HOST_LIST_VARS:
        hosts = [h for h in env.get(var, "").split(",") if h.strip()]
        if len(hosts) > 1:
            return f"{var} lists {len(hosts)} TPU hosts"
        if hosts:
            break  # jax reads the first one that is set
    if on_tpu_vm is None:
        on_tpu_vm = _running_on_cloud_tpu_vm()
    if on_tpu_vm and not any(env.get(v) for v in TPU_HOST_LIST_VARS):
        try:
            count = _gce_tpu_process_count()
        except Exception as err:  # noqa: BLE001 - private jax API or the metadata server
            raise RuntimeError(
                "on a Cloud TPU VM, but could not read the TPU worker list to decide whether this is a "
                f"multi-host pod ({type(err).__name__}: {err}); pass --distributed on (pod) or off (one host)"
            ) from err
        if count is not None and count > 1:
            return f"Cloud TPU pod with {count} hosts"
    return None


def initialize_distributed(mode: str = "auto", *, initialization_timeout: int = 300) -> bool:
    """Start jax's distributed runtime as `mode` says (module docstring); True if it was started.

    Call it once, first: jax refuses to initialise after any device has been touched. Calling it again
    after a successful start is a no-op returning True.
    """
    if mode not in MODES:
        raise ValueError(f"distributed mode must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return False
    if jax.distributed.is_initialized():
        return True
    if mode == "auto":
        reason = detect_multiprocess()
        if reason is None:
            log.info("single-process run (no multi-process environment detected)")
            return False
        log.info("multi-process environment detected (%s): initialising jax.distributed", reason)
    explicit = explicit_settings()
    if explicit is not None:
        # All three given: skip jax's cluster detection, which would otherwise still run (to choose
        # local_device_ids) and, under SLURM, limit each process to the GPU named by SLURM_LOCALID.
        jax.distributed.initialize(**explicit, cluster_detection_method="deactivate",
                                   initialization_timeout=initialization_timeout)
    else:
        try:
            jax.distributed.initialize(initialization_timeout=initialization_timeout)
        except ValueError as err:  # jax found no cluster to take the coordinator / process count from
            raise DistributedConfigError(
                f"jax.distributed.initialize() could not detect the cluster ({err}): set "
                f"{', '.join(EXPLICIT_VARS)} on every process, or pass --distributed off") from err
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def host_batch_to_global(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's batch -> global arrays with the leading axis split over ('data', 'fsdp').

    Every process passes its own examples (numpy, the same keys and per-process batch size everywhere,
    a multiple of the number of batch shards its devices hold); the global batch is
    `per-process batch x process count`, each process's rows placed on its own devices (processes in
    the order of their devices along the mesh's batch axes: with `make_mesh` over `jax.devices()`,
    process 0's rows first). Devices of one process must not be replicas of another process's along
    the batch (a 'tensor' axis spanning hosts would need identical data on those hosts). With one
    process this is a plain sharded `device_put` of the whole batch.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.ndim == 0:
            raise ValueError(f"batch[{key!r}] is a scalar: every entry needs a leading batch axis")
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out
