#!/usr/bin/env bash
# Distributed training with torchrun, one process per GPU.
#
#   tools/dist_train.sh CONFIG GPUS [train.py ARGS...]
#
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR and PORT (the same on every
# node). Without GPUs, GPUS CPU processes train over gloo.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 CONFIG GPUS [ARGS...]" >&2
    exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
torchrun_launch train.py "$2" "$1" "${@:3}"
