#!/usr/bin/env bash
# One command for a lent GPU (H100/H200), under 8 minutes: every gpu-marked test, then the op and model
# benchmarks, CSVs under $OUT (default benchmarks/results). Each step is time-boxed so one slow step
# cannot eat the session's device time; a failed step is reported and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
failed=0
step() {  # step SECONDS NAME COMMAND...
  local limit=$1 name=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  if ! timeout "$limit" "$@"; then echo "!!! $name failed or timed out"; failed=1; fi
}
unset TRITON_INTERPRET
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)" || exit 1
step 120 "gpu tests" $PY -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml"
step 180 "ops benchmark" $PY benchmarks/ops_bench.py --device cuda --dtype bfloat16 --batch 1 32 128 --out "$OUT"
step 90 "biformer benchmark" $PY benchmarks/biformer_bench.py --device cuda --out "$OUT"
[ -f benchmarks/halonet_bench.py ] && step 60 "halonet benchmark" $PY benchmarks/halonet_bench.py --device cuda --out "$OUT"
step 60 "model benchmark" $PY -m zoo.cli bench davit_tiny --vs swin_tiny_patch4_window7_224 resnet50 \
  --device cuda --dtype bfloat16 -b 128 --iters 10 --warmup 3 --out "$OUT/models_gpu.csv"
exit $failed
