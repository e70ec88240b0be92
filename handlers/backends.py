"""Inference backends behind one interface: ``run(batch) -> {output name: array}``.

    python -c "from flannel.handlers.backends import BACKENDS; print(sorted(BACKENDS))"

The archive's ``model-config.yaml`` names the backend (``handler.backend``) and the manifest names
the artifact it loads; the handler builds the backend once per worker with explicit thread
settings. Every backend takes the served input batch (N x 1 x R x R float32 in [0, 1]) and returns
the graph's outputs by name, so answering a request does not depend on which one runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from flannel.artifacts import ONNX_FP32, ONNX_INT8

# ONNX Runtime threads between operators: the graphs are chains of convolutions, so inter-op
# parallelism buys nothing and only competes with the intra-op pool for the cores.
INTER_OP_THREADS = 1
# Names accepted in model-config.yaml; archives from before backends were named say "onnxruntime".
ALIASES = {"onnxruntime": "ort-fp32"}


class Backend(Protocol):
    """What serving needs from an inference engine."""

    name: str

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs of the graph, by name, for one (N, 1, R, R) float32 batch."""
        ...


class BackendError(RuntimeError):
    """The configured backend is unknown, or cannot run on this machine."""


@dataclass(frozen=True)
class BackendSpec:
    """A backend: the manifest artifact it loads, how it is built, and the `flannel export`
    command that writes the artifact and runs its gate."""

    name: str
    artifact: str
    precision: str
    runtime: str
    export_command: str


def make_session(onnx_path: str | Path, intra_op_threads: int, providers: Sequence[str] = (
        "CPUExecutionProvider",)):
    """One ONNX Runtime session with explicit thread counts.

    Args:
        onnx_path: the ONNX file.
        intra_op_threads: threads inside one operator (the cores this worker may use).
        providers: execution providers, in order of preference.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(intra_op_threads)
    opts.inter_op_num_threads = INTER_OP_THREADS
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(onnx_path), sess_options=opts, providers=list(providers))


class OrtBackend:
    """ONNX Runtime on CPU: one session, every graph output requested by name."""

    def __init__(self, name: str, onnx_path: str | Path, input_name: str,
                 output_names: Sequence[str], intra_op_threads: int) -> None:
        self.name = name
        self.session = make_session(onnx_path, intra_op_threads)
        self.input_name = input_name
        self.output_names = list(output_names)
        self.intra_op_threads = int(intra_op_threads)

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, {self.input_name: batch})
        return dict(zip(self.output_names, outputs))


BACKENDS = {s.name: s for s in (
    BackendSpec("ort-fp32", ONNX_FP32, "fp32", "onnxruntime", "all"),
    BackendSpec("ort-int8", ONNX_INT8, "int8", "onnxruntime", "int8"),
)}
DEFAULT_BACKEND = "ort-fp32"


def backend_spec(name: str | None) -> BackendSpec:
    """The spec of a backend name from model-config.yaml (None: the default)."""
    key = ALIASES.get(name or DEFAULT_BACKEND, name or DEFAULT_BACKEND)
    if key not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; this version serves {sorted(BACKENDS)}")
    return BACKENDS[key]


def load_backend(spec: BackendSpec, artifact: Path, input_name: str,
                 output_names: Sequence[str], intra_op_threads: int) -> Backend:
    """Build the backend ``spec`` over its verified artifact file."""
    if spec.runtime == "onnxruntime":
        return OrtBackend(spec.name, artifact, input_name, output_names, intra_op_threads)
    raise BackendError(f"backend {spec.name}: no loader for runtime {spec.runtime}")
