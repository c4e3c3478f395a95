# peftopt: `make demo` runs the embedded default job end to end on CPU; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The pinned llama.cpp build lives outside the checkout so that fresh clones (CI) reuse it.
LLAMA_CPP_DIR ?= $(HOME)/.cache/peftopt/llama.cpp
export LLAMA_CPP_DIR
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-gpu llama-cpp lint lint-docker clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and pinned: otherwise pip resolves a multi-GB CUDA build on a CPU machine.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[demo,test]'
	touch $@

install: $(VENV)/.installed

llama-cpp:
	bash docker/build-llama-cpp.sh $(LLAMA_CPP_DIR)

demo: install llama-cpp
	$(BIN)/peftopt run jobspecs/smoke.json
	$(BIN)/peftopt report runs/smoke_gemma3_270m --out runs/report

test: install llama-cpp
	$(BIN)/python -m pytest -q -rs

# On the GPU machine (see README, "GPU"): CUDA tests only.
test-gpu:
	$(PYTHON) -m pytest -m gpu -q -rs

lint:
	$(BIN)/ruff check job tests

# No Docker engine is needed: hadolint comes from PyPI (the test extra).
lint-docker: install
	$(BIN)/hadolint --config docker/hadolint.yaml Dockerfile

clean:
	rm -rf runs .pytest_cache
