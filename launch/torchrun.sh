#!/usr/bin/env bash
# torchrun on one node: one process per GPU, or CPU processes with gloo. For several nodes set NNODES, NODE_RANK
# and MASTER_ADDR (the address of the node with NODE_RANK=0) on each node and run the same command there; they
# meet on MASTER_PORT (default 29500: set another when a job on that node may hold it).
# On one node without MASTER_PORT, torchrun's own rendezvous (--standalone) takes a free port, so that jobs sharing
# a node do not collide on one.
#   NPROC=2 launch/torchrun.sh configs/pretrain/cclm_3m.yaml data.image_caption.shards=... train.max_steps=100
#   (a runnable CPU example on the demo's world: docs/launch.md)
# Without NPROC: one process per GPU (launch/gpus.sh counts them), or 1 CPU process where there is no GPU.
# `kill -USR1 <torchrun's pid>` stops the run with a checkpoint: torchrun passes SIGUSR1 to its processes, which
# save at the next step, write <output_dir>/interrupted.json and exit; resume with resume=auto. torchrun waits
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (600 here) for that before it kills them; it then exits with status 1 and
# a SignalException traceback of its own, which is expected (interrupted.json says the processes saved).
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [key=value ...]}; shift
NNODES=${NNODES:-1}
if [[ "$NNODES" == 1 && -z "${MASTER_PORT:-}" ]]; then
  RENDEZVOUS=(--standalone)
elif [[ "$NNODES" != 1 && -z "${MASTER_ADDR:-}" ]]; then
  # 127.0.0.1 would make every node wait for a rendezvous on itself, in silence
  echo "torchrun.sh: NNODES=$NNODES but MASTER_ADDR is not set: set it on every node to the address of the node" \
    "with NODE_RANK=0" >&2
  exit 2
elif [[ "$NNODES" != 1 && -z "${NODE_RANK:-}" ]]; then
  # --node_rank 0 on every node would make each wait for the others as rank 0, then fail after 10 minutes with a
  # store timeout that does not name NODE_RANK
  echo "torchrun.sh: NNODES=$NNODES but NODE_RANK is not set: set it on every node, 0 on the node at" \
    "MASTER_ADDR=$MASTER_ADDR and 1, 2, ... on the others (a different one on each)" >&2
  exit 2
else
  RENDEZVOUS=(--master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
fi
source "$(dirname "${BASH_SOURCE[0]}")/gpus.sh"
if [[ -z "${NPROC:-}" ]]; then
  count_gpus
  NPROC=$GPU_COUNT
  if [[ "$NPROC" -eq 0 ]]; then
    NPROC=1
    echo "torchrun.sh: no GPU found ($GPU_COUNT_SOURCE): starting 1 CPU process; set NPROC=N for more" >&2
  fi
fi
# torchrun's own default handles SIGTERM, SIGINT, SIGHUP and SIGQUIT only: SIGUSR1 would kill it and leave its
# processes running on their own.
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}
exec torchrun --nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC" "${RENDEZVOUS[@]}" \
  -m cclm.train.cli "$CONFIG" "$@"
