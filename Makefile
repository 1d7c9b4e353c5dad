# Two entry points: `make demo` and `make test`. Both build .venv on first use, from the committed lock.
#
# The lock (requirements/lock.txt, hashes included) pins every package CI last passed with, for CPython 3.11 on
# Linux x86_64 with the CPU build of torch. uv installs it; make bootstraps a pinned uv from PyPI into .tools/.
# `make lock` refreshes the lock, `make test-latest` runs the suite on the newest releases pyproject.toml allows.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TOOLS ?= .tools
UV_VERSION ?= 0.13.9
UV := $(TOOLS)/bin/uv
LOCK ?= requirements/lock.txt
# The lock's platform: elsewhere (another OS, CPU or Python) `make venv` installs from pyproject's ranges instead.
LOCK_PLATFORM := x86_64-manylinux_2_28
LOCK_PYTHON := 3.11
# Where the CPU build of torch comes from: pip's wheel folder when this machine configures one (PIP_FIND_LINKS or
# pip's config), else PyTorch's CPU wheel page. On a GPU machine: `make venv`, then `make gpu-torch`.
PIP_CONFIG_LINKS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
TORCH_LINKS ?= $(or $(PIP_FIND_LINKS),$(PIP_CONFIG_LINKS),https://download.pytorch.org/whl/cpu/torch/)
TORCH_INDEX ?= https://download.pytorch.org/whl/cu128
WORKSPACE ?= workspace
PYTEST_ARGS ?=
# Test processes (pytest-xdist; a file's tests stay on one worker): 2 fits the 2-core CI machine.
TEST_WORKERS ?= 2
LATEST_VENV ?= .venv-latest

.PHONY: venv demo test lint lint-imports lock test-latest gpu-torch clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install -q --disable-pip-version-check "uv==$(UV_VERSION)"

# The interpreter and platform decide between the lock and the ranges; both end with the project installed editable.
# --compile-bytecode: uv writes no .pyc by default, and where PYTHONDONTWRITEBYTECODE is set (this CI machine) no
# process ever would, so every `import torch` compiled its sources again (import time halves with them compiled).
$(VENV)/.installed: pyproject.toml $(LOCK) | $(UV)
	$(PYTHON) -m venv --clear $(VENV)
	@if $(PY) -c 'import platform, sys; sys.exit(not (sys.version_info[:2] == (3, 11) and platform.system() == "Linux" and platform.machine() == "x86_64"))'; then \
		echo "installing the locked environment ($(LOCK))"; \
		$(UV) pip sync -q --compile-bytecode --python $(PY) --require-hashes --find-links "$(TORCH_LINKS)" $(LOCK); \
	else \
		echo "note: $(LOCK) is for CPython $(LOCK_PYTHON) on Linux x86_64; installing from pyproject.toml's ranges instead"; \
		$(UV) pip install -q --compile-bytecode --python $(PY) --find-links "$(TORCH_LINKS)" "torch>=2.4" ".[dev]"; \
	fi
	$(UV) pip install -q --python $(PY) --no-deps -e .
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/workbench demo --workspace $(WORKSPACE)

PY_DIRS := workbench probes circuits app tests benchmarks
LINT_TREE := .lint-imports

# The layering contracts of pyproject's [tool.importlinter]. grimp reads packages from disk, and probes/, circuits/
# and app/ install inside workbench (package-dir), so the installed layout is laid out as links under $(LINT_TREE).
define lint_imports
	rm -rf $(LINT_TREE) && mkdir -p $(LINT_TREE)/workbench
	for entry in workbench/*; do ln -s ../../$$entry $(LINT_TREE)/workbench/; done
	for folder in probes circuits app; do ln -s ../../$$folder $(LINT_TREE)/workbench/; done
	cd $(LINT_TREE) && $(abspath $(1))/bin/lint-imports --no-cache ../pyproject.toml
endef

define run_tests
	$(1)/bin/ruff check .
	$(1)/bin/ruff format --check $(PY_DIRS)
	$(1)/bin/mypy
	$(call lint_imports,$(1))
	$(1)/bin/python -m compileall -q workbench probes circuits app tests >/dev/null  # the many test processes reuse it
	TRITON_INTERPRET=1 $(1)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 $(PYTEST_ARGS)
endef

test: venv
	$(call run_tests,$(VENV))

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check $(PY_DIRS) && $(VENV)/bin/mypy
	$(call lint_imports,$(VENV))

lint-imports: venv
	$(call lint_imports,$(VENV))

# Re-resolve every pin to the newest release the ranges allow (torch stays the CPU build), hashes included.
lock: | $(UV)
	$(UV) pip compile -q pyproject.toml --extra dev --upgrade --generate-hashes \
		--python-version $(LOCK_PYTHON) --python-platform $(LOCK_PLATFORM) \
		--find-links "$(TORCH_LINKS)" --constraint requirements/torch-cpu.txt \
		--custom-compile-command "make lock" -o $(LOCK)

# The suite on the newest releases the ranges allow, in its own venv; on failure, the packages newer than the lock.
test-latest: | $(UV)
	$(PYTHON) -m venv --clear $(LATEST_VENV)
	$(UV) pip install -q --python $(LATEST_VENV)/bin/python --upgrade --find-links "$(TORCH_LINKS)" \
		--constraint requirements/torch-cpu.txt -e ".[dev]"
	@$(MAKE) --no-print-directory _test-latest-run || { \
		$(LATEST_VENV)/bin/python requirements/newer_than_lock.py $(LOCK); exit 1; }

_test-latest-run:
	$(call run_tests,$(LATEST_VENV))

# Swap the CPU torch for a CUDA build in .venv (the rest of the lock stays).
gpu-torch: venv
	$(UV) pip install --python $(PY) --reinstall-package torch --index-url "$(TORCH_INDEX)" "torch==2.13.0"

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(TOOLS) $(WORKSPACE) .pytest_cache $(LINT_TREE)
