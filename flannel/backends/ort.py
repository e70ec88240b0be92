"""ONNX Runtime backends: ``ort-fp32`` and ``ort-int8`` on CPU, ``ort-cuda`` on an NVIDIA GPU.

    python -c "from flannel.backends.ort import OrtBackend; help(OrtBackend)"
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from flannel import hardware
from flannel.backends.base import BackendError

# ONNX Runtime threads between operators: the graphs are chains of convolutions, so inter-op
# parallelism buys nothing and only competes with the intra-op pool for the cores.
INTER_OP_THREADS = 1


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


def cuda_providers(device_id: int) -> tuple:
    return (("CUDAExecutionProvider", {"device_id": int(device_id)}), "CPUExecutionProvider")


def load_cpu(spec, data: bytes, entry: dict, graph, outputs, threads: int, device_id: int = 0):
    return OrtBackend(spec.name, data, graph.input_name, outputs, threads)


def load_cuda(spec, data: bytes, entry: dict, graph, outputs, threads: int, device_id: int = 0):
    return OrtBackend(spec.name, data, graph.input_name, outputs, threads,
                      providers=cuda_providers(device_id))


def cuda_problem(flags: frozenset[str] | None = None) -> str | None:
    """Why ``ort-cuda`` cannot run here, in one line (None: it can)."""
    problem = hardware.cuda_problem()
    if problem is None:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return ("this onnxruntime has no CUDAExecutionProvider: install the GPU set "
                    "(`make setup GPU=1`: onnxruntime-gpu instead of onnxruntime)")
    return problem


# CPU flags of int8 dot-product instructions. Without them ONNX Runtime's u8s8 kernels add pairs
# of products in 16 bits, which can saturate where 8-bit weights meet large activations.
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def int8_dot_flags(flags: frozenset[str] | None = None) -> list[str]:
    """The flags of ``INT8_DOT_FLAGS`` this CPU (or ``flags``) has."""
    flags = hardware.cpu_flags() if flags is None else flags
    return [f for f in INT8_DOT_FLAGS if f in flags]


def int8_entry_problem(spec, entry: dict, flags: frozenset[str] | None = None,
                       device_id: int = 0) -> str | None:
    """An int8 graph with 8-bit weights was gated on the kernels of a CPU with VNNI or AMX int8;
    on a CPU without them the sums can saturate, so that gate says nothing about this host."""
    quantization = entry.get("quantization") or {}
    if quantization.get("reduce_range", True) or int8_dot_flags(flags):
        return None
    return (f"the int8 graph has 8-bit weights and passed its gate on {entry.get('built_on_cpu')} "
            f"(int8 dot-product instructions); this CPU ({hardware.cpu_model()}) has none of "
            f"{', '.join(INT8_DOT_FLAGS)}, where its sums can saturate: re-run "
            f"`flannel export {spec.export_command}` on this host")
