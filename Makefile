# Two entry points for a fresh machine: `make demo` (the whole pipeline) and `make test`.
# Both create .venv and install the locked dependencies first (about 6 GB, a minute or two).
# GPU=1 installs the GPU set instead (requirements-gpu.lock: onnxruntime-gpu in place of
# onnxruntime, and TensorRT): `make setup GPU=1`. `make gpu-check` checks a GPU host end to end.
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
# gpu-check's own venv, so that .venv keeps its set.
GPU_VENV ?= .venv-gpu
# Non-empty where an NVIDIA GPU is visible: the driver's per-GPU folders, or nvidia-smi's list.
NVIDIA_GPUS ?= $(or $(wildcard /proc/driver/nvidia/gpus/*),$(shell nvidia-smi -L 2>/dev/null))

.PHONY: setup demo test test-fast lock gpu-check clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK) requirements-triton.lock requirements-triton-stub.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv
	$(BIN)/uv pip $(if $(wildcard $(OTHER_STAMP)),sync,install -r) $(LOCK) --python $(BIN)/python
	$(BIN)/uv pip install --python $(BIN)/python --no-deps -e .
	$(BIN)/uv pip install --python $(BIN)/python --no-deps -r requirements-triton.lock
	$(BIN)/uv pip install --python $(BIN)/python --no-deps --target $(VENV)/triton-stub-site \
		-r requirements-triton-stub.lock
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

# On a GPU host: the GPU set in $(GPU_VENV), then the GPU tests, gates and benchmarks in one
# report under runs/gpu-check/ (`flannel gpu-check --help`). Elsewhere it stops at once.
gpu-check:
	$(if $(NVIDIA_GPUS),,$(error gpu-check: no NVIDIA GPU here (no /proc/driver/nvidia/gpus, nvidia-smi lists none)))
	$(MAKE) setup GPU=1 VENV=$(GPU_VENV)
	$(GPU_VENV)/bin/flannel gpu-check
