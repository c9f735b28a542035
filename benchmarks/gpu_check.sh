#!/usr/bin/env bash
# The checks a GPU machine is for, in one go (figures go to benchmarks/RESULTS.md, "GPU"):
#   1. the parity suites with torch on CUDA and JAX on its GPU backend (float64 and float32, slow cases too);
#   2. tests/test_real_anchors.py, which needs the real timm and torchvision (CUDA builds import there);
#   3. bench_resnet and bench_cbam on CUDA (quick runs; interleaved CBAM/plain ratios).
# Usage, from a checkout on a machine with CUDA torch, JAX with its CUDA plugin, flax, optax, pytest:
#   OUT=gpu_out bash benchmarks/gpu_check.sh           # logs + results under $OUT (default gpu_out)
# Each step has its own time limit so that one slow step cannot eat the others' time; a step's exit code
# is printed ("rc=124" = its limit). GPU_CHECK_SMOKE=1 runs it on CPU with tiny benchmarks (to try it here).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT/logs"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several test workers share one GPU: no 75 % grab each
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
  device=cpu bench=(--smoke) workers=2 slow="not slow"
else
  device=cuda bench=(--quick) workers=${WORKERS:-8} slow="slow or not slow"
fi
export CBAM_MULTI_TORCH_DEVICE=$device

# Not installed there: import the checkout in place (the editable install maps these two packages).
[ -e cbam_multi/torch ] || ln -s ../backends/torch cbam_multi/torch
[ -e cbam_multi/jax ] || ln -s ../backends/jax cbam_multi/jax
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

step() {  # step NAME SECONDS CMD...: run with a limit, full log under $OUT/logs, last lines here
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc, $((SECONDS - t0)) s"
  tail -n 4 "$OUT/logs/$name.log"
}

{
  nvidia-smi -L 2>/dev/null || true
  $PY -c "import sys, torch, jax, flax, numpy; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'numpy', numpy.__version__)"
  $PY -c "import timm, torchvision; print('timm', timm.__version__, 'torchvision', torchvision.__version__)" 2>&1 | tail -n 1
} >"$OUT/logs/env.log" 2>&1
cat "$OUT/logs/env.log"

step parity "${PARITY_LIMIT:-170}" $PY -m pytest -q -p no:cacheprovider -n "$workers" -m "$slow" parity_tests -rA
# CBAM_REQUIRE_REAL_ANCHORS=1: a timm that does not import is an error there, not a skip
CBAM_REQUIRE_REAL_ANCHORS=1 OMP_NUM_THREADS=4 step real_anchors "${ANCHORS_LIMIT:-150}" \
  $PY -m pytest -q -p no:cacheprovider -n 4 tests/test_real_anchors.py -rA
# RESNET_ARGS / CBAM_ARGS: extra flags (e.g. CBAM_ARGS="--shapes 64x64x28x28 --dtypes float32")
step bench_resnet "${RESNET_LIMIT:-160}" $PY benchmarks/bench_resnet.py "${bench[@]}" --device "$device" --out "$OUT/results" ${RESNET_ARGS:-}
step bench_cbam "${CBAM_LIMIT:-100}" $PY benchmarks/bench_cbam.py "${bench[@]}" --device "$device" --out "$OUT/results" ${CBAM_ARGS:-}
tar -czf "$OUT/gpu_check.tar.gz" -C "$OUT" logs $( [ -d "$OUT/results" ] && echo results )
