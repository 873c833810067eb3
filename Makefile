# Every target sets up its own environment: a fresh machine needs only Python 3.11 and pip.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint bench clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The pipeline on its embedded default (scale: demo), offline, on CPU.
demo: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

lint: install
	$(BIN)/ruff check jem pipeline stages scripts tests
	$(BIN)/lint-imports  # the layering contracts in pyproject.toml

# Two pytest-xdist workers: the tests that need the shared tiny pipeline (tests/conftest.py) wait for it
# while the others run. TEST_WORKERS=0 runs them in this one process.
TEST_WORKERS ?= 2

test: install lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

bench: install
	$(BIN)/jem-bench

# The GPU check of issue 35 (scripts/gpu_check.sh: bench, FID of 50k, a paper-scale smoke run), on a GPU
# machine's own python3; rehearsed here on the CPU: make gpu-check GPU_CHECK_ARGS="--device cpu --size tiny"
.PHONY: gpu-check
gpu-check:
	PYTHON=$(if $(wildcard $(BIN)/python),$(abspath $(BIN))/python,python3) bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)

clean-venv:
	rm -rf $(VENV)
