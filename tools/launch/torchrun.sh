#!/usr/bin/env bash
# Multi-node training with torchrun: run this on every node with the same NNODES and MASTER_ADDR.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node-0 NPROC=8 tools/launch/torchrun.sh CONFIG [overrides...]
# One node: NPROC=2 tools/launch/torchrun.sh CONFIG
set -euo pipefail
CONFIG=${1:?usage: torchrun.sh CONFIG [overrides...]}; shift
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "${NPROC:-1}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m flowdppo_video.commands.train --config "$CONFIG" "$@"
