#!/usr/bin/env bash
# jax.distributed settings of one SLURM task, from SLURM's variables (used by slurm_gpu.sbatch).
#
#   source launch/slurm_env.sh && imagpose_slurm_env     # exports them into this shell
#   bash launch/slurm_env.sh COMMAND [ARGS...]           # exports them, then runs COMMAND (one srun task)
#
# Sets JAX_COORDINATOR_ADDRESS (the job's first node, from `scontrol show hostnames`, where task 0 runs
# with srun's default block distribution; port IMAGPOSE_COORDINATOR_PORT, else 61440 + job id mod 4096,
# as jax's own SLURM detection picks), JAX_NUM_PROCESSES (SLURM_STEP_NUM_TASKS, else SLURM_NTASKS) and JAX_PROCESS_ID
# (SLURM_PROCID). With IMAGPOSE_ONE_PROCESS_PER_GPU=1 (srun --ntasks-per-node=<GPUs per node>) also
# JAX_LOCAL_DEVICE_IDS=SLURM_LOCALID, so that each process drives one of its node's GPUs.

imagpose_slurm_env() {
    local var
    for var in SLURM_JOB_ID SLURM_NTASKS SLURM_PROCID; do
        if [[ -z "${!var:-}" ]]; then
            echo "slurm_env.sh: $var is not set: run this inside an srun task of a SLURM job" >&2
            return 1
        fi
    done
    local nodelist=${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}}
    if [[ -z "$nodelist" ]]; then
        echo "slurm_env.sh: none of SLURM_STEP_NODELIST, SLURM_JOB_NODELIST, SLURM_NODELIST is set" >&2
        return 1
    fi
    local first
    first=$(scontrol show hostnames "$nodelist" | head -n 1) || true
    if [[ -z "$first" ]]; then
        echo "slurm_env.sh: 'scontrol show hostnames $nodelist' gave no host name" >&2
        return 1
    fi
    local port=${IMAGPOSE_COORDINATOR_PORT:-$((61440 + SLURM_JOB_ID % 4096))}
    export JAX_COORDINATOR_ADDRESS="$first:$port"
    export JAX_NUM_PROCESSES="${SLURM_STEP_NUM_TASKS:-$SLURM_NTASKS}"  # this srun step's tasks, not the job's
    export JAX_PROCESS_ID="$SLURM_PROCID"
    if [[ "${IMAGPOSE_ONE_PROCESS_PER_GPU:-0}" == 1 ]]; then
        if [[ -z "${SLURM_LOCALID:-}" ]]; then
            echo "slurm_env.sh: IMAGPOSE_ONE_PROCESS_PER_GPU=1 needs SLURM_LOCALID" >&2
            return 1
        fi
        export JAX_LOCAL_DEVICE_IDS="$SLURM_LOCALID"
    fi
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then  # executed, not sourced
    set -euo pipefail
    if [[ $# -eq 0 ]]; then
        echo "usage: bash $0 COMMAND [ARGS...]   (inside an srun task)" >&2
        exit 2
    fi
    imagpose_slurm_env
    exec "$@"
fi
