# Two entry points for a fresh machine: `make demo` (the whole pipeline) and `make test`.
# Both create .venv and install the locked dependencies first (about 6 GB, a minute or two).
# GPU=1 installs the GPU set instead (requirements-gpu.lock: onnxruntime-gpu in place of
# onnxruntime, and TensorRT): `make setup GPU=1`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The stamp names the set installed. Installing one set removes the other's stamp, so switching
# sets reinstalls, with `uv pip sync` removing the other set's packages (onnxruntime and
# onnxruntime-gpu install the same module).
ifeq ($(GPU),1)
LOCK := requirements-gpu.lock
STAMP := $(VENV)/.installed-gpu
OTHER_STAMP := $(VENV)/.installed
else
LOCK := requirements.lock
STAMP := $(VENV)/.installed
OTHER_STAMP := $(VENV)/.installed-gpu
endif

.PHONY: setup demo test test-fast lock clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv
	$(BIN)/uv pip $(if $(wildcard $(OTHER_STAMP)),sync,install -r) $(LOCK) --python $(BIN)/python
	$(BIN)/uv pip install --python $(BIN)/python --no-deps -e .
	rm -f $(OTHER_STAMP)
	touch $(STAMP)

demo: setup
	$(BIN)/flannel demo

test: setup
	$(BIN)/pytest

# Everything but the slow tests (training, export, TorchServe): seconds, for quick iteration.
test-fast: setup
	$(BIN)/pytest -m "not slow"

# The GPU set takes the CPU set's pins for every package they share.
lock:
	$(BIN)/uv pip compile pyproject.toml --extra test --extra cpu -p 3.11 -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml --extra test --extra gpu -c requirements.lock -p 3.11 \
		-o requirements-gpu.lock
