#!/usr/bin/env bash
# The GPU check (issue [1/5]): on one GPU, in about 8 minutes. Prints every figure and writes
# $WORK/gpu_check.json (and copies it under $OUT when the device tool provides one).
#   bash scripts/gpu_check.sh                 # defaults: --device cuda --dtype bf16
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/headsteer-gpu-check}
mkdir -p "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python -m pytest -q tests/test_gpu.py tests/test_precision.py 2>&1 | tail -3
python scripts/gpu_check.py --work "$WORK" "$@" 2>&1 | tee "$WORK/gpu_check.log"
rc=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then cp "$WORK/gpu_check.json" "$WORK/gpu_check.log" "$OUT/" 2>/dev/null || true; fi
exit $rc
