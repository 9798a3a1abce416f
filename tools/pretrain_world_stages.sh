#!/usr/bin/env bash
# Reproduces the shipped shapes-world model (flowdppo_video/world/weights/shapes-world) in three
# stages, ~102 min on a 2-core CPU. Each stage is resumable: rerun this script after an interruption.
#   1. from scratch, weighted toward high noise, where a video's motion is decided (61 min);
#   2. and 3. from the previous stage's raw weights, weighted toward low noise, where a shape's
#      outline is decided (14 + 26 min): held-out shape adherence 48% -> 73% -> 77%.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
W=${WORK:-runs}
$PY tools/pretrain_world.py --seed 7 --work "$W/pretrain_world7" --out "$W/world7_model"
$PY tools/pretrain_world.py --init "$W/pretrain_world7/state.pt" --work "$W/pretrain_world8" --out "$W/world8_model" \
    --steps 1100 --lr 3e-4 --warmup 50 --logit-mean -0.5 --high-noise-frac 0.1 --ema 0.995 --seed 8
$PY tools/pretrain_world.py --init "$W/pretrain_world8/state.pt" --work "$W/pretrain_world9" \
    --steps 2000 --lr 2e-4 --warmup 50 --logit-mean -0.5 --high-noise-frac 0.1 --ema 0.995 --seed 9 "$@"
