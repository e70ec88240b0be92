"""Inference backends behind one interface: ``run(batch) -> {output name: array}``.

    python -c "from flannel.backends import BACKENDS; print(sorted(BACKENDS))"

One entry per backend in ``BACKENDS`` carries everything about it: the manifest artifact it
loads, its loader, the exporter that builds and gates the artifact, the gate's tolerance profile,
and its host checks (can this host run it at all, can it run this artifact, can it win here).
Export gates, the archive, serving and benchmarks all read this table; adding a backend is one
entry plus its own module. Every backend takes the served input batch (N x 1 x R x R float32 in
[0, 1]) and returns the graph's outputs by name, so answering a request does not depend on which
one runs.

| backend | artifact | runs on | written by |
| --- | --- | --- | --- |
| ort-fp32 | model.onnx | any CPU | ``flannel export all`` |
| ort-int8 | model.int8.onnx | any CPU (fast with VNNI/AMX) | ``flannel export int8`` |
| torch-bf16 | model.bf16.pt2 (AOTInductor) | CPUs with amx_bf16 or avx512_bf16 | ``flannel export compiled`` |
| torch-fp32 | model.fp32.pt2 (AOTInductor) | the CPU's instruction set | ``flannel export compiled --precision fp32`` |
| ort-cuda | model.onnx | NVIDIA GPU, the GPU set | ``flannel export cuda`` |
| tensorrt-fp16 / -fp32 | model.fp16.engine / model.fp32.engine | the GPU model it was built on | ``flannel export tensorrt`` |
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from flannel import hardware
from flannel.artifacts import (AOTI_BF16, AOTI_FP32, BF16, FP16, FP32, INT8, ONNX_FP32,
                               ONNX_FP32_CUDA, ONNX_INT8, TENSORRT_FP16, TENSORRT_FP32, GraphSpec,
                               read_artifact)
from flannel.backends import compiled, ort, tensorrt
from flannel.backends.base import Backend, BackendError, BackendSpec, private_copy
from flannel.backends.compiled import CompiledBackend
from flannel.backends.ort import OrtBackend, make_session

__all__ = ["ALIASES", "BACKENDS", "DEFAULT_BACKEND", "Backend", "BackendError", "BackendSpec",
           "CompiledBackend", "OrtBackend", "backend_spec", "check_entry_host", "load_backend",
           "make_session", "private_copy", "worth_building"]

# Names accepted in model-config.yaml; archives from before backends were named say "onnxruntime".
ALIASES = {"onnxruntime": "ort-fp32"}

BACKENDS = {s.name: s for s in (
    BackendSpec("ort-fp32", ONNX_FP32, "fp32", "onnxruntime", FP32, ort.load_cpu, "all"),
    BackendSpec("ort-int8", ONNX_INT8, "int8", "onnxruntime", INT8, ort.load_cpu, "int8",
                exporter="flannel.export.int8:export_int8", entry_problem=ort.int8_entry_problem),
    BackendSpec("torch-bf16", AOTI_BF16, "bf16", "aotinductor", BF16, compiled.load, "compiled",
                exporter="flannel.export.compiled:export_compiled",
                export_kwargs={"precision": "bf16"}, host_problem=hardware.bf16_problem,
                entry_problem=compiled.entry_problem),
    BackendSpec("torch-fp32", AOTI_FP32, "fp32", "aotinductor", FP32, compiled.load,
                "compiled --precision fp32", exporter="flannel.export.compiled:export_compiled",
                export_kwargs={"precision": "fp32"}, entry_problem=compiled.entry_problem,
                cannot_win=compiled.fp32_cannot_win),
    BackendSpec("ort-cuda", ONNX_FP32_CUDA, "fp32", "onnxruntime-cuda", FP32, ort.load_cuda,
                "cuda", exporter="flannel.export.cuda:export_cuda", device="gpu",
                host_problem=ort.cuda_problem),
    BackendSpec("tensorrt-fp16", TENSORRT_FP16, "fp16", "tensorrt", FP16, tensorrt.load,
                "tensorrt", exporter="flannel.export.tensorrt:export_tensorrt",
                export_kwargs={"precision": "fp16"}, device="gpu",
                host_problem=tensorrt.host_problem, entry_problem=tensorrt.entry_problem),
    BackendSpec("tensorrt-fp32", TENSORRT_FP32, "fp32", "tensorrt", FP32, tensorrt.load,
                "tensorrt --precision fp32", exporter="flannel.export.tensorrt:export_tensorrt",
                export_kwargs={"precision": "fp32"}, device="gpu",
                host_problem=tensorrt.host_problem, entry_problem=tensorrt.entry_problem),
)}
DEFAULT_BACKEND = "ort-fp32"


def backend_spec(name: str | None) -> BackendSpec:
    """The spec of a backend name from model-config.yaml (None: the default)."""
    key = ALIASES.get(name or DEFAULT_BACKEND, name or DEFAULT_BACKEND)
    if key not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; this version serves {sorted(BACKENDS)}")
    return BACKENDS[key]


def check_entry_host(spec: BackendSpec, entry: dict, flags: frozenset[str] | None = None,
                     device_id: int = 0) -> None:
    """The host can run ``spec`` and the artifact entry was built for a host like this one
    (instructions, software, GPU).

    Args:
        flags: CPU flags override for tests (default: this CPU's).
        device_id: the GPU a GPU backend would run on.

    Raises:
        BackendError: in one line, naming what is missing or what differs.
    """
    problem = spec.host_problem(flags) or spec.entry_problem(spec, entry, flags, device_id)
    if problem:
        raise BackendError(f"backend {spec.name}: {problem}")


def worth_building(flags: frozenset[str] | None = None) -> tuple[list[BackendSpec], list[str]]:
    """The backends with an exporter that this host can run and that can win here, and one line
    for each one left out, saying why."""
    built, skipped = [], []
    for spec in BACKENDS.values():
        if spec.exporter is None:
            continue
        why = spec.host_problem(flags) or spec.cannot_win(flags)
        if why:
            skipped.append(f"{spec.name} not built: {why}")
        else:
            built.append(spec)
    return built, skipped


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
        BackendError: the host cannot run it, or the artifact was built for another host.
        ManifestError, TrustError: the artifact's bytes are not the ones listed.
    """
    entry = manifest["artifacts"].get(spec.artifact, {})
    check_entry_host(spec, entry, device_id=device_id)
    data = (read or (lambda key: read_artifact(model_dir, manifest, key)))(spec.artifact)
    outputs = list(output_names or graph.served_outputs)
    return spec.loader(spec, data, entry, graph, outputs, intra_op_threads, device_id)
