#!/usr/bin/env bash
# Distributed evaluation with torchrun, one process per GPU.
#
#   tools/dist_test.sh CONFIG CHECKPOINT GPUS [test.py ARGS...]
#
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR and PORT (the same on every
# node). Without GPUs, GPUS CPU processes evaluate over gloo.
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 CONFIG CHECKPOINT GPUS [ARGS...]" >&2
    exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
torchrun_launch test.py "$3" "$1" "$2" "${@:4}"
