# Two entry points, each sets up what it needs first:
#   make sweep   - install, make the default synthetic Gemma 3n E4B twin if missing, run the sweep
#   make test    - install with test extras, run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: sweep test install install-test lint bench

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@echo "installing (llama-cpp-python compiles llama.cpp: about 3-4 minutes on 2 cores)..."
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

sweep: install
	$(BIN)/python -m harness.sweep $(ARGS)

test: install-test
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -q $(ARGS)

bench: install
	$(BIN)/python bench/suite.py $(ARGS)
