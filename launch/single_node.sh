#!/usr/bin/env bash
# One node, all its GPUs, through the DeepSpeed launcher.
#   launch/single_node.sh configs/pretrain/cclm_3m.yaml data.image_caption.shards=/data/cc3m/{000000..000331}.tar ...
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [key=value ...]}; shift
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[[ "$NUM_GPUS" -gt 0 ]] || { echo "no GPU found; set NUM_GPUS or use launch/torchrun.sh for CPU runs" >&2; exit 1; }
# export NCCL_DEBUG=WARN            # verbose NCCL diagnostics
# export NCCL_IB_DISABLE=1          # no InfiniBand on this node
exec deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" --module cclm.train.cli "$CONFIG" "$@"
