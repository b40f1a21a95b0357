#!/usr/bin/env bash
# GPU MFU of the base config in bf16, and the PyTorch LXMERT comparison, on one GPU.
#
#     bash bench/gpu_mfu.sh            # from the repository root, on a machine with one GPU
#
# Runs, in under 8 minutes (each step under `timeout`, against one deadline):
#   1. bench/mfu.py --device=gpu --dtype=bfloat16 --sizes=base: the train step (electra,
#      then mlm) at the largest batch of BATCHES that compiles and runs, MFU against the
#      vendor's dense bf16 peak (flops.PEAK_FLOPS: 989 TFLOP/s for an H100);
#   2. bench/step_throughput.py --device=gpu --dtype=bfloat16 --sizes=base at that batch:
#      examples/s of PyTorch LxmertForPreTraining (cuda, bf16 autocast) against mmelectra.
# The two scripts hold all the logic; this one finds a Python that can run them.
#
# Python: $MMELECTRA_PYTHON if set, else the first of .venv/bin/python and python3 that
# imports mmelectra, torch and transformers with JAX on a GPU and CUDA in torch. If none
# does, it installs what is missing: wheels carried in .whl/ (pip --no-index), or, where
# a package index is reachable, `pip install -e .[export] jax[cuda12]` into .venv-gpu.
# Otherwise it stops and says what is missing.
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET_S=${GPU_MFU_BUDGET_S:-470}      # the whole script, installs included
BATCHES=${GPU_MFU_BATCHES:-768,512,256}  # base config, largest first
DEADLINE=$(( $(date +%s) + BUDGET_S ))
OUT=${GPU_MFU_OUT:-/tmp/gpu_mfu}
mkdir -p "$OUT"

left() { echo $(( DEADLINE - $(date +%s) )); }
say() { echo "[gpu_mfu $(date +%H:%M:%S), $(left) s left] $*"; }

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# A second run of the same program (step 2 after step 1) reads its executable from here.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/mmelectra_jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
# One runner holds the GPU at a time (the scripts time them one after another).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

CHECK='
import jax, torch, transformers, mmelectra.train  # noqa: F401
assert jax.default_backend() == "gpu", f"JAX backend is {jax.default_backend()}, not gpu"
assert torch.cuda.is_available(), "torch sees no CUDA device"
print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__}; "
      f"transformers {transformers.__version__}")
'
works() { timeout 120 "$1" -c "$CHECK" 2>"$OUT/check.err"; }

PY=""
for candidate in ${MMELECTRA_PYTHON:-} .venv/bin/python python3; do
  if [ -x "$candidate" ] || command -v "$candidate" >/dev/null 2>&1; then
    if works "$candidate"; then PY=$candidate; break; fi
    say "$candidate cannot run the benchmark: $(tail -n 1 "$OUT/check.err")"
  fi
done

if [ -z "$PY" ] && [ -d .whl ] && command -v python3 >/dev/null; then
  say "installing the wheels in .whl/ into /tmp/site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  works python3 && PY=python3
fi

if [ -z "$PY" ] && command -v python3 >/dev/null \
    && timeout 30 python3 -m pip download -q --no-deps -d "$OUT/pipcheck" pip >/dev/null 2>&1; then
  say "a package index is reachable: installing mmelectra[export] with jax[cuda12] into .venv-gpu"
  python3 -m venv .venv-gpu \
    && timeout $(( $(left) > 300 ? $(left) - 240 : 60 )) .venv-gpu/bin/pip install -q -e '.[export]' 'jax[cuda12]==0.10.2' \
    && works .venv-gpu/bin/python && PY=.venv-gpu/bin/python
fi

if [ -z "$PY" ]; then
  echo "error: no Python here can run the benchmark (needs jax with a GPU backend, flax, optax,"
  echo "orbax-checkpoint, grain, tensorflow-datasets, ml-collections, torch with CUDA, transformers)."
  echo "Last import error:"; tail -n 5 "$OUT/check.err"
  echo "Offline machine: carry the missing packages as wheels in .whl/ (see pyproject.toml), or set"
  echo "MMELECTRA_PYTHON to an interpreter that has them."
  exit 2
fi
say "python: $PY"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

say "1/2 MFU, base config, bf16, batch from $BATCHES"
timeout $(( $(left) > 30 ? $(left) - 30 : 1 )) "$PY" bench/mfu.py --device=gpu --dtype=bfloat16 \
  --sizes=base --batch="base=$BATCHES" --steps=base=10 --repeats=3 2>&1 | tee "$OUT/mfu.log"
BATCH=$(grep '^RESULT' "$OUT/mfu.log" | grep -o 'batch_base=[0-9]*' | cut -d= -f2)
if [ -z "$BATCH" ]; then
  say "error: bench/mfu.py gave no RESULT (see $OUT/mfu.log)"
  exit 1
fi

say "2/2 PyTorch LXMERT comparison, base config, bf16, batch $BATCH"
timeout $(( $(left) > 5 ? $(left) - 5 : 1 )) "$PY" bench/step_throughput.py --device=gpu --dtype=bfloat16 \
  --sizes=base --batch="base=$BATCH" --steps=base=10 --repeats=3 2>&1 | tee "$OUT/throughput.log"
status=${PIPESTATUS[0]}
say "done (exit $status)"
grep '^RESULT' "$OUT/mfu.log" "$OUT/throughput.log"
exit "$status"
