# Every target installs what it needs (tools/setup_env.sh is idempotent and fast once done).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: env test lint demo bench bench-eval bench-data bench-train bench-easy-vqa bench-recipes bench-translate gpu-wheels bench-gpu clean

env:
	@VENV=$(VENV) bash tools/setup_env.sh

# Chromium for the search page's screenshot test: instant when present; where it cannot be installed (no root, no
# Debian registry) the installer says why and that test is skipped.
test: env
	@bash tools/install_chromium.sh || echo "make test: no Chromium; the search-page screenshot test will be skipped" >&2
	$(PY) -m pytest $(PYTEST_ARGS)

lint: env
	$(PY) -m ruff check cclm data_prep tests benchmarks tools
	$(PY) -m ruff format --check cclm data_prep tests benchmarks tools

demo: env
	$(PY) -m cclm.demo --output-dir demo_output

bench: bench-eval bench-data bench-train bench-recipes bench-translate

bench-eval: env
	$(PY) benchmarks/bench_eval.py

bench-data: env
	$(PY) benchmarks/bench_data.py

bench-easy-vqa: env
	$(PY) benchmarks/bench_easy_vqa.py

bench-train: env
	$(PY) benchmarks/bench_train.py

bench-recipes: env
	$(PY) benchmarks/bench_recipes.py

# cclm prep translate on CPU: random Marian models (tiny and Marian-base size), batched vs a naive loop; ~4 min.
bench-translate: env
	$(PY) benchmarks/bench_translate.py

# Where there is network: the wheels a GPU machine without network lacks, into .gpu-wheels/ (docs/performance.md).
gpu-wheels: env
	@VENV=$(VENV) bash tools/gpu_wheels.sh

# On the GPU machine (no venv needed: its python3 has CUDA PyTorch): install from .gpu-wheels/, the GPU smoke tests,
# then benchmarks/bench_gpu.py, appending to benchmarks/RESULTS.md; under 8 minutes. BENCH_GPU_OUT=DIR copies results.
bench-gpu:
	@bash tools/bench_gpu.sh

clean:
	rm -rf demo_output .pytest_cache build *.egg-info
