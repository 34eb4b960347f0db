#!/usr/bin/env bash
# Set up a dataworth worker on this machine: the work pool, the `gpu` tag concurrency limit
# (one GPU task at a time per slot), and a process worker polling the pool.
# Needs PREFECT_API_URL pointing at a Prefect server (e.g. `prefect server start`).
set -euo pipefail
cd "$(dirname "$0")/.."
POOL="${DATAWORTH_POOL:-dataworth-gpu}"
GPU_SLOTS="${DATAWORTH_GPU_SLOTS:-1}"
export DATAWORTH_ROOT="${DATAWORTH_ROOT:-$PWD}"
prefect work-pool inspect "$POOL" >/dev/null 2>&1 || prefect work-pool create "$POOL" --type process
prefect concurrency-limit create gpu "$GPU_SLOTS" >/dev/null 2>&1 || true
exec prefect worker start --pool "$POOL" "$@"
