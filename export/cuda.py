"""ort-cuda: the fp32 ONNX graph on ONNX Runtime's CUDA execution provider, gated on the GPU.

    flannel export cuda RUN_DIR

The artifact is the same ``model.onnx`` that passed parity on CPU; the CUDA kernels are another
runtime, so they get their own gate (fp32 profile, whole validation split, against ONNX Runtime
on CPU) and their own manifest entry (``onnx_fp32_cuda``) recording the GPU it ran on. Without an
NVIDIA GPU and onnxruntime-gpu (the GPU set, ``make setup GPU=1``) the command stops with one
line.
"""
from __future__ import annotations

from pathlib import Path

from flannel.artifacts import FP32, ONNX_FP32, ONNX_FP32_CUDA, artifact_path, export_dir_of
from flannel.cpus import usable_cores
from flannel.export.gate import GateInputError, gate_backend, gated_export, record_gated_artifact


class CudaError(RuntimeError):
    """No GPU or no CUDA provider here, or no fp32 export to run."""


def export_cuda(run_dir: str | Path) -> dict:
    """Gate ``model.onnx`` on the CUDA execution provider and record the ``ort-cuda`` entry.

    Raises:
        CudaError: in one line, when the host cannot run it (checked first).
    """
    import torch

    from flannel.backends import BACKENDS, OrtBackend

    backend = BACKENDS["ort-cuda"]
    problem = backend.host_problem()
    if problem:
        raise CudaError(f"{backend.name} not gated: {problem}")
    export_dir = export_dir_of(run_dir)
    manifest, graph, spec = gated_export(export_dir, CudaError)
    path = artifact_path(export_dir, manifest, ONNX_FP32)
    candidate = OrtBackend(backend.name, path, graph.input_name, graph.served_outputs,
                           usable_cores(), providers=("CUDAExecutionProvider",
                                                      "CPUExecutionProvider"))
    try:
        result = gate_backend(candidate, manifest, export_dir, spec, FP32)
    except GateInputError as exc:
        raise CudaError(str(exc)) from exc
    record_gated_artifact(export_dir, manifest, ONNX_FP32_CUDA, path, backend=backend.name,
                          precision="fp32", runtime=backend.runtime, tolerance=FP32, gate=result,
                          gpu=torch.cuda.get_device_name(0))
    return result
