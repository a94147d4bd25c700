# Two commands do all the set-up on a fresh clone:
#   make demo    # creates .venv if needed, then runs `locakd demo` (MNIST-1D, no download)
#   make test    # creates .venv if needed, then runs the test suite
#
# TORCH_SPEC picks the torch build installed into the venv when none is present.
# Here it resolves to a CPU wheel on local disk; elsewhere pip fetches it from PyPI
# (for a CPU-only wheel add: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= all
DEMO_ARGS ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.locakd-installed

.PHONY: setup demo test bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/locakd demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
