#!/usr/bin/env bash
# `make gpu-wheels`: what a GPU machine without network lacks for `make bench-gpu`, as wheels in .gpu-wheels/
# (ignored by git), at the versions this checkout's environment runs its tests with, for the GPU machine's Python
# (GPU_PYTHON_VERSION, default 3.12) on x86-64 Linux. Such a machine (PyTorch, transformers, timm, torchvision)
# lacks DeepSpeed, WebDataset, open_clip and OmegaConf, and some of what they need; timm and typing-extensions
# come along in case its own are too old (pip takes a wheel from here only when the installed version does not do).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
DEST=${GPU_WHEELS:-.gpu-wheels}
PYTHON_VERSION=${GPU_PYTHON_VERSION:-3.12}
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
BINARY=(pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson webdataset braceexpand
  open-clip-torch ftfy wcwidth omegaconf timm)

version() { "$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"; }

rm -rf "$DEST"
mkdir -p "$DEST"
pins=()
for name in "${BINARY[@]}"; do pins+=("$name==$(version "$name")"); done
"${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${pins[@]}"
# DeepSpeed is published as source only: a pure-Python wheel is built here without its C++/CUDA ops
# (DS_BUILD_OPS=0). cclm needs none of them (torch's AdamW, no DeepSpeed kernels); any other would be compiled
# on first use.
DS_BUILD_OPS=0 "${PIP[@]}" wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$(version deepspeed)"
ls -l "$DEST"
echo "gpu-wheels: $(du -sh "$DEST" | cut -f1) in $DEST; carry it to the GPU machine with the checkout, then: make bench-gpu"
