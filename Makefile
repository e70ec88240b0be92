# Two entry points for a fresh machine: `make demo` (the whole pipeline) and `make test`.
# Both create .venv and install the locked dependencies first (about 6 GB, a minute or two).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lock clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv
	$(BIN)/uv pip install --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

demo: setup
	$(BIN)/flannel demo

test: setup
	$(BIN)/pytest

# Everything but the slow tests (training, export, TorchServe): seconds, for quick iteration.
test-fast: setup
	$(BIN)/pytest -m "not slow"

lock:
	$(BIN)/uv pip compile pyproject.toml --extra test -p 3.11 -o requirements.lock
