# Two commands do all the set-up:  `make run` (the service on the embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines take the CPU wheel of this pin (it lies on disk here); machines with an NVIDIA
# driver keep whatever CUDA build pip resolves for the project's range.
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
LIPTUNE_HOME ?= $(CURDIR)/data
WORKERS ?= 1
PORT ?= 8000

.PHONY: install install-test run demo test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

## The main job: API on 127.0.0.1:$(PORT), SQLite + local MLflow under $(LIPTUNE_HOME), local workers.
run: install
	LIPTUNE_HOME=$(LIPTUNE_HOME) $(BIN)/liptune serve --workers $(WORKERS) --port $(PORT)

## Train and certify one small model without the service.
demo: install
	LIPTUNE_HOME=$(LIPTUNE_HOME) $(BIN)/liptune demo

## Everything CI runs: system services, lint, types, the whole test suite.
test: install-test
	sh scripts/system-deps.sh
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m mypy

format: install-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install-test
	$(BIN)/python benchmarks/core_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis test-artifacts
