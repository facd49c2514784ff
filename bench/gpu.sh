#!/usr/bin/env bash
# The GPU measurement, on a bare GPU machine (python3 with torch, triton, transformers; no network).
# Exact invocation, from the repository root, with bench/wheels/ prepared by `make gpu-wheels` and carried along:
#
#   bash bench/gpu.sh "$OUT"            # or: bash bench/gpu.sh DIR [extra python -m bench.run flags]
#
# Writes into DIR (default $OUT, else bench/gpu-<date>/), each file as soon as its phase ends:
#   preflight.json    python/torch/triton versions, one trivial Triton launch, C compiler and Python.h
#   compile.json      the sm_XY compile figures of every auto-routable kernel (bench/compile.py) for this GPU
#   phase-attention-{fp16,bf16}-{fwd,fwd-bwd}.json   Triton vs SDPA vs math per head dim and shape
#   phase-oneword.json   UNet forward / forward+backward ms, DDIM+CFG sampling it/s (eager, CUDA graph)
#   phase-build.json, phase-sampling-512.json, phase-train-512-b{1,2,4}.json   oneword vs diffusers
#   results.json      the whole bench.run report, rewritten after every phase
#   routes-{fp16,bf16}.txt   the ldm.kernels.routing.MEASURED rows those attention timings support
#   gpu.log           everything printed
# Whole run ≤ 8 minutes: every step has a timeout out of one 470-second budget; bench.run gets what is left, stops
# starting phases 60 s before its end and is killed at it.
# Environment: PYTHON (default .venv/bin/python, else python3); WHEELS (default bench/wheels).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT_DIR=${1:-${OUT:-bench/gpu-$(date +%Y-%m-%d)}}
[ $# -gt 0 ] && shift
WHEELS=${WHEELS:-bench/wheels}
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/gpu.log") 2>&1
echo "bench/gpu.sh: python=$PYTHON out=$OUT_DIR start=$(date -u +%FT%TZ)"
command -v "$PYTHON" >/dev/null || { echo "bench/gpu.sh: no python at '$PYTHON' (set PYTHON=)"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

SITE="$(mktemp -d)/site-packages"
if [ -d "$WHEELS" ]; then
    timeout 90 "$PYTHON" -m bench.preflight --install-missing "$WHEELS" --target "$SITE" \
        || echo "bench/gpu.sh: wheel install failed"
else
    echo "bench/gpu.sh: no $WHEELS folder (make gpu-wheels); phases needing diffusers will record their error"
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if ! timeout 60 "$PYTHON" -m bench.preflight --out "$OUT_DIR" ${PREFLIGHT_FLAGS:-}; then
    echo "bench/gpu.sh: preflight failed (see $OUT_DIR/preflight.json); stopping"
    exit 1
fi

ARCH=$("$PYTHON" -c "import torch; print('%d%d' % torch.cuda.get_device_capability(0))" 2>/dev/null || echo 90)
timeout 60 "$PYTHON" -m bench.compile --arch "$ARCH" --json "$OUT_DIR/compile.json" >/dev/null \
    || echo "bench/gpu.sh: compile figures failed or timed out (continuing)"

LEFT=$((470 - SECONDS - 15))
echo "bench/gpu.sh: ${SECONDS}s used; bench.run gets ${LEFT}s"
timeout "$LEFT" "$PYTHON" -m bench.run --device cuda --size 512 --deadline-s $((LEFT - 60)) --phase-dir "$OUT_DIR" \
    --out "$OUT_DIR/results.json" "$@"
status=$?
for dt in fp16 bf16; do
    "$PYTHON" -m bench.attention --routes "$OUT_DIR/phase-attention-$dt-fwd.json" \
        "$OUT_DIR/phase-attention-$dt-fwd-bwd.json" > "$OUT_DIR/routes-$dt.txt" 2>&1 || true
done
echo "bench/gpu.sh: bench.run exit $status, end=$(date -u +%FT%TZ); files:"
ls -l "$OUT_DIR"
exit $status
