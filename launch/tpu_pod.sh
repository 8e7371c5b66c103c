#!/usr/bin/env bash
# Cloud TPU pod slice (v4-32, v5p-64, ...): copy this checkout to every worker, install, and start the
# same `imagpose train` on all of them. jax finds the coordinator and the process ids itself on a TPU pod.
#
#   TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_pod.sh CONFIG gs://BUCKET/runs/NAME [--config.KEY=VALUE ...]
#   e.g. TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_pod.sh configs/stage1.py gs://my-bucket/runs/stage1
#
# CONFIG is relative to the repository root. WORKDIR must be a gs:// path (checkpoints are written by all
# hosts together); the config's data must be readable from every worker. Optional: PROJECT (gcloud
# project), SKIP_INSTALL=1 (workers already set up), REMOTE_DIR (checkout on the workers, default
# imagpose-jax in the home folder), JAX_TPU_SPEC (default 'jax[tpu]>=0.7,<0.11', the range setup.py
# allows), IMAGPOSE (the command on the workers, default `imagpose`). The ssh session stays attached while training runs:
# start this in tmux/screen, or see the workers' output with `gcloud ... ssh --worker=N`.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: TPU_NAME=... ZONE=... $0 CONFIG gs://BUCKET/WORKDIR [--config.KEY=VALUE ...]" >&2
    exit 2
fi
: "${TPU_NAME:?set TPU_NAME to the TPU VM's name}"
: "${ZONE:?set ZONE to the TPU VM's zone}"
config=$1 workdir=$2
shift 2
if [[ "$workdir" != gs://* ]]; then
    echo "tpu_pod.sh: WORKDIR $workdir is not a gs:// path; every worker must see the same workdir" >&2
    exit 2
fi
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
remote_dir=${REMOTE_DIR:-imagpose-jax}
jax_spec=${JAX_TPU_SPEC:-jax[tpu]>=0.7,<0.11}
gcloud_args=(--zone "$ZONE")
if [[ -n "${PROJECT:-}" ]]; then
    gcloud_args+=(--project "$PROJECT")
fi

on_all_workers() {  # COMMAND (one string, run by bash on every worker)
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_args[@]}" --worker=all --command "$1"
}

if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
    archive=$(mktemp "${TMPDIR:-/tmp}/imagpose-jax.XXXXXX")
    trap 'rm -f "$archive"' EXIT
    tar -C "$repo_root" -czf "$archive" --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ \
        --exclude=.venv --exclude=runs --exclude=weights .
    gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:imagpose-jax.tar.gz" "${gcloud_args[@]}" --worker=all
    on_all_workers "set -e; mkdir -p $(printf '%q' "$remote_dir") && tar -xzf imagpose-jax.tar.gz -C $(printf '%q' "$remote_dir") \
&& python3 -m pip install -q -U $(printf '%q' "$jax_spec") -e $(printf '%q' "$remote_dir")"
fi

# The training command, each argument quoted for the remote shell (pip's user installs go to ~/.local/bin).
read -r -a imagpose <<< "${IMAGPOSE:-imagpose}"
train=("${imagpose[@]}" train --config "$config" --workdir "$workdir" --distributed on "$@")
on_all_workers "export PATH=\$HOME/.local/bin:\$PATH; cd $(printf '%q' "$remote_dir") && $(printf '%q ' "${train[@]}")"
