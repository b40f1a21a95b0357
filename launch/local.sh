#!/usr/bin/env bash
# Train on this machine (CPU, or every GPU of one host), then evaluate the last checkpoint.
#   launch/local.sh WORKDIR [CONFIG_ARG] [--config.key=value ...]
#   launch/local.sh runs/small size=small,objective=electra --config.batch_size=128
set -euo pipefail
cd "$(dirname "$0")/.."
workdir=${1:?usage: launch/local.sh WORKDIR [CONFIG_ARG] [--config.key=value ...]}
config_arg=${2:-size=tiny}
shift $(( $# >= 2 ? 2 : 1 ))
py=${PYTHON:-.venv/bin/python}
"$py" -m mmelectra.main train --config="configs/pretrain.py:${config_arg}" --workdir="$workdir" "$@"
"$py" -m mmelectra.main evaluate --workdir="$workdir"
