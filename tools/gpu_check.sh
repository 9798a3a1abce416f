#!/usr/bin/env bash
# The ten-minute check on one GPU (issue 19, item 5): Wan 2.1 1.3B's architecture, random weights,
# bf16, 33 frames at 240x416, CFG 4.5, LoRA rank 32; rollout and one update per iteration through
# `flowdppo-video train`, native SDPA and flash attention, each plain and compiled. Prints videos/s,
# update seconds, peak GPU memory beside the planner's figure, and MFU (details: docs/benchmarks.md).
#
#   tools/gpu_check.sh                          # one GPU (~10 minutes on an H100)
#   tools/gpu_check.sh tiny                     # tiny shapes, seconds on a CPU (tests/test_gpu_check.py)
#   GPU_CHECK_SIZE=tiny GPU_CHECK_VARIANTS=native GPU_CHECK_OUT=/tmp/g tools/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
SIZE="${1:-${GPU_CHECK_SIZE:-full}}"
exec "$PY" tools/gpu_check.py --size "$SIZE" "${@:2}"
