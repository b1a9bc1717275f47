#!/usr/bin/env bash
# The GPU check (issue [1/5]): on one GPU, in about 8 minutes. Prints every figure and writes
# $WORK/gpu_check.json (and, when the device tool provides $OUT, $OUT/gpu_check.json after every step).
#   bash scripts/gpu_check.sh                 # defaults: --device cuda --dtype bf16, --budget-s 480
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/headsteer-gpu-check}
PY=${PYTHON:-$(command -v python3 || command -v python)}
mkdir -p "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
"$PY" scripts/gpu_check.py --work "$WORK" "$@" 2>&1 | tee "$WORK/gpu_check.log"
rc=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then cp "$WORK/gpu_check.log" "$OUT/" 2>/dev/null || true; fi
exit $rc
