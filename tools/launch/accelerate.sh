#!/usr/bin/env bash
# Training started by accelerate (on each node, with that node's machine_rank in the config):
#   tools/launch/accelerate.sh configs/launch/accelerate_zero3.yaml CONFIG [overrides...]
set -euo pipefail
ACC=${1:?usage: accelerate.sh ACCELERATE_CONFIG CONFIG [overrides...]}; shift
CONFIG=${1:?usage: accelerate.sh ACCELERATE_CONFIG CONFIG [overrides...]}; shift
exec accelerate launch --config_file "$ACC" -m flowdppo_video.commands.train --config "$CONFIG" "$@"
