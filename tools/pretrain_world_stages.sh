#!/usr/bin/env bash
# Reproduces the shipped shapes-world model (flowdppo_video/world/weights/shapes-world) on a
# 2-core CPU, stage by stage, exactly as it was trained (each stage's flags, including where a
# stage was cut short: a cosine schedule depends on --steps). About 3 h 10 min in all here.
#   bash tools/pretrain_world_stages.sh [WORK_DIR]
set -euo pipefail
W=${1:-runs/pretrain_world_repro}
P=".venv/bin/python tools/pretrain_world.py --position-channels 0"
# Stage 1: relative positions only (Wan's RoPE); half the direction words wrong. The first run
# was started for 5,000 steps and extended twice, so the learning-rate schedule was too.
$P --work "$W/s1" --steps 5000 --stop-at 500 --ship raw
$P --work "$W/s1" --steps 3000 --stop-at 3000 --ship raw
$P --work "$W/s1" --steps 5500 --ship raw --out "$W/s1_model"
# Stage 2: a quarter of the direction words wrong, more weight on high noise; cut at 6,500.
$P --work "$W/s1" --steps 9000 --stop-at 6500 --wrong-motion 0.25 --logit-mean 1.0 --ship raw
# Stage 3: absolute (frame, row, column) position channels added (zero-initialised input
# weights, so the model starts out unchanged); cut at 1,000 steps.
P3=".venv/bin/python tools/pretrain_world.py --position-channels 3"
$P3 --init "$W/s1/state.pt" --work "$W/s3" --steps 3500 --stop-at 1000 --lr 5e-4 --warmup 100 \
    --wrong-motion 0.4 --logit-mean 0.8 --seed 3 --ship raw
# Stage 4: half of every batch at high noise (sigma in [0.85, 1)), where a video's direction is
# decided; the patch embedding (with the new channels) learns 4x faster.
$P3 --init "$W/s3/state.pt" --work "$W/s4" --steps 2500 --lr 5e-4 --warmup 50 --wrong-motion 0.3 \
    --logit-mean 0.8 --high-noise-frac 0.5 --embed-lr-mult 4 --seed 4 --ship raw --out "$W/model"
echo "model in $W/model (compare with flowdppo_video/world/weights/shapes-world)"
