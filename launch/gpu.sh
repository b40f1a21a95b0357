#!/usr/bin/env bash
# Train on the GPUs of one host (one process sees them all; the mesh spans them), then
# evaluate. With one GPU this is the debugging path.
#
#   launch/gpu.sh WORKDIR [CONFIG_ARG] [--gpus=0,1,...] [--install] [-- --config.key=value ...]
#   launch/gpu.sh runs/base size=base --gpus=0 -- --config.batch_size=64      # one GPU
#   launch/gpu.sh runs/base size=base -- --config.mesh.fsdp=-1 --config.mesh.data=1  # all GPUs, FSDP
#
# --install   pip-installs jax's CUDA 12 wheels (jax[cuda12], same jax version) into the venv
# --gpus      CUDA_VISIBLE_DEVICES (default: every GPU)
# Environment: PYTHON (default .venv/bin/python); XLA_PYTHON_CLIENT_MEM_FRACTION (default
# 0.9). Several hosts: run `mmelectra train` on each with --coordinator_address,
# --num_processes and --process_id (launch/local_multihost.sh shows the flags).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,14p' "$0" >&2; exit 2; }
[[ $# -ge 1 && $1 != -* ]] || usage
workdir=$1; shift
config_arg=size=tiny
if [[ $# -gt 0 && $1 != -* ]]; then config_arg=$1; shift; fi
install=0
extra=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --gpus=*) export CUDA_VISIBLE_DEVICES=${1#*=} ;;
    --install) install=1 ;;
    --) shift; extra=("$@"); break ;;
    *) usage ;;
  esac
  shift
done
py=${PYTHON:-.venv/bin/python}
if (( install )); then
  jax_version=$(sed -n 's/^ *"jax==\([^"]*\)".*/\1/p' pyproject.toml | head -1)
  "$py" -m pip install -q "jax[cuda12]==${jax_version}"
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
"$py" -c "import jax, sys; d = jax.devices(); print('devices:', d); sys.exit(d[0].platform != 'gpu')" \
  || { echo "gpu.sh: JAX sees no GPU (try --install)" >&2; exit 1; }
"$py" -m mmelectra.main train --config="configs/pretrain.py:${config_arg}" --workdir="$workdir" "${extra[@]}"
"$py" -m mmelectra.main evaluate --workdir="$workdir"
