#!/usr/bin/env bash
# Several nodes through the DeepSpeed launcher (pdsh/ssh to every host of the hostfile).
#   HOSTFILE=launch/hostfile MASTER_ADDR=node01 launch/multi_node.sh configs/pretrain/cclm_4m.yaml [key=value ...]
# MASTER_ADDR defaults to the hostfile's first host. MASTER_PORT (default 29500, which every node must agree on):
# set another when another job on the first host may hold 29500.
# Every node needs the same checkout and environment (shared filesystem or identical installs), and password-less
# ssh from the launching node; every node runs the python that runs `deepspeed` here.
# The other nodes get this shell's settings: PATH, PYTHONPATH (with the repository in front), VIRTUAL_ENV,
# CONDA_PREFIX, LD_LIBRARY_PATH, OMP_NUM_THREADS and every NCCL_*, HF_*, TRANSFORMERS_*, TOKENIZERS_*, TORCH_* and
# CCLM_* variable. They go to a temporary DeepSpeed environment file (DS_ENV_FILE, removed afterwards; nothing is
# written into the repository), after the lines of your own ~/.deepspeed_env and ./.deepspeed_env, which DeepSpeed
# would otherwise read and which it does not read when DS_ENV_FILE is set.
# To stop with a checkpoint, send SIGUSR1 to the training processes on every node (the launchers do not pass it
# on): they save at the next step, write <output_dir>/interrupted.json and exit; resume with resume=auto.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [key=value ...]}; shift
HOSTFILE=${HOSTFILE:-launch/hostfile}
[[ -f "$HOSTFILE" ]] || { echo "multi_node.sh: hostfile $HOSTFILE not found (see launch/hostfile.example)" >&2; exit 1; }
# The first host, read as DeepSpeed reads the hostfile (every line stripped, so a file saved on Windows, with
# CRLF line ends, or with blank lines first works): carriage returns are blanks here, blank and # lines skipped.
MASTER_ADDR=${MASTER_ADDR:-$(awk '{ gsub(/\r/, " ") } NF && $1 !~ /^#/ { print $1; exit }' "$HOSTFILE")}
[[ -n "$MASTER_ADDR" ]] || { echo "multi_node.sh: no host in hostfile $HOSTFILE (see launch/hostfile.example)" >&2; exit 1; }
MASTER_PORT=${MASTER_PORT:-29500}
# export NCCL_SOCKET_IFNAME=ib0   # the interface NCCL should use between nodes (forwarded like any NCCL_*)
# export NCCL_IB_HCA=mlx5         # InfiniBand adapters
# export NCCL_DEBUG=WARN

FORWARDED='^(PATH|PYTHONPATH|VIRTUAL_ENV|CONDA_PREFIX|LD_LIBRARY_PATH|OMP_NUM_THREADS|(NCCL|HF|TRANSFORMERS|TOKENIZERS|TORCH|CCLM)_[A-Za-z0-9_]*)$'

write_env_file() {
  local own name value
  for own in "${HOME:-}/.deepspeed_env" ./.deepspeed_env; do
    if [[ -f "$own" ]]; then grep -E '^[A-Za-z_][A-Za-z0-9_]*=' "$own" || true; fi
  done
  export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
  for name in $(compgen -e | grep -E "$FORWARDED" || true); do
    value=${!name}
    # DeepSpeed puts each value in double quotes on the ssh command line of every node: these would not survive
    if [[ "$value" == *[\"\$\`\\]* || "$value" == *$'\n'* ]]; then
      echo "multi_node.sh: not forwarding $name: its value holds a quote, \$, \`, \\ or a newline" >&2
      continue
    fi
    echo "$name=$value"
  done
}

DS_ENV_FILE=$(mktemp "${TMPDIR:-/tmp}/cclm-deepspeed-env.XXXXXX")
export DS_ENV_FILE
trap 'rm -f "$DS_ENV_FILE"' EXIT
write_env_file > "$DS_ENV_FILE"
echo "multi_node.sh: every node gets $(cut -d= -f1 "$DS_ENV_FILE" | sort -u | paste -sd' ')" >&2
deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --module cclm.train.cli "$CONFIG" "$@"
