"""Running a TensorRT engine from the archive: the ``tensorrt-fp16`` / ``tensorrt-fp32`` backends.

    python -c "from flannel.handlers.tensorrt_runtime import TensorRtBackend; help(TensorRtBackend)"

Imported only where such a backend is configured, so CPU hosts never need TensorRT. Inputs and
outputs live in torch CUDA tensors; one execution context runs on its own CUDA stream.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from flannel.artifacts import GraphSpec


def check_engine_host(name: str, entry: dict, capability: tuple[int, int] | None = None,
                      trt_version: str | None = None) -> None:
    """An engine runs only on the GPU architecture and TensorRT version it was built with.

    Raises:
        BackendError: naming what it was built for and what this host has.
    """
    from flannel.handlers.backends import BackendError

    if capability is None:
        import torch
        capability = torch.cuda.get_device_capability(0)
    if trt_version is None:
        import tensorrt
        trt_version = tensorrt.__version__
    here = f"{capability[0]}.{capability[1]}"
    built = entry.get("compute_capability")
    if built and built != here:
        raise BackendError(f"backend {name}: the engine was built for compute capability {built} "
                           f"({entry.get('gpu')}), this GPU is {here}: rebuild it here with "
                           "`flannel export tensorrt`")
    if entry.get("tensorrt_version") and entry["tensorrt_version"] != trt_version:
        raise BackendError(f"backend {name}: the engine was built with TensorRT "
                           f"{entry['tensorrt_version']}, this host has {trt_version}: rebuild it")


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
            from flannel.handlers.backends import BackendError
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
