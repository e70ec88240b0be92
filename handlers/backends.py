"""Inference backends behind one interface: ``run(batch) -> {output name: array}``.

    python -c "from flannel.handlers.backends import BACKENDS; print(sorted(BACKENDS))"

The archive's ``model-config.yaml`` names the backend (``handler.backend``) and the manifest names
the artifact it loads; the handler builds the backend once per worker with explicit thread
settings. Every backend takes the served input batch (N x 1 x R x R float32 in [0, 1]) and returns
the graph's outputs by name, so answering a request does not depend on which one runs.

| backend | artifact | runs on | written by |
| --- | --- | --- | --- |
| ort-fp32 | model.onnx | any CPU | ``flannel export all`` |
| ort-int8 | model.int8.onnx | any CPU (fast with VNNI/AMX) | ``flannel export int8`` |
| torch-bf16 | model.bf16.pt2 (AOTInductor) | CPUs with amx_bf16 or avx512_bf16 | ``flannel export compiled`` |
| torch-fp32 | model.fp32.pt2 (AOTInductor) | any CPU | ``flannel export compiled --precision fp32`` |
| ort-cuda | model.onnx | NVIDIA GPU, ``gpu`` extra | ``flannel export cuda`` |
| tensorrt-fp16 / -fp32 | model.fp16.engine / model.fp32.engine | the GPU model it was built on | ``flannel export tensorrt`` |
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np

from flannel import hardware
from flannel.artifacts import (AOTI_BF16, AOTI_FP32, ONNX_FP32, ONNX_FP32_CUDA, ONNX_INT8,
                               TENSORRT_FP16, TENSORRT_FP32, GraphSpec, read_artifact)

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


def _no_problem() -> str | None:
    return None


@dataclass(frozen=True)
class BackendSpec:
    """A backend: the manifest artifact it loads, how it is built, the `flannel export` command
    that writes the artifact and runs its gate, and what the host needs to run it.

    ``host_problem()`` says in one line why this host cannot run it (None: it can).
    """

    name: str
    artifact: str
    precision: str
    runtime: str
    export_command: str
    device: str = "cpu"
    host_problem: Callable[[], str | None] = _no_problem


def _tensorrt_problem() -> str | None:
    problem = hardware.cuda_problem()
    if problem is None:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return "the tensorrt package is not installed (install the `gpu` extra)"
    return problem


def _ort_cuda_problem() -> str | None:
    import onnxruntime as ort

    problem = hardware.cuda_problem()
    if problem is None and "CUDAExecutionProvider" not in ort.get_available_providers():
        return ("this onnxruntime has no CUDAExecutionProvider: install the `gpu` extra "
                "(onnxruntime-gpu)")
    return problem


BACKENDS = {s.name: s for s in (
    BackendSpec("ort-fp32", ONNX_FP32, "fp32", "onnxruntime", "all"),
    BackendSpec("ort-int8", ONNX_INT8, "int8", "onnxruntime", "int8"),
    BackendSpec("torch-bf16", AOTI_BF16, "bf16", "aotinductor", "compiled",
                host_problem=hardware.bf16_problem),
    BackendSpec("torch-fp32", AOTI_FP32, "fp32", "aotinductor", "compiled --precision fp32"),
    BackendSpec("ort-cuda", ONNX_FP32_CUDA, "fp32", "onnxruntime-cuda", "cuda", device="gpu",
                host_problem=_ort_cuda_problem),
    BackendSpec("tensorrt-fp16", TENSORRT_FP16, "fp16", "tensorrt", "tensorrt", device="gpu",
                host_problem=_tensorrt_problem),
    BackendSpec("tensorrt-fp32", TENSORRT_FP32, "fp32", "tensorrt", "tensorrt --precision fp32",
                device="gpu", host_problem=_tensorrt_problem),
)}
DEFAULT_BACKEND = "ort-fp32"


def backend_spec(name: str | None) -> BackendSpec:
    """The spec of a backend name from model-config.yaml (None: the default)."""
    key = ALIASES.get(name or DEFAULT_BACKEND, name or DEFAULT_BACKEND)
    if key not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; this version serves {sorted(BACKENDS)}")
    return BACKENDS[key]


def make_session(onnx_path: str | Path | bytes, intra_op_threads: int, providers: Sequence = (
        "CPUExecutionProvider",)):
    """One ONNX Runtime session with explicit thread counts.

    Args:
        onnx_path: the ONNX file, or its bytes (checked bytes: nothing is read from disk; a
            graph that refers to external data cannot find any, as there is no folder).
        intra_op_threads: threads inside one operator (the cores this worker may use).
        providers: execution providers in order of preference (a name, or (name, options)).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(intra_op_threads)
    opts.inter_op_num_threads = INTER_OP_THREADS
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    model = bytes(onnx_path) if isinstance(onnx_path, (bytes, bytearray)) else str(onnx_path)
    return ort.InferenceSession(model, sess_options=opts, providers=list(providers))


class OrtBackend:
    """ONNX Runtime: one session, the requested graph outputs asked for by name."""

    def __init__(self, name: str, onnx_path: str | Path | bytes, input_name: str,
                 output_names: Sequence[str], intra_op_threads: int,
                 providers: Sequence = ("CPUExecutionProvider",)) -> None:
        self.name = name
        self.session = make_session(onnx_path, intra_op_threads, providers)
        wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
        if self.session.get_providers()[0] != wanted:
            raise BackendError(f"backend {name}: ONNX Runtime fell back to "
                               f"{self.session.get_providers()} instead of {wanted}")
        self.input_name = input_name
        self.output_names = list(output_names)
        self.intra_op_threads = int(intra_op_threads)

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, {self.input_name: batch})
        return dict(zip(self.output_names, outputs))


def _chunks(batch: np.ndarray, max_batch: int):
    for i in range(0, len(batch), max_batch):
        yield batch[i:i + max_batch]


class CompiledBackend:
    """An AOTInductor package (``torch._inductor.aoti_load_package``): only torch is needed to
    load it, not the training code. Batches above the compiled maximum run in slices."""

    def __init__(self, name: str, package: Path, graph: GraphSpec, output_names: Sequence[str],
                 intra_op_threads: int, max_batch: int) -> None:
        import torch

        torch.set_num_threads(int(intra_op_threads))
        self.name = name
        self.runner = torch._inductor.aoti_load_package(str(package))
        self.graph_outputs = list(graph.output_names)
        self.output_names = list(output_names)
        self.max_batch = int(max_batch)
        self.intra_op_threads = int(intra_op_threads)

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        parts: dict[str, list[np.ndarray]] = {n: [] for n in self.output_names}
        with torch.inference_mode():
            for chunk in _chunks(batch, self.max_batch):
                got = dict(zip(self.graph_outputs, self.runner(torch.from_numpy(chunk))))
                for n in self.output_names:
                    parts[n].append(got[n].float().numpy())
        return {n: np.concatenate(v) for n, v in parts.items()}


def check_entry_host(spec: BackendSpec, entry: dict,
                     flags: frozenset[str] | None = None) -> None:
    """The host can run ``spec`` and the artifact entry was built for software like this host's
    and, for a compiled package, for instructions this CPU has (``isa_cpu_flags``).

    Args:
        flags: CPU flags override for tests (default: this CPU's).

    Raises:
        BackendError: in one line, naming what is missing or what differs.
    """
    problem = spec.host_problem()
    if problem:
        raise BackendError(f"backend {spec.name}: {problem}")
    if spec.runtime == "aotinductor":
        import torch

        from flannel import hardware

        missing = hardware.missing_cpu_flags(entry.get("isa_cpu_flags", ()), flags)
        if missing:
            raise BackendError(
                f"backend {spec.name}: the package was compiled for {entry.get('vec_isa')} on "
                f"{entry.get('built_on_cpu', 'another CPU')}; this CPU ({hardware.cpu_model()}) "
                f"lacks {', '.join(missing)} and would stop on an illegal instruction; re-run "
                f"`flannel export {spec.export_command}` on this host")
        built = entry.get("torch_version")
        if built and built != torch.__version__:
            raise BackendError(f"backend {spec.name}: the package was compiled with torch {built}, "
                               f"this host has {torch.__version__}; re-run `flannel export "
                               f"{spec.export_command}` with this torch")
    if spec.runtime == "tensorrt":
        from flannel.handlers.tensorrt_runtime import check_engine_host
        check_engine_host(spec.name, entry)


@contextlib.contextmanager
def private_copy(data: bytes, suffix: str) -> Iterator[Path]:
    """``data`` in a file of its own for a runtime that loads only from a path (AOTInductor):
    a fresh folder only this account may enter (``mkdtemp``, 0700), the file created there
    exclusively with mode 0600, and both removed afterwards. Between the check of ``data`` and
    the load, only a process of this same account could change the file.
    """
    folder = tempfile.mkdtemp(prefix="flannel-load-")
    path = Path(folder) / f"artifact{suffix}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                     0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def load_backend(spec: BackendSpec, model_dir: str | Path, manifest: dict, graph: GraphSpec,
                 intra_op_threads: int, output_names: Sequence[str] | None = None,
                 device_id: int = 0, read: Callable[[str], bytes] | None = None) -> Backend:
    """Build the backend ``spec`` from its artifact's checked bytes.

    Args:
        spec: the backend.
        model_dir: the export folder or unpacked archive holding the manifest's files.
        manifest: its manifest.
        graph: the graph's names.
        intra_op_threads: CPU threads for this worker's inference.
        output_names: outputs to return (default: ``graph.served_outputs``).
        device_id: the GPU of a GPU backend (TorchServe's ``gpu_id`` for this worker).
        read: an artifact key -> its bytes, checked as they are read (the worker's trust list,
            ``flannel.handlers.trust``); default: checked against ``manifest``. The runtime loads
            those bytes, so native code (a compiled package, an engine) runs only after its check.

    Raises:
        BackendError: the host cannot run it, or the artifact was built for another runtime.
        ManifestError, TrustError: the artifact's bytes are not the ones listed.
    """
    entry = manifest["artifacts"].get(spec.artifact, {})
    check_entry_host(spec, entry)
    data = (read or (lambda key: read_artifact(model_dir, manifest, key)))(spec.artifact)
    outputs = list(output_names or graph.served_outputs)
    if spec.runtime == "onnxruntime":
        return OrtBackend(spec.name, data, graph.input_name, outputs, intra_op_threads)
    if spec.runtime == "onnxruntime-cuda":
        return OrtBackend(spec.name, data, graph.input_name, outputs, intra_op_threads,
                          providers=(("CUDAExecutionProvider", {"device_id": int(device_id)}),
                                     "CPUExecutionProvider"))
    if spec.runtime == "aotinductor":
        with private_copy(data, ".pt2") as package:
            return CompiledBackend(spec.name, package, graph, outputs, intra_op_threads,
                                   entry.get("max_batch", 1))
    if spec.runtime == "tensorrt":
        from flannel.handlers.tensorrt_runtime import TensorRtBackend
        return TensorRtBackend(spec.name, data, graph, outputs, entry["max_batch"],
                               device_id=int(device_id))
    raise BackendError(f"backend {spec.name}: no loader for runtime {spec.runtime}")
