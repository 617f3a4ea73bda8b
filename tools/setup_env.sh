#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment. Idempotent: a second run returns in well under a
# second unless setup.cfg or the constraints changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP="$VENV/.cclm-installed"
if [[ -f "$STAMP" && "$STAMP" -nt setup.cfg && "$STAMP" -nt tools/constraints.txt && "$STAMP" -nt tools/setup_env.sh ]]; then
  exit 0
fi
PY=${PYTHON:-python3}
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# torch first, alone: on a CPU machine this takes the local CPU wheel; later installs are pinned to it.
"${PIP[@]}" install -q "torch==2.13.0"
"${PIP[@]}" install -q -c tools/constraints.txt setuptools wheel
"${PIP[@]}" install -q -c tools/constraints.txt --no-build-isolation -e ".[dev,demo,bench]"
"$VENV/bin/python" tools/fix_cpu_torchvision.py
"$VENV/bin/python" -c "import torch, torchvision, open_clip, transformers, deepspeed, webdataset; print('cclm env ready: torch', torch.__version__, '| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__)"
touch "$STAMP"
