#!/usr/bin/env bash
# One node, all its GPUs, through the DeepSpeed launcher.
#   launch/single_node.sh configs/pretrain/cclm_3m.yaml data.image_caption.shards='/data/cc3m/shard-{000000..000331}.tar' ...
# NUM_GPUS: how many processes (default: every GPU launch/gpus.sh finds). CPU runs: launch/torchrun.sh.
# MASTER_PORT: the processes' rendezvous port (default: one free when the script starts).
# To stop with a checkpoint, send SIGUSR1 to the training processes (not to the deepspeed launcher, which does not
# pass it on): they save at the next step, write <output_dir>/interrupted.json and exit; resume with resume=auto.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [key=value ...]}; shift
source "$(dirname "${BASH_SOURCE[0]}")/gpus.sh"
if [[ -z "${NUM_GPUS:-}" ]]; then
  count_gpus
  NUM_GPUS=$GPU_COUNT
  if [[ "$NUM_GPUS" -eq 0 ]]; then
    echo "single_node.sh: no GPU found ($GPU_COUNT_SOURCE); set NUM_GPUS=N, or use launch/torchrun.sh for" \
      "CPU processes" >&2
    exit 1
  fi
fi
# export NCCL_DEBUG=WARN            # verbose NCCL diagnostics
# export NCCL_IB_DISABLE=1          # no InfiniBand on this node
# Not DeepSpeed's 29500: another job on this node may hold it
if [[ -z "${MASTER_PORT:-}" ]]; then
  MASTER_PORT=$("${PYTHON:-python}" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
fi
exec deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" --module cclm.train.cli "$CONFIG" "$@"
