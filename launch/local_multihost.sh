#!/usr/bin/env bash
# N CPU processes on this machine, joined by jax.distributed (gloo collectives): the way
# tests exercise multi-host code, and a rehearsal of a pod run without a pod.
#
#   launch/local_multihost.sh N [--devices_per_process=D] [--port=P] -- COMMAND [ARGS...]
#   launch/local_multihost.sh 2 --devices_per_process=2 -- \
#       train --config=configs/pretrain.py:size=tiny --workdir=runs/mh
#
# COMMAND is a `mmelectra` command (train, evaluate, ...), or `python SCRIPT.py [ARGS]` for
# a script that takes the same three flags (tests/multihost_steps.py). Every process gets
# --coordinator_address=localhost:P --num_processes=N --process_id=I and D simulated CPU
# devices. Process 0 prints to the terminal; process I>0 writes to
# ${LOG_DIR:-/tmp}/mmelectra_process_I.log. If any process fails, the others are stopped
# and the script exits with the first failure's status.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,15p' "$0" >&2; exit 2; }
[[ $# -ge 1 && $1 =~ ^[0-9]+$ && $1 -ge 1 ]] || usage
num=$1; shift
devices=1
port=$(( 20000 + RANDOM % 20000 ))
while [[ $# -gt 0 && $1 != "--" ]]; do
  case $1 in
    --devices_per_process=*) devices=${1#*=} ;;
    --port=*) port=${1#*=} ;;
    *) usage ;;
  esac
  shift
done
[[ $# -ge 2 && $1 == "--" ]] || usage
shift
py=${PYTHON:-.venv/bin/python}
if [[ $1 == python ]]; then
  shift
  prog=("$py")
else
  prog=("$py" -m mmelectra.main)
fi
log_dir=${LOG_DIR:-/tmp}
mkdir -p "$log_dir"

export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

for (( i = 0; i < num; i++ )); do
  args=("$@" --coordinator_address="localhost:${port}" --num_processes="$num" --process_id="$i")
  if (( i == 0 )); then
    "${prog[@]}" "${args[@]}" &
  else
    "${prog[@]}" "${args[@]}" > "${log_dir}/mmelectra_process_${i}.log" 2>&1 &
  fi
  pids+=("$!")
done

# Wait for all; on the first failure stop the rest (a lone survivor would hang in a
# collective forever).
status=0
remaining=${#pids[@]}
while (( remaining > 0 )); do
  set +e
  wait -n
  rc=$?
  set -e
  remaining=$(( remaining - 1 ))
  if (( rc != 0 && status == 0 )); then
    status=$rc
    echo "local_multihost: a process exited with status $rc; stopping the others" >&2
    cleanup
  fi
done
trap - EXIT
exit "$status"
