#!/usr/bin/env bash
# One host, all its local GPUs (CUDA_VISIBLE_DEVICES picks them), one process.
#
#   launch/gpu_single.sh CONFIG WORKDIR [--config.KEY=VALUE ...]
#   e.g. launch/gpu_single.sh configs/stage1.py runs/stage1 --config.steps=1000
#
# XLA_PYTHON_CLIENT_MEM_FRACTION (default here 0.92 of each GPU's memory, jax's own default is 0.75) and
# XLA_FLAGS pass through; IMAGPOSE overrides the command (default `imagpose`).
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 CONFIG WORKDIR [--config.KEY=VALUE ...]" >&2
    exit 2
fi
config=$1 workdir=$2
shift 2
read -r -a imagpose <<< "${IMAGPOSE:-imagpose}"

export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}

exec "${imagpose[@]}" train --config "$config" --workdir "$workdir" --distributed off "$@"
