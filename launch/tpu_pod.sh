#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one host or a multi-host pod slice).
#
#   launch/tpu_pod.sh [options] up        create the slice, or reuse it if it exists
#   launch/tpu_pod.sh [options] install   copy this checkout (git HEAD) to every worker, install it
#   launch/tpu_pod.sh [options] train     start training on --worker=all (detached), then stream logs
#   launch/tpu_pod.sh [options] logs      stream worker 0's log (Ctrl-C stops watching, not training)
#   launch/tpu_pod.sh [options] stop      kill the training processes on every worker
#   launch/tpu_pod.sh [options] down      delete the slice
#   launch/tpu_pod.sh [options] all       up + install + train
#
# Options (or the environment variables in brackets):
#   --name=NAME            TPU VM name                           [TPU_NAME, default mmelectra]
#   --zone=ZONE            e.g. us-central2-b                    [TPU_ZONE] (required)
#   --project=PROJECT      GCP project                           [TPU_PROJECT, default: gcloud's]
#   --accelerator=TYPE     e.g. v4-32, v5p-64, v5litepod-16      [TPU_TYPE, default v4-8]
#   --version=RUNTIME      TPU VM software version               [TPU_VERSION, default tpu-ubuntu2204-base]
#   --spot                 create a Spot slice
#   --workdir=gs://...     run directory, shared by all workers  [WORKDIR] (required by train)
#   --config=ARG           configs/pretrain.py argument string   [CONFIG, default size=base]
#   --dry-run              print the gcloud commands instead of running them
# Anything after `--` is passed to `mmelectra train` (e.g. --config.batch_size=1024).
#
# Every worker runs the same `mmelectra train`; jax.distributed finds the other workers by
# itself on a TPU VM slice, so no coordinator flags are needed. The workdir must be on GCS
# so that every worker writes its checkpoint shards to the same place (orbax coordinates
# the multi-host save); only process 0 writes metrics.
set -euo pipefail
cd "$(dirname "$0")/.."

name=${TPU_NAME:-mmelectra}
zone=${TPU_ZONE:-}
project=${TPU_PROJECT:-}
accelerator=${TPU_TYPE:-v4-8}
version=${TPU_VERSION:-tpu-ubuntu2204-base}
workdir=${WORKDIR:-}
config=${CONFIG:-size=base}
spot=0
dry_run=0
action=""
extra=()

usage() { sed -n '2,27p' "$0" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case $1 in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --accelerator=*) accelerator=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --workdir=*) workdir=${1#*=} ;;
    --config=*) config=${1#*=} ;;
    --spot) spot=1 ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage ;;
    --) shift; extra=("$@"); break ;;
    up|install|train|logs|stop|down|all)
      [[ -z $action ]] || usage
      action=$1 ;;
    *) echo "tpu_pod.sh: unknown argument $1" >&2; usage ;;
  esac
  shift
done
[[ -n $action ]] || usage
[[ -n $zone ]] || { echo "tpu_pod.sh: --zone (or TPU_ZONE) is required" >&2; exit 2; }

common=(--zone="$zone")
[[ -n $project ]] && common+=(--project="$project")
remote_dir='~/mmelectra'
remote_log='~/mmelectra_train.log'
jax_version=$(sed -n 's/^ *"jax==\([^"]*\)".*/\1/p' pyproject.toml | head -1)

# Print a command (shell-quoted) under --dry-run, else run it.
run() {
  if (( dry_run )); then
    printf '%q ' "$@"; printf '\n'
  else
    "$@"
  fi
}

tpu() { run gcloud compute tpus tpu-vm "$@"; }

on_workers() {  # on_workers WORKER COMMAND
  tpu ssh "$name" "${common[@]}" --worker="$1" --command="$2"
}

up() {
  if (( ! dry_run )) && gcloud compute tpus tpu-vm describe "$name" "${common[@]}" >/dev/null 2>&1; then
    echo "tpu_pod.sh: reusing existing TPU VM $name" >&2
    return
  fi
  local create=(create "$name" "${common[@]}" --accelerator-type="$accelerator" --version="$version")
  (( spot )) && create+=(--spot)
  tpu "${create[@]}"
}

install() {
  # The committed tree (git HEAD), so every worker runs exactly the same code.
  local tarball=/tmp/mmelectra_src.tar.gz
  run git archive --format=tar.gz -o "$tarball" HEAD
  tpu scp "$tarball" "$name:/tmp/mmelectra_src.tar.gz" "${common[@]}" --worker=all
  on_workers all "set -e; rm -rf $remote_dir; mkdir -p $remote_dir; tar -xzf /tmp/mmelectra_src.tar.gz -C $remote_dir; cd $remote_dir; python3 -m venv .venv; .venv/bin/pip install -q -U pip; .venv/bin/pip install -q -e '.[gcs]' 'jax[tpu]==${jax_version}'"
}

train() {
  [[ $workdir == gs://* ]] || { echo "tpu_pod.sh: train needs --workdir=gs://BUCKET/PATH (shared by all workers)" >&2; exit 2; }
  local args=(train "--config=configs/pretrain.py:${config}" "--workdir=${workdir}" "${extra[@]}")
  local quoted
  quoted=$(printf '%q ' "${args[@]}")
  # nohup + setsid: training survives the ssh session; its output goes to a log per worker.
  on_workers all "cd $remote_dir && setsid nohup .venv/bin/mmelectra ${quoted} > $remote_log 2>&1 < /dev/null &"
  logs
}

logs() {
  on_workers 0 "tail -n +1 -F $remote_log"
}

stop() {
  on_workers all "pkill -f '[.]venv/bin/mmelectra train' || true"
}

down() {
  tpu delete "$name" "${common[@]}" --quiet
}

case $action in
  up) up ;;
  install) install ;;
  train) train ;;
  logs) logs ;;
  stop) stop ;;
  down) down ;;
  all) up; install; train ;;
esac
