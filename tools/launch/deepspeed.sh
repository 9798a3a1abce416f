#!/usr/bin/env bash
# Multi-node training with the DeepSpeed launcher (ssh to every host in the hostfile).
#   tools/launch/deepspeed.sh CONFIG [HOSTFILE] [overrides...]
#   tools/launch/deepspeed.sh configs/wan2.1_t2v_14b_multinode.yaml configs/launch/hostfile
# One node, N GPUs (or N CPU processes with gloo):   NUM_GPUS=2 tools/launch/deepspeed.sh CONFIG
set -euo pipefail
CONFIG=${1:?usage: deepspeed.sh CONFIG [HOSTFILE] [overrides...]}; shift
HOSTS=()
if [[ $# -gt 0 && -f "$1" ]]; then HOSTS=(--hostfile "$1"); shift; fi
if [[ ${#HOSTS[@]} -eq 0 ]]; then HOSTS=(--num_gpus "${NUM_GPUS:-1}"); fi
exec deepspeed "${HOSTS[@]}" --master_port "${MASTER_PORT:-29500}" --module flowdppo_video.commands.train \
    --config "$CONFIG" "$@"
