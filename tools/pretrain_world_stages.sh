#!/usr/bin/env bash
# Reproduces the shipped shapes-world model (flowdppo_video/world/weights/shapes-world) in five
# stages, ~3 h on a 2-core CPU (pretrain.json records each stage's command and time). Each stage
# is resumable: rerun this script after an interruption.
#   1. from scratch, weighted toward high noise, where a video's motion is decided;
#   2. and 3. from the previous stage's raw weights, weighted toward low noise, where a shape's
#      outline is decided: held-out shape adherence 48% -> 73% -> 77%;
#   4. from stage 3's shipped (EMA) weights, squares drawn twice as often as circles or triangles
#      (the three-stage model drew its squares round); its schedule was lengthened from 1,200 to
#      1,800 steps at step 800, which the two calls below replay: shape 84%;
#   5. from stage 4's EMA weights, noise levels centred (logit-normal mean 0, where shapes are
#      decided) and the text encoder trained too: shape 96% (94% with the encoder frozen).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
W=${WORK:-runs}
$PY tools/pretrain_world.py --seed 7 --work "$W/pretrain_world7" --out "$W/world7_model"
$PY tools/pretrain_world.py --init "$W/pretrain_world7/state.pt" --work "$W/pretrain_world8" --out "$W/world8_model" \
    --steps 1100 --lr 3e-4 --warmup 50 --logit-mean -0.5 --high-noise-frac 0.1 --ema 0.995 --seed 8
$PY tools/pretrain_world.py --init "$W/pretrain_world8/state.pt" --work "$W/pretrain_world9" --out "$W/world9_model" \
    --steps 2000 --lr 2e-4 --warmup 50 --logit-mean -0.5 --high-noise-frac 0.1 --ema 0.995 --seed 9
STAGE4=(--init "$W/world9_model" --work "$W/pretrain_world10" --out "$W/world10_model" --lr 3e-4 --warmup 50 --logit-mean -0.5
        --high-noise-frac 0.1 --ema 0.995 --seed 10 --shape-mix circle=1,square=2,triangle=1 --save-every 200)
$PY tools/pretrain_world.py "${STAGE4[@]}" --steps 1200 --stop-at 800
$PY tools/pretrain_world.py "${STAGE4[@]}" --steps 1800
$PY tools/pretrain_world.py --init "$W/world10_model" --work "$W/pretrain_world11" --train-text-encoder \
    --steps 1200 --lr 3e-4 --warmup 50 --logit-mean 0.0 --high-noise-frac 0.1 --ema 0.995 --seed 11 \
    --shape-mix circle=1,square=2,triangle=1 --save-every 200 "$@"
