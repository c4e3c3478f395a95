# peftopt: `make demo` runs the embedded default job end to end on CPU; `make test` runs the test suite;
# `make test-fast` the inner-loop tier (unit tests and one tiny end-to-end run, a few minutes);
# `make image` builds the image users run; `make test-image` builds it and runs it (needs root for an engine).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= peftopt:$(VERSION)
# The pinned llama.cpp build lives outside the checkout so that fresh clones (CI) reuse it.
LLAMA_CPP_DIR ?= $(HOME)/.cache/peftopt/llama.cpp
export LLAMA_CPP_DIR
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install lock docs demo test test-unit test-integration test-fast test-gpu test-image image llama-cpp lint lint-docker clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, as its CPU wheel: the lock's torch is the image's CUDA build. Then exactly the locked files
# (no `pip check`: the lock is the resolution, and it overrides a few packages' own bounds on purpose).
$(VENV)/.installed: pyproject.toml docker/requirements-cpu.lock | $(BIN)/python
	@echo "installing the locked packages into $(VENV) (a few minutes the first time)"
	$(BIN)/pip install -q torch==$$(sed -n 's/^torch==\([^ ]*\).*/\1/p' requirements.lock)
	$(BIN)/pip install -q --no-deps --require-hashes -r docker/requirements-cpu.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

# Re-resolves every dependency (needs uv and the package registry); commit both lock files it writes.
lock: | $(BIN)/python
	$(BIN)/pip install -q uv==0.13.9
	UV=$(BIN)/uv bash docker/lock.sh

llama-cpp:
	bash docker/build-llama-cpp.sh $(LLAMA_CPP_DIR)

# The reference pages under docs/reference/ are generated from the code (tests/unit/test_docs.py fails when stale).
docs: install
	$(BIN)/python -m job.docgen

demo: install llama-cpp
	$(BIN)/peftopt run jobspecs/smoke.json
	$(BIN)/peftopt report runs/smoke_gemma3_270m --out runs/report
	@echo "open runs/report/report.html; run . $(VENV)/bin/activate to put peftopt on your PATH"

# The tiers are folders: tests/unit (no model: seconds), tests/integration and tests/security (a real tiny model
# through the CLI), tests/gpu (CUDA), tests/image (the built image). `make test` is what CI runs: unit, integration
# and security, one worker per CPU, each taking whole modules (a module's fixtures, a finished run, are made once).
test: install llama-cpp
	$(BIN)/python -m pytest -q -rs --durations=30 -n auto --dist loadscope tests/unit tests/integration tests/security

test-unit: install
	$(BIN)/python -m pytest -q -rs -n auto tests/unit

test-integration: install llama-cpp
	$(BIN)/python -m pytest -q -rs --durations=30 -n auto --dist loadscope tests/integration tests/security

# The inner loop: the unit tier and the one tiny end-to-end run (`smoke`), a few minutes on 2 cores.
test-fast: install llama-cpp
	$(BIN)/python -m pytest -q -rs tests/unit tests/integration/test_smoke.py

# On the GPU machine (docs/development.md): CUDA tests only.
test-gpu:
	$(PYTHON) -m pytest -q -rs tests/gpu

image:
	bash docker/build-image.sh $(IMAGE)

# Starts an engine if none answers (and stops it after), builds the image, runs it (tests/image/test_image.py).
test-image: install
	bash docker/test-image.sh $(IMAGE) $(BIN)/python

# ruff is a tool, not a dependency of peftopt: pinned here as uv is for `make lock`.
lint: install
	$(BIN)/pip install -q ruff==0.17.6
	$(BIN)/ruff check job tests bench

# No Docker engine is needed: hadolint comes from PyPI (the test extra).
lint-docker: install
	$(BIN)/hadolint --config docker/hadolint.yaml Dockerfile

clean:
	rm -rf runs .pytest_cache
