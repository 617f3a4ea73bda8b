#!/usr/bin/env bash
# One node, all its GPUs, through the DeepSpeed launcher.
#   launch/single_node.sh configs/pretrain/cclm_3m.yaml data.image_caption.shards='/data/cc3m/shard-{000000..000331}.tar' ...
# NUM_GPUS: how many processes (default: every GPU launch/gpus.sh finds). CPU runs: launch/torchrun.sh.
# CUDA_VISIBLE_DEVICES (what a scheduler hands out), when set, names the GPUs: the processes run on its entries
# (the first NUM_GPUS of them), passed as `--include localhost:2,3`. DeepSpeed's launcher drops
# CUDA_VISIBLE_DEVICES once it is given --num_gpus, and gives its processes GPUs 0..N-1, which may be another
# job's. GPU indexes only: for UUIDs (GPU-..., MIG-...) use launch/torchrun.sh, which keeps CUDA_VISIBLE_DEVICES
# as it is.
# MASTER_PORT: the processes' rendezvous port (default: one free when the script starts).
# To stop with a checkpoint, send SIGUSR1 to the training processes (not to the deepspeed launcher, which does not
# pass it on): they save at the next step, write <output_dir>/interrupted.json and exit; resume with resume=auto.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [key=value ...]}; shift
source "$(dirname "${BASH_SOURCE[0]}")/gpus.sh"
if [[ -z "${NUM_GPUS:-}" || -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
  count_gpus
fi
if [[ -z "${NUM_GPUS:-}" ]]; then
  NUM_GPUS=$GPU_COUNT
  if [[ "$NUM_GPUS" -eq 0 ]]; then
    echo "single_node.sh: no GPU found ($GPU_COUNT_SOURCE); set NUM_GPUS=N, or use launch/torchrun.sh for" \
      "CPU processes" >&2
    exit 1
  fi
elif [[ ! "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]]; then
  echo "single_node.sh: NUM_GPUS='$NUM_GPUS' is not a number of processes (1 or more)" >&2
  exit 2
fi
GPUS=(--num_gpus "$NUM_GPUS")
if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
  if [[ "$NUM_GPUS" -gt "$GPU_COUNT" ]]; then
    echo "single_node.sh: NUM_GPUS=$NUM_GPUS but $GPU_COUNT_SOURCE makes $GPU_COUNT GPU(s) visible: set" \
      "NUM_GPUS to $GPU_COUNT or fewer, or leave it unset" >&2
    exit 2
  fi
  IDS=()
  for entry in "${GPU_IDS[@]:0:NUM_GPUS}"; do
    if [[ ! "$entry" =~ ^[0-9]+$ ]]; then
      echo "single_node.sh: $GPU_COUNT_SOURCE names GPU $entry by its UUID, and the DeepSpeed launcher takes" \
        "GPU indexes only: use launch/torchrun.sh (torchrun keeps CUDA_VISIBLE_DEVICES as it is), or give" \
        "CUDA_VISIBLE_DEVICES as indexes (nvidia-smi -L lists them)" >&2
      exit 2
    fi
    entry=$((10#$entry))
    if [[ " ${IDS[*]-} " == *" $entry "* ]]; then
      echo "single_node.sh: $GPU_COUNT_SOURCE lists GPU $entry twice" >&2
      exit 2
    fi
    IDS+=("$entry")
  done
  # DeepSpeed's launcher gives each process CUDA_VISIBLE_DEVICES=<these ids>. It is unset for the launcher itself:
  # it would drop it anyway (saying it ignores it, as --include is given), and unset it counts the node's GPUs,
  # against which it checks the ids.
  GPUS=(--include "localhost:$(IFS=,; echo "${IDS[*]}")")
  echo "single_node.sh: $NUM_GPUS process(es) on GPU(s) ${GPUS[1]#localhost:} ($GPU_COUNT_SOURCE)" >&2
  unset CUDA_VISIBLE_DEVICES
fi
# export NCCL_DEBUG=WARN            # verbose NCCL diagnostics
# export NCCL_IB_DISABLE=1          # no InfiniBand on this node
# Not DeepSpeed's 29500: another job on this node may hold it
if [[ -z "${MASTER_PORT:-}" ]]; then
  MASTER_PORT=$("${PYTHON:-python}" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
fi
exec deepspeed "${GPUS[@]}" --master_port "$MASTER_PORT" --module cclm.train.cli "$CONFIG" "$@"
