"""The backends `flannel bench model` measures side by side: eager PyTorch fp32 and every backend
whose artifact an export holds and this host can run (ONNX Runtime fp32 and int8, compiled
PyTorch fp32 and bf16, and on GPU hosts ONNX Runtime CUDA and TensorRT), each as a callable on the
served graph's common N x 1 x R x R input, with whether its artifact passed its gate; a backend
this host cannot run comes back with the reason instead.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from flannel.artifacts import export_dir_of, graph_spec, read_manifest
from flannel.backends import BACKENDS, BackendError, load_backend


def backend_runners(run_dir: Path, threads: int, module: torch.nn.Module | None = None
                    ) -> tuple[dict[str, tuple[Callable, str]], dict[str, str]]:
    """Name -> (run(batch), gate note) for eager fp32 and every backend this run's export offers
    and this host can run; and name -> reason for those it cannot run. ``module``: the eager
    model when the caller has loaded it already."""
    from flannel.export.sources import load_source

    export = export_dir_of(run_dir)
    manifest = read_manifest(export)
    graph = graph_spec(manifest)
    module = (module or load_source(run_dir).module).eval()
    torch.set_num_threads(threads)

    def eager(x: np.ndarray):
        with torch.no_grad():
            return module(torch.from_numpy(x))

    runners = {"eager fp32": (eager, "")}
    skipped = {}
    for spec in BACKENDS.values():
        entry = manifest["artifacts"].get(spec.artifact)
        if entry is None:
            continue
        try:
            engine = load_backend(spec, export, manifest, graph, threads)
        except BackendError as exc:
            skipped[spec.name] = str(exc)
            continue
        gate = entry.get("gate") or {}
        note = "gate passed" if gate.get("passed") else "gate FAILED" if gate else "no gate"
        runners[spec.name] = (engine.run, note)
    return runners, skipped
