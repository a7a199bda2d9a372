#!/usr/bin/env bash
# Run N trainer processes on this host, joined by jax.distributed over 127.0.0.1: the multi-host
# code path on one machine (CPU devices by default). Used by the tests; handy for debugging.
#
#   launch/local.sh N DEVICES_PER_PROCESS python -m mpt_jax.train --config=configs/tiny.py --workdir=/tmp/run
#
# What to edit: nothing; set PORT to pin the coordinator port, LOG_DIR for the logs of processes
# 1..N-1 (process 0 prints to this terminal; the folder is created), JAX_PLATFORMS to run on
# something other than CPU. When one process fails the others are stopped at once (they would
# otherwise wait minutes for it at the coordinator).
set -euo pipefail
if [ "$#" -lt 3 ]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS COMMAND..." >&2
  exit 2
fi
N=$1
D=$2
shift 2
PORT=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
LOG_DIR=${LOG_DIR:-$(mktemp -d)}
if ! mkdir -p "$LOG_DIR" 2>/dev/null || [ ! -w "$LOG_DIR" ]; then
  echo "$0: LOG_DIR=$LOG_DIR cannot be created or written" >&2
  exit 2
fi
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$D"
export JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT JAX_NUM_PROCESSES=$N

pids=()
for ((i = N - 1; i >= 0; i--)); do
  if [ "$i" -eq 0 ]; then
    JAX_PROCESS_ID=0 "$@" &
  else
    JAX_PROCESS_ID=$i "$@" >"$LOG_DIR/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
# SIGTERM first (a trainer saves a checkpoint and exits), SIGKILL after STOP_GRACE_S seconds (a
# process blocked in a collective with a dead peer never gets to look at the signal).
stop_all() {
  kill "${pids[@]}" 2>/dev/null || true
  for ((t = 0; t < ${STOP_GRACE_S:-10}; t++)); do
    kill -0 "${pids[@]}" 2>/dev/null || break
    sleep 1
  done
  kill -9 "${pids[@]}" 2>/dev/null || true
  wait || true
}
trap stop_all INT TERM
status=0
for ((k = 0; k < N; k++)); do
  if wait -n; then
    continue
  else
    status=$?
  fi
  stop_all # the first failure stops the rest
  break
done
[ "$status" -eq 0 ] || echo "$0: a process failed (exit $status); logs of processes 1..$((N - 1)) in $LOG_DIR" >&2
exit "$status"
