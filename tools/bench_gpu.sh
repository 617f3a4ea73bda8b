#!/usr/bin/env bash
# `make bench-gpu`, on a GPU machine without network, in under 8 minutes: installs what the machine lacks from
# .gpu-wheels/ (made beforehand by `make gpu-wheels` where there is network), runs the GPU smoke tests
# (pytest -m gpu), then benchmarks/bench_gpu.py, which appends its figures to benchmarks/RESULTS.md.
# GPU_PYTHON: the interpreter with CUDA PyTorch (default python3); BENCH_GPU_OUT=DIR: also copy the results and
# both logs there (for a machine whose checkout does not come back). Exit status: the smoke tests' if they
# failed, else the benchmark's (the benchmark runs either way).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.gpu-wheels}
BUDGET_S=${BENCH_GPU_BUDGET_S:-450}
COPY=${BENCH_GPU_OUT:-}
LOGS=${COPY:-benchmarks/work}
start=$SECONDS
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false DS_BUILD_OPS=0
mkdir -p "$LOGS"

if ! "$PY" -c 'import deepspeed, webdataset, open_clip, omegaconf' >/dev/null 2>&1; then
  if [[ ! -d $WHEELS ]]; then
    echo "bench-gpu: $WHEELS is missing: run 'make gpu-wheels' on a machine with network first" >&2
    exit 2
  fi
  "$PY" -m pip install -q --disable-pip-version-check --no-index --find-links "$WHEELS" \
    deepspeed webdataset open_clip_torch omegaconf || exit 2
fi
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "bench-gpu: no CUDA device")' || exit 2
echo "bench-gpu: environment ready after $((SECONDS - start)) s"

mapfile -t gpu_tests < <(grep -l 'pytest.mark.gpu' tests/test_*.py)
"$PY" -m pytest -m gpu -q -p no:cacheprovider "${gpu_tests[@]}" 2>&1 | tee "$LOGS/gpu_smoke.log"
smoke_status=${PIPESTATUS[0]}
smoke=$(grep -E '[0-9]+ (passed|failed|error|skipped)' "$LOGS/gpu_smoke.log" | tail -n 1 | tr -d '=' | xargs)
echo "bench-gpu: smoke tests done after $((SECONDS - start)) s: ${smoke:-no summary}"

"$PY" benchmarks/bench_gpu.py --smoke "${smoke:-no summary (exit $smoke_status)}" \
  --budget-s $((BUDGET_S - (SECONDS - start))) ${COPY:+--copy-to "$COPY"} 2>&1 | tee "$LOGS/bench_gpu.log"
bench_status=${PIPESTATUS[0]}
echo "bench-gpu: done after $((SECONDS - start)) s"
if [[ $smoke_status -ne 0 ]]; then exit "$smoke_status"; fi
exit "$bench_status"
