"""TensorRT backends (``tensorrt-fp16``, ``tensorrt-fp32``): an engine built by
``flannel export tensorrt`` for one GPU architecture and TensorRT version.

    python -c "from flannel.backends.tensorrt import TensorRtBackend; help(TensorRtBackend)"

TensorRT is imported only where such a backend is configured, so CPU hosts never need it. Inputs
and outputs live in torch CUDA tensors; one execution context runs on its own CUDA stream.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from flannel import hardware
from flannel.artifacts import GraphSpec
from flannel.backends.base import BackendError


def host_problem(flags: frozenset[str] | None = None) -> str | None:
    """Why TensorRT engines cannot run here, in one line (None: they can)."""
    problem = hardware.cuda_problem()
    if problem is None:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return "the tensorrt package is not installed (install the GPU set: `make setup GPU=1`)"
    return problem


def engine_problem(name: str, entry: dict, capability: tuple[int, int] | None = None,
                   trt_version: str | None = None, device_id: int = 0) -> str | None:
    """Why the engine of ``entry`` cannot run on GPU ``device_id`` (the worker's GPU, whose
    compute capability is read unless ``capability`` is given): an engine runs only on the GPU
    architecture and TensorRT version it was built with."""
    if capability is None:
        import torch
        capability = torch.cuda.get_device_capability(int(device_id))
    if trt_version is None:
        import tensorrt
        trt_version = tensorrt.__version__
    here = f"{capability[0]}.{capability[1]}"
    built = entry.get("compute_capability")
    if built and built != here:
        return (f"the engine was built for compute capability {built} ({entry.get('gpu')}), "
                f"GPU {device_id} here is {here}: rebuild it here with `flannel export tensorrt`")
    if entry.get("tensorrt_version") and entry["tensorrt_version"] != trt_version:
        return (f"the engine was built with TensorRT {entry['tensorrt_version']}, this host has "
                f"{trt_version}: rebuild it")
    return None


def check_engine_host(name: str, entry: dict, capability: tuple[int, int] | None = None,
                      trt_version: str | None = None, device_id: int = 0) -> None:
    """``engine_problem`` as an error.

    Raises:
        BackendError: naming what the engine was built for and what this host has.
    """
    problem = engine_problem(name, entry, capability, trt_version, device_id)
    if problem:
        raise BackendError(f"backend {name}: {problem}")


def entry_problem(spec, entry: dict, flags: frozenset[str] | None = None,
                  device_id: int = 0) -> str | None:
    return engine_problem(spec.name, entry, device_id=device_id)


class TensorRtBackend:
    """One deserialised engine and execution context; batches above its profile's maximum run in
    slices."""

    def __init__(self, name: str, engine: Path | bytes, graph: GraphSpec,
                 output_names: Sequence[str], max_batch: int, device_id: int = 0) -> None:
        import tensorrt as trt
        import torch

        self.name = name
        self.device = torch.device("cuda", device_id)
        torch.cuda.set_device(self.device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        # An engine is native code: the serving path hands over bytes already checked.
        data = engine if isinstance(engine, (bytes, bytearray)) else Path(engine).read_bytes()
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(data)
        if self.engine is None:
            where = "its bytes" if isinstance(engine, (bytes, bytearray)) else engine
            raise BackendError(f"backend {name}: TensorRT cannot deserialise {where}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        self.input_name = graph.input_name
        self.graph_outputs = list(graph.output_names)
        self.output_names = list(output_names)
        self.max_batch = int(max_batch)

    def _run_chunk(self, chunk: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(chunk)).to(self.device)
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        outputs = {}
        for name in self.graph_outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=torch.float32, device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"backend {self.name}: TensorRT execution failed")
        self.stream.synchronize()
        return {n: outputs[n].cpu().numpy() for n in self.output_names}

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        parts = [self._run_chunk(batch[i:i + self.max_batch])
                 for i in range(0, len(batch), self.max_batch)]
        return {n: np.concatenate([p[n] for p in parts]) for n in self.output_names}


def load(spec, data: bytes, entry: dict, graph, outputs, threads: int, device_id: int = 0):
    return TensorRtBackend(spec.name, data, graph, outputs, entry["max_batch"],
                           device_id=int(device_id))
