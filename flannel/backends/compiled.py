"""AOTInductor backends (``torch-bf16``, ``torch-fp32``): a package compiled by
``flannel export compiled``, loaded with torch alone (no training code).

    python -c "from flannel.backends.compiled import CompiledBackend; help(CompiledBackend)"
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from flannel import hardware
from flannel.artifacts import GraphSpec
from flannel.backends.base import chunks, private_copy


class CompiledBackend:
    """An AOTInductor package (``torch._inductor.aoti_load_package``). Batches above the
    compiled maximum run in slices."""

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
            for chunk in chunks(batch, self.max_batch):
                got = dict(zip(self.graph_outputs, self.runner(torch.from_numpy(chunk))))
                for n in self.output_names:
                    parts[n].append(got[n].float().numpy())
        return {n: np.concatenate(v) for n, v in parts.items()}


def load(spec, data: bytes, entry: dict, graph, outputs, threads: int, device_id: int = 0):
    with private_copy(data, ".pt2") as package:
        return CompiledBackend(spec.name, package, graph, outputs, threads,
                               entry.get("max_batch", 1))


def entry_problem(spec, entry: dict, flags: frozenset[str] | None = None,
                  device_id: int = 0) -> str | None:
    """Why this host cannot load this package: its kernels use instructions this CPU lacks
    (``isa_cpu_flags``; it would die of an illegal instruction), or another torch compiled it."""
    import torch

    missing = hardware.missing_cpu_flags(entry.get("isa_cpu_flags", ()), flags)
    if missing:
        return (f"the package was compiled for {entry.get('vec_isa')} on "
                f"{entry.get('built_on_cpu', 'another CPU')}; this CPU ({hardware.cpu_model()}) "
                f"lacks {', '.join(missing)} and would stop on an illegal instruction; re-run "
                f"`flannel export {spec.export_command}` on this host")
    built = entry.get("torch_version")
    if built and built != torch.__version__:
        return (f"the package was compiled with torch {built}, this host has {torch.__version__}; "
                f"re-run `flannel export {spec.export_command}` with this torch")
    return None


def fp32_cannot_win(flags: frozenset[str] | None = None) -> str | None:
    """AOTInductor fp32 lost to ONNX Runtime fp32, which is always built, on every CPU measured."""
    return ("AOTInductor fp32 lost to ort-fp32 on every CPU kind measured (lite ensemble, batch 8, "
            "ms per image: AMD EPYC AVX2 34.5 against 28.1, Intel Xeon AMX 52.6 against 39.7; "
            "benchmarks/README.md), and ort-fp32 is always built")
