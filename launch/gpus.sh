# Sourced by launch/torchrun.sh and launch/single_node.sh. `count_gpus` sets GPU_COUNT, the number of GPUs the
# training processes of this node can use, and GPU_COUNT_SOURCE, where that number comes from (for messages):
# CUDA_VISIBLE_DEVICES when it is set (what a scheduler hands out), else the GPUs that nvidia-smi lists, else what
# torch sees (a node without nvidia-smi), else 0. GPU_IDS: the entries of CUDA_VISIBLE_DEVICES that are counted
# (indexes, or UUIDs), when the count comes from there; empty otherwise.

count_gpus() {
  local python=${PYTHON:-python}
  GPU_IDS=()
  if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    GPU_COUNT_SOURCE="CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES'"
    # As CUDA reads it: the entries up to the first invalid one (empty, negative, neither an index nor a UUID
    # GPU-... / MIG-...), which ends the list: '0,1,' is 2 GPUs, '0,-1,2' 1, '-1' and 'NoDevFiles' none.
    local devices=${CUDA_VISIBLE_DEVICES//[[:space:]]/} entry
    local -a entries
    IFS=, read -r -a entries <<< "$devices,"
    for entry in "${entries[@]}"; do
      [[ "$entry" =~ ^([0-9]+|(GPU|MIG)-[A-Za-z0-9/_-]+)$ ]] || break
      GPU_IDS+=("$entry")
    done
    GPU_COUNT=${#GPU_IDS[@]}
  elif command -v nvidia-smi > /dev/null 2>&1; then
    GPU_COUNT_SOURCE="nvidia-smi -L"
    # GPU lines only: with MIG, nvidia-smi also lists each GPU's instances on lines of their own
    GPU_COUNT=$({ nvidia-smi -L 2> /dev/null || true; } | grep -c '^GPU ' || true)
  elif command -v "$python" > /dev/null 2>&1; then
    GPU_COUNT_SOURCE="no nvidia-smi on PATH; torch.cuda.device_count() of $python"
    GPU_COUNT=$("$python" -c 'import torch; print(torch.cuda.device_count())' 2> /dev/null || echo 0)
  else
    GPU_COUNT_SOURCE="neither nvidia-smi nor $python on PATH"
    GPU_COUNT=0
  fi
}
