"""What every inference backend shares: the ``Backend`` interface, its spec and its error.

    python -c "from flannel.backends.base import BackendSpec; help(BackendSpec)"
"""
from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np

from flannel.artifacts import Tolerance


class Backend(Protocol):
    """What serving needs from an inference engine."""

    name: str

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs of the graph, by name, for one (N, 1, R, R) float32 batch."""
        ...


class BackendError(RuntimeError):
    """The configured backend is unknown, or cannot run on this machine."""


def no_problem(*_args, **_kwargs) -> str | None:
    return None


@dataclass(frozen=True, eq=False)
class BackendSpec:
    """One backend, everything about it in one entry (``flannel.backends.BACKENDS``).

    Attributes:
        name: the name in model-config.yaml, the archive CLI and benchmarks.
        artifact: the manifest key of the file it loads.
        precision, runtime, device: what it computes in, with what, on what ("cpu" or "gpu").
        tolerance: the gate profile the artifact passes before it may be archived.
        loader: ``(spec, data, entry, graph, outputs, threads, device_id) -> Backend``, from
            the artifact's checked bytes and its manifest entry.
        exporter: ``"module:function"`` that builds, gates and records the artifact
            (``function(run_dir, **export_kwargs) -> gate figures``); None for the reference
            graph every gate compares with (``flannel export all``).
        export_command: the ``flannel export`` words that run ``exporter``.
        host_problem: ``(flags=None) -> str | None``: why this host (or a CPU with ``flags``)
            cannot run the backend at all.
        entry_problem: ``(spec, entry, flags, device_id) -> str | None``: why this host cannot
            run this particular artifact (built for other instructions, software or GPU).
        cannot_win: ``(flags) -> str | None``: why building it on this CPU cannot pay (what was
            measured says it loses to a backend that is built anyway); None: worth building.
    """

    name: str
    artifact: str
    precision: str
    runtime: str
    tolerance: Tolerance
    loader: Callable
    export_command: str
    exporter: str | None = None
    export_kwargs: dict = field(default_factory=dict)
    device: str = "cpu"
    host_problem: Callable[..., str | None] = no_problem
    entry_problem: Callable[..., str | None] = no_problem
    cannot_win: Callable[..., str | None] = no_problem

    def export(self, run_dir: str | Path, **overrides) -> dict:
        """Build, gate and record this backend's artifact for ``run_dir``; the gate figures."""
        if self.exporter is None:
            raise BackendError(f"backend {self.name} is the reference graph: run "
                               f"`flannel export {self.export_command}`")
        module, _, function = self.exporter.partition(":")
        build = getattr(importlib.import_module(module), function)
        return build(run_dir, **{**self.export_kwargs, **overrides})


def chunks(batch: np.ndarray, max_batch: int):
    """``batch`` in slices of at most ``max_batch`` images."""
    for i in range(0, len(batch), max_batch):
        yield batch[i:i + max_batch]


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
