#!/usr/bin/env bash
# CPU benchmarks (ratios measured interleaved in one process); CSVs under $1 (default benchmarks/results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
$PY benchmarks/ops_bench.py --device cpu --out "$OUT"
$PY benchmarks/biformer_bench.py --device cpu --out "$OUT"
[ -f benchmarks/halonet_bench.py ] && $PY benchmarks/halonet_bench.py --device cpu --out "$OUT"
$PY -m zoo.cli bench davit_tiny --vs swin_tiny_patch4_window7_224 -b 8 --iters 3 --out "$OUT/models_cpu.csv"
