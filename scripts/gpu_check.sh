#!/usr/bin/env bash
# The prepared GPU check (one H100, under 8 minutes): resnet152 at 224², bf16 autocast, channels_last;
# peak memory and images/s of plain backprop, timm checkpointing and our default adjoint at one batch
# size, and the largest batch each fits. Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md.
#
#   scripts/gpu_check.sh [OUT_DIR] [more scripts/gpu_check.py arguments, e.g. --dry-run]
#
# Needs a Python with torch (CUDA), timm and lightning; the package is used from this checkout, so no
# install is needed. PYTHON picks the interpreter [python3].
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-gpu_check_out}
shift || true
python=${PYTHON:-python3}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

# 8 minutes in all: the script budgets 7 of them itself; this is the hard stop.
timeout --signal=TERM 480 "$python" "$repo/scripts/gpu_check.py" --out "$out" "$@"
