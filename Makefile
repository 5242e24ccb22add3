# The README's two commands: `make run` (the main job) and `make test` (what CI runs).
VENV ?= .venv
PY := $(VENV)/bin/python
TOPOLOGY ?= topologies/local.toml

.PHONY: setup run test lint typecheck pytest clean

setup:
	@tools/scripts/bootstrap.sh

run: setup
	$(VENV)/bin/dvla up $(TOPOLOGY)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

pytest: setup
	$(PY) -m pytest -q

test: lint typecheck pytest

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
