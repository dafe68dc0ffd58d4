#!/usr/bin/env bash
# The prepared GPU check (one H100/H200, under 8 minutes): resnet152 at 224². First the peak MiB per image
# of every gradient method (each tier, the default, backprop, timm checkpointing; float32, the measure the
# CPU figures in docs/BENCHMARKS.md use), then, under bf16 autocast and channels_last, peak memory and
# images/s of plain backprop, timm checkpointing and our default at one batch size, and the largest batch
# each fits. Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md.
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
