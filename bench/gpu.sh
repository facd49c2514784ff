#!/usr/bin/env bash
# The GPU measurement of issue 15, on a bare GPU machine (python3 with torch, triton, transformers; no network).
# Exact invocation, from the repository root, with bench/wheels/ prepared by `make gpu-wheels` and carried along:
#
#   bash bench/gpu.sh "$OUT"            # or: bash bench/gpu.sh DIR [extra python -m bench.run flags]
#
# Writes into DIR (default $OUT, else bench/gpu-<date>/), each file as soon as its phase ends:
#   preflight.json    python/torch/triton versions, one trivial Triton launch, C compiler and Python.h
#   compile.json      the sm_XY compile figures of every auto-routable kernel (bench/compile.py) for this GPU
#   attention-*.json  Triton vs SDPA vs math per head dim, fp16/bf16, forward and forward+backward
#   phase-*.json, results.json   bench.run: oneword UNet fwd/bwd and sampling it/s, then oneword vs diffusers
#   routes-{fp16,bf16}.txt   the ldm.kernels.routing.MEASURED rows those attention timings support
#   gpu.log           everything printed
# Whole run ≤ 8 minutes: bench.run stops starting phases after --deadline-s and is killed at 450 s.
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
    "$PYTHON" -m bench.preflight --install-missing "$WHEELS" --target "$SITE" || echo "bench/gpu.sh: wheel install failed"
else
    echo "bench/gpu.sh: no $WHEELS folder (make gpu-wheels); phases needing diffusers will record their error"
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if ! "$PYTHON" -m bench.preflight --out "$OUT_DIR" ${PREFLIGHT_FLAGS:-}; then
    echo "bench/gpu.sh: preflight failed (see $OUT_DIR/preflight.json); stopping"
    exit 1
fi

ARCH=$("$PYTHON" -c "import torch; print('%d%d' % torch.cuda.get_device_capability(0))" 2>/dev/null || echo 90)
timeout 120 "$PYTHON" -m bench.compile --arch "$ARCH" --json "$OUT_DIR/compile.json" >/dev/null \
    || echo "bench/gpu.sh: compile figures failed (continuing)"

timeout 450 "$PYTHON" -m bench.run --device cuda --size 512 --deadline-s 360 --phase-dir "$OUT_DIR" \
    --out "$OUT_DIR/results.json" "$@"
status=$?
for dt in fp16 bf16; do
    "$PYTHON" -m bench.attention --routes "$OUT_DIR/phase-attention-$dt-fwd.json" \
        "$OUT_DIR/phase-attention-$dt-fwd-bwd.json" > "$OUT_DIR/routes-$dt.txt" 2>&1 || true
done
echo "bench/gpu.sh: bench.run exit $status, end=$(date -u +%FT%TZ); files:"
ls -l "$OUT_DIR"
exit $status
