"""compiled: the served graph as an AOTInductor package, bf16 with channels_last or fp32.

    flannel export compiled RUN_DIR                     # torch-bf16: AMX / AVX-512-BF16 CPUs only
    flannel export compiled RUN_DIR --precision fp32    # torch-fp32: any CPU

``torch.export`` captures the same module the ONNX graph came from (the checkpoint is checked
against the manifest first) with a dynamic batch axis from 1 to ``--max-batch``, and
``torch._inductor.aoti_compile_and_package`` compiles it, with weights frozen into the package,
into one ``.pt2`` file that ``aoti_load_package`` loads with torch alone (no training code).

bf16: each learner's network runs in bf16 with channels_last; its in-graph preprocessing
(resize, crop, normalisation), the softmax and the ensemble's fusion head stay fp32, so only the
convolutions, where AMX is fast, lose precision. On a CPU without native bf16 (neither amx_bf16 nor
avx512_bf16) bf16 kernels are emulated and 13-18x slower than fp32; the command stops with one line
instead of building it.

The package is gated like every backend (``flannel.export.gate``) against ONNX Runtime fp32 on the
whole validation split, with the bf16 or fp32 tolerance profile.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from flannel import hardware
from flannel.artifacts import (AOTI_BF16, AOTI_FP32, ARTIFACT_FILES, BF16, FP32, Tolerance,
                               export_dir_of)
from flannel.cpus import usable_cores
from flannel.export.gate import GateInputError, gate_backend, gated_export, record_gated_artifact
from flannel.graphs import LearnerGraph

log = logging.getLogger(__name__)
# The largest batch the package accepts in one call; the backend slices larger ones. TorchServe
# batches are 8 by default; 32 leaves room for the benchmarks' batch sizes.
DEFAULT_MAX_BATCH = 32
# Inductor settings: freezing folds BatchNorm into the convolutions and pre-packs the weights
# for oneDNN, which is most of the gain over eager on CPU.
INDUCTOR_CONFIGS = {"freezing": True}


class CompiledError(RuntimeError):
    """The package cannot be built here (no fp32 export, no native bf16, no compiler)."""


@dataclass(frozen=True)
class CompiledTarget:
    """One precision: the artifact key, its backend and tolerance profile, and the dtype."""

    precision: str
    artifact: str
    backend: str
    tolerance: Tolerance
    dtype: torch.dtype


TARGETS = {t.precision: t for t in (
    CompiledTarget("bf16", AOTI_BF16, "torch-bf16", BF16, torch.bfloat16),
    CompiledTarget("fp32", AOTI_FP32, "torch-fp32", FP32, torch.float32),
)}


class CastNetwork(nn.Module):
    """A learner's network in ``dtype`` and channels_last, with fp32 in and out."""

    def __init__(self, network: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.network = network.to(dtype=dtype, memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
        return self.network(x).float()


def compiled_module(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of a served module (learner or ensemble) whose learners' networks run in ``dtype``
    with channels_last; preprocessing, softmax and fusion stay as they are."""
    module = copy.deepcopy(module).eval()
    learners = [m for m in module.modules() if isinstance(m, LearnerGraph)]
    if not learners:
        raise CompiledError(f"{type(module).__name__} holds no LearnerGraph to compile")
    for learner in learners:
        learner.model = CastNetwork(learner.model, dtype)
    return module


def export_program(module: nn.Module, side: int, max_batch: int) -> torch.export.ExportedProgram:
    """``torch.export`` of ``module`` on (N, 1, side, side) with N dynamic in [1, max_batch]."""
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    example = torch.rand(min(2, max_batch), 1, side, side)
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes=({0: batch},))


def compile_package(program: torch.export.ExportedProgram, path: Path) -> Path:
    """AOTInductor-compile ``program`` into the package ``path`` (a C++ compiler is needed)."""
    path.unlink(missing_ok=True)
    try:
        with torch.no_grad():
            torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                     inductor_configs=INDUCTOR_CONFIGS)
    except Exception as exc:  # noqa: BLE001 - inductor raises many kinds (C++ compile, codegen)
        raise CompiledError(f"AOTInductor could not compile the graph: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                            ) from exc
    return path


def export_compiled(run_dir: str | Path, precision: str = "bf16",
                    max_batch: int = DEFAULT_MAX_BATCH,
                    flags: frozenset[str] | None = None) -> dict:
    """Compile the served graph to ``model.<precision>.pt2``, gate it and record it.

    Args:
        run_dir: a learner run or ensemble folder with a verified fp32 export.
        precision: "bf16" (torch-bf16) or "fp32" (torch-fp32).
        max_batch: the largest batch one call of the package takes.
        flags: CPU flags override for tests (default: this CPU's).

    Returns:
        The gate figures (``passed`` says whether the package may be archived).

    Raises:
        CompiledError: bf16 on a CPU without native bf16, no fp32 export, or compilation failed.
    """
    from flannel.export.parity import ParityError, check_source
    from flannel.export.sources import load_source
    from flannel.backends import BACKENDS, CompiledBackend

    if precision not in TARGETS:
        raise CompiledError(f"precision {precision!r}: use one of {sorted(TARGETS)}")
    target = TARGETS[precision]
    if precision == "bf16" and (problem := hardware.bf16_problem(flags)):
        raise CompiledError(f"torch-bf16 not built: {problem}")
    if max_batch < 1:
        raise CompiledError(f"--max-batch must be at least 1, got {max_batch}")
    export_dir = export_dir_of(run_dir)
    manifest, graph, spec = gated_export(export_dir, CompiledError)
    source = load_source(run_dir, Path(manifest.get("checkpoint", "best.pt")).name)
    try:
        check_source(manifest, export_dir, source)
    except ParityError as exc:
        raise CompiledError(str(exc)) from exc
    torch.set_num_threads(usable_cores())
    module = compiled_module(source.module, target.dtype)
    out = export_dir / ARTIFACT_FILES[target.artifact]
    started = time.perf_counter()
    log.info("torch.export of %s %s (%s, channels_last, batch 1..%d)", graph.kind,
             manifest["model_name"], precision, max_batch)
    program = export_program(module, spec.resize, max_batch)
    log.info("AOTInductor compiling %s (this takes a minute or more per learner on 2 cores)",
             out.name)
    compile_package(program, out)
    seconds = time.perf_counter() - started
    log.info("compiled %s in %.0f s (%.1f MB)", out.name, seconds, out.stat().st_size / 1e6)
    # The instructions the package's kernels use: a host without them refuses it by name
    # (flannel.backends.check_entry_host) instead of dying on the first batch.
    vec_isa, isa_flags = hardware.compiled_isa()
    backend = BACKENDS[target.backend]
    candidate = CompiledBackend(backend.name, out, graph, graph.served_outputs, usable_cores(),
                                max_batch)
    try:
        result = gate_backend(candidate, manifest, export_dir, spec, target.tolerance,
                              batch_size=min(16, max_batch))
    except GateInputError as exc:
        raise CompiledError(str(exc)) from exc
    record_gated_artifact(
        export_dir, manifest, target.artifact, out, backend=backend.name,
        precision=precision, runtime=backend.runtime, tolerance=target.tolerance, gate=result,
        report={"compile_seconds": seconds, "cpu": hardware.cpu_model()},
        max_batch=int(max_batch), torch_version=torch.__version__, channels_last=True,
        inductor_configs=INDUCTOR_CONFIGS, built_on_cpu=hardware.cpu_model(),
        vec_isa=vec_isa, isa_cpu_flags=isa_flags,
        requires_cpu_flags=list(hardware.NATIVE_BF16_FLAGS) if precision == "bf16" else [])
    return result
