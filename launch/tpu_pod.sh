#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: create it if needed, copy this checkout to every worker,
# install, and run the same `bgjax train` on all workers (JAX finds its peers itself).
#
#   launch/tpu_pod.sh NAME ZONE ACCELERATOR -- <bgjax train args>
#   launch/tpu_pod.sh bgjax-v4 us-central2-b v4-32 -- --config cub.py:arch=vit,size=large \
#       --workdir /mnt/shared/runs/cub_vitl --config.data.root=/mnt/shared/CUB_200_2011
#
# Env: TPU_VERSION (runtime image, default tpu-ubuntu2204-base), TPU_SPOT=1 (spot VMs; on
# preemption every worker saves at the same step and exits 0; run this again to resume),
# GCLOUD_ARGS (extra flags, e.g. --project=...). The workdir must be one directory shared by
# all workers (e.g. a GCS FUSE or Filestore mount; metrics.jsonl is appended to); so must the data.
set -euo pipefail
usage() { echo "usage: $0 NAME ZONE ACCELERATOR -- <bgjax train args>" >&2; exit 2; }
[[ $# -ge 4 && $4 == "--" ]] || usage
name=$1 zone=$2 accelerator=$3
shift 4
read -r -a extra <<<"${GCLOUD_ARGS:-}"
tpu=(gcloud compute tpus tpu-vm)

if ! "${tpu[@]}" describe "$name" --zone="$zone" "${extra[@]}" >/dev/null 2>&1; then
  "${tpu[@]}" create "$name" --zone="$zone" --accelerator-type="$accelerator" \
    --version="${TPU_VERSION:-tpu-ubuntu2204-base}" ${TPU_SPOT:+--spot} "${extra[@]}"
fi

on_all_workers() { "${tpu[@]}" ssh "$name" --zone="$zone" --worker=all "${extra[@]}" --command="$1"; }

# This checkout (committed files) on every worker, installed with the TPU extra.
archive=$(mktemp --suffix=.tar.gz)
trap 'rm -f "$archive"' EXIT
git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
"${tpu[@]}" scp "$archive" "$name:bgjax.tar.gz" --zone="$zone" --worker=all "${extra[@]}"
on_all_workers 'set -e; rm -rf ~/bgjax; mkdir -p ~/bgjax; tar xzf ~/bgjax.tar.gz -C ~/bgjax
  cd ~/bgjax; python3 -m venv .venv; . .venv/bin/activate; pip install -q -e ".[tpu]"'

# BGJAX_DISTRIBUTED=1: jax.distributed.initialize() with the pod's own discovery.
on_all_workers "cd ~/bgjax && . .venv/bin/activate && BGJAX_DISTRIBUTED=1 bgjax train $(printf '%q ' "$@")"
