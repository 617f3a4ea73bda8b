#!/usr/bin/env bash
# torchrun on one node (GPUs, or CPU processes with gloo). For several nodes set NNODES, NODE_RANK and
# MASTER_ADDR on each node and run the same command there.
#   NPROC=2 launch/torchrun.sh configs/pretrain/demo.yaml train.max_steps=100
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [key=value ...]}; shift
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l); [[ "$NPROC" -gt 0 ]] || NPROC=1
fi
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m cclm.train.cli "$CONFIG" "$@"
