# One venv, one command per job. Needs only Python >= 3.11 and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install dev test lint typecheck pytest clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 needed"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

## The whole stack on this machine: Redis, a Prefect server, a worker, the MCP frontend.
dev: install
	$(BIN)/pmq dev

## Lint, type-check and the test suite (real Redis and Prefect, started by the tests).
test: lint typecheck pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .pmq-dev .mypy_cache .pytest_cache .ruff_cache
