# Developer and CI entry points. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv test lint format demo clean

venv: $(VENV)/.stamp

# Reinstall only when the dependency declarations change; the stamp records the last install.
$(VENV)/.stamp: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -c constraints.txt -e ".[dev]"
	touch $@

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest

# The end-to-end job on the built-in data: train a small model, gate, fine-tune, slim, export (offline).
demo: venv
	$(BIN)/prunekit demo --out-dir demo-run

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
