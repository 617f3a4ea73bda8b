#!/usr/bin/env bash
# Several nodes through the DeepSpeed launcher (pdsh/ssh to every host of the hostfile).
#   HOSTFILE=launch/hostfile MASTER_ADDR=node01 launch/multi_node.sh configs/pretrain/cclm_4m.yaml [key=value ...]
# Every node needs the same checkout and environment (shared filesystem or identical installs), and password-less
# ssh from the launching node. Variables listed in .deepspeed_env (KEY=VALUE lines, in the working directory or
# $HOME) are exported on every node; this script writes the NCCL and Python settings there.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [key=value ...]}; shift
HOSTFILE=${HOSTFILE:-launch/hostfile}
[[ -f "$HOSTFILE" ]] || { echo "hostfile $HOSTFILE not found (see launch/hostfile.example)" >&2; exit 1; }
MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
MASTER_PORT=${MASTER_PORT:-29500}
{
  echo "PYTHONPATH=$(pwd)"
  echo "PATH=$PATH"
  # echo "NCCL_SOCKET_IFNAME=ib0"   # the interface NCCL should use between nodes
  # echo "NCCL_IB_HCA=mlx5"         # InfiniBand adapters
  # echo "NCCL_DEBUG=WARN"
} > .deepspeed_env
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --module cclm.train.cli "$CONFIG" "$@"
