#!/usr/bin/env bash
# Set up a dataworth worker on this machine: the work pool, the `gpu` tag concurrency limit
# (one GPU task at a time per slot), the automation that marks flow runs whose heartbeats stopped
# (a dead worker) Crashed, and a process worker polling the pool. Extra arguments go to
# `prefect worker start`, e.g. `--limit 1` (one flow run at a time: one GPU) for the index flow's
# `--runner.kind pool`, which spreads shards over every worker of the pool.
# Needs PREFECT_API_URL pointing at a Prefect server (e.g. `prefect server start`).
set -euo pipefail
cd "$(dirname "$0")/.."
POOL="${DATAWORTH_POOL:-dataworth-gpu}"
GPU_SLOTS="${DATAWORTH_GPU_SLOTS:-1}"
export DATAWORTH_ROOT="${DATAWORTH_ROOT:-$PWD}"
# Another worker's set-up may create the pool at the same moment: then it is there, which is all that counts.
prefect work-pool inspect "$POOL" >/dev/null 2>&1 || prefect work-pool create "$POOL" --type process >/dev/null ||
  prefect work-pool inspect "$POOL" >/dev/null
prefect concurrency-limit create gpu "$GPU_SLOTS" >/dev/null 2>&1 || true
ZOMBIES="$(sed -n 's/^name: //p' deployments/zombie-flows.yaml)"
prefect automation inspect "$ZOMBIES" >/dev/null 2>&1 ||
  prefect automation create --from-file deployments/zombie-flows.yaml >/dev/null
# A worker whose server is gone retries it at length on SIGTERM/SIGINT; it gets STOP_S seconds, then SIGKILL.
STOP_S="${DATAWORTH_WORKER_STOP_S:-20}"
prefect worker start --pool "$POOL" "$@" &
WORKER=$!
stop() {
  kill -TERM "$WORKER" 2>/dev/null || exit 0
  for _ in $(seq "$STOP_S"); do kill -0 "$WORKER" 2>/dev/null || exit 0; sleep 1; done
  kill -KILL "$WORKER" 2>/dev/null
  exit 143
}
trap stop TERM INT
wait "$WORKER"
