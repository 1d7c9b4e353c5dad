# Two entry points: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch; override (e.g. TORCH=torch) on a machine with a GPU.
TORCH ?= torch==2.13.0
WORKSPACE ?= workspace
PYTEST_ARGS ?=
# Test processes (pytest-xdist; a file's tests stay on one worker): 2 fits the 2-core CI machine.
TEST_WORKERS ?= 2

.PHONY: venv demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/workbench demo --workspace $(WORKSPACE)

PY_DIRS := workbench probes circuits app tests benchmarks

test: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check $(PY_DIRS)
	$(VENV)/bin/mypy
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check $(PY_DIRS) && $(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(WORKSPACE) .pytest_cache
