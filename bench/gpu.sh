#!/usr/bin/env bash
# One GPU run of `make bench` (< 8 minutes on one H100): installs nothing, assumes ./.venv (or $PYTHON).
#   bash bench/gpu.sh [OUT_DIR [extra bench.run flags]]  → OUT_DIR/results-cuda-<date>.json (+ .log); default bench/
# Sampling: 512 px fp16, CFG 7.5, 3 runs × 12 DDIM steps per library. Training: 512 px, batch 1/2/4, bf16 mixed,
# 1 warm-up + 5 timed steps per library. Attention: bench/attention.py fwd and fwd+bwd (fp16).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT_DIR=${1:-${OUT:-bench}}
[ $# -gt 0 ] && shift
mkdir -p "$OUT_DIR"
STAMP=$(date +%Y-%m-%d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.version.cuda)"
timeout 470 "$PYTHON" -m bench.run --device cuda --size 512 --out "$OUT_DIR/results-cuda-$STAMP.json" "$@" \
    2>&1 | tee "$OUT_DIR/results-cuda-$STAMP.log"
