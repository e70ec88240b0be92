"""TensorRT: fp16 and fp32 engines of the served graph, for hosts with an NVIDIA GPU.

    flannel export tensorrt RUN_DIR [--precision fp16|fp32] [--max-batch 32]

TensorRT 11 builds strongly typed networks only (the FP16 builder flag is gone): an engine runs in
the precisions the ONNX graph's tensors have. So:

- fp32: the engine is built from the plain ``model.onnx`` (never the ONNX Runtime-optimised copy,
  whose fused operators are CPU-specific), with TF32 off where the version still has the flag.
- fp16: ``model.fp16.onnx`` is exported first from the same module with each learner's network in
  fp16 (fp32 in and out; preprocessing, softmax and the fusion head stay fp32, as for bf16), and
  gated on this host with ONNX Runtime against fp32 (fp16 profile). That step needs no GPU.

The engine has one optimisation profile on the input, batch 1 to ``--max-batch`` (optimised for
the archive's default batch), and is gated on the GPU against ONNX Runtime fp32 (CPU) on the
whole validation split: fp32 engines with the fp32 profile, fp16 with the looser fp16 one
(``flannel.artifacts``). Its manifest entry records the GPU, its compute capability and the
TensorRT version, because an engine only runs where it was built. Without an NVIDIA GPU (or
without the GPU set, ``make setup GPU=1``) the command stops with one line before the engine
build.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flannel.artifacts import (ARTIFACT_FILES, FP16, FP32, ONNX_FP16, ONNX_FP32, TENSORRT_FP16,
                               TENSORRT_FP32, GraphSpec, Tolerance, artifact_path, export_dir_of)
from flannel.cpus import usable_cores
from flannel.export.gate import GateInputError, gate_backend, gated_export, record_gated_artifact

log = logging.getLogger(__name__)
DEFAULT_MAX_BATCH = 32
# The batch TensorRT tunes kernels for: the archive's default batch size (handlers.archive).
DEFAULT_OPT_BATCH = 8
# Scratch memory TensorRT may use while choosing tactics.
WORKSPACE_BYTES = 2 << 30


class TensorRtError(RuntimeError):
    """The engine cannot be built: no GPU or TensorRT here, no export, or the build failed."""


@dataclass(frozen=True)
class EngineTarget:
    precision: str
    engine: str  # manifest key of the engine
    source: str  # manifest key of the ONNX graph it is built from
    backend: str
    tolerance: Tolerance


TARGETS = {t.precision: t for t in (
    EngineTarget("fp16", TENSORRT_FP16, ONNX_FP16, "tensorrt-fp16", FP16),
    EngineTarget("fp32", TENSORRT_FP32, ONNX_FP32, "tensorrt-fp32", FP32),
)}


@dataclass(frozen=True)
class EngineConfig:
    """Everything the builder is told: input, profile, precision and scratch memory."""

    precision: str
    input_name: str
    side: int
    max_batch: int
    opt_batch: int
    min_batch: int = 1
    workspace_bytes: int = WORKSPACE_BYTES

    def profile_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) shapes of the input for the one optimisation profile."""
        return tuple((b, 1, self.side, self.side)
                     for b in (self.min_batch, self.opt_batch, self.max_batch))  # type: ignore

    def to_dict(self) -> dict:
        shapes = self.profile_shapes()
        return {**asdict(self), "profile": {"min": shapes[0], "opt": shapes[1],
                                            "max": shapes[2]}}


def engine_config(graph: GraphSpec, side: int, precision: str, max_batch: int = DEFAULT_MAX_BATCH,
                  opt_batch: int = DEFAULT_OPT_BATCH) -> EngineConfig:
    """The builder configuration of one engine.

    Raises:
        TensorRtError: an unknown precision or batch bounds that are not 1 <= opt <= max.
    """
    if precision not in TARGETS:
        raise TensorRtError(f"precision {precision!r}: use one of {sorted(TARGETS)}")
    if max_batch < 1:
        raise TensorRtError(f"--max-batch must be at least 1, got {max_batch}")
    opt = min(opt_batch, max_batch)
    if opt < 1:
        raise TensorRtError(f"optimisation batch must be at least 1, got {opt_batch}")
    return EngineConfig(precision, graph.input_name, int(side), int(max_batch), int(opt))


def network_flags(trt) -> int:
    """Network creation flags: strongly typed where the version still asks for it (10.x)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def configure_builder(trt, builder, cfg: EngineConfig):
    """A builder configuration for ``cfg``: workspace limit, no TF32 for fp32, one profile."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_bytes)
    if cfg.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: TF32 keeps 10 mantissa bits
    profile = builder.create_optimization_profile()
    profile.set_shape(cfg.input_name, *cfg.profile_shapes())
    config.add_optimization_profile(profile)
    return config


def build_engine(onnx_path: Path, cfg: EngineConfig) -> bytes:
    """Parse ``onnx_path`` and build a serialised engine for ``cfg`` (needs the GPU)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRtError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    serialized = builder.build_serialized_network(network, configure_builder(trt, builder, cfg))
    if serialized is None:
        raise TensorRtError(f"TensorRT could not build an engine from {onnx_path.name} "
                            f"({cfg.to_dict()}); see its log above")
    return bytes(serialized)


def engine_host_fields() -> dict:
    """What the engine is bound to: the GPU model, its compute capability, TensorRT's version."""
    import tensorrt as trt

    major, minor = torch.cuda.get_device_capability(0)
    return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}",
            "tensorrt_version": trt.__version__}


def engine_entry_fields(cfg: EngineConfig, target: EngineTarget, host: dict) -> dict:
    """What an engine's manifest entry records besides the file and its gate: the largest batch
    (the backend slices above it), the builder configuration, the graph it was built from, and
    the GPU / compute capability / TensorRT version it is bound to (``engine_host_fields``)."""
    missing = {"gpu", "compute_capability", "tensorrt_version"} - set(host)
    if missing:
        raise TensorRtError(f"engine host fields {sorted(missing)} are missing")
    return {"max_batch": cfg.max_batch, "builder": cfg.to_dict(), "built_from": target.source,
            **host}


def export_fp16_graph(run_dir: str | Path) -> dict:
    """Write ``model.fp16.onnx`` (learners' networks in fp16) and gate it with ONNX Runtime on
    this host against fp32 (fp16 profile). Needs no GPU. Returns the gate figures."""
    from flannel.export.compiled import CompiledError, compiled_module
    from flannel.export.onnx_export import check_onnx_file, example_input, export_graph
    from flannel.export.parity import ParityError, check_source
    from flannel.export.sources import load_source
    from flannel.backends import OrtBackend

    export_dir = export_dir_of(run_dir)
    manifest, graph, spec = gated_export(export_dir, TensorRtError)
    source = load_source(run_dir, Path(manifest.get("checkpoint", "best.pt")).name)
    try:
        check_source(manifest, export_dir, source)
        module = compiled_module(source.module, torch.float16)
    except (ParityError, CompiledError) as exc:
        raise TensorRtError(str(exc)) from exc
    out = export_dir / ARTIFACT_FILES[ONNX_FP16]
    log.info("exporting %s with each learner's network in fp16", out.name)
    with torch.no_grad():
        info = export_graph(module, example_input(spec.resize), out, spec=graph,
                            opset=manifest["onnx"]["opset"])
    check_onnx_file(out, graph)
    candidate = OrtBackend("onnx-fp16", out, graph.input_name, graph.served_outputs,
                           usable_cores())
    try:
        result = gate_backend(candidate, manifest, export_dir, spec, FP16)
    except GateInputError as exc:
        raise TensorRtError(str(exc)) from exc
    record_gated_artifact(export_dir, manifest, ONNX_FP16, out, backend=None, precision="fp16",
                          runtime="onnxruntime", tolerance=FP16, gate=result,
                          onnx=info, role="source of the tensorrt-fp16 engine")
    return result


def export_tensorrt(run_dir: str | Path, precision: str = "fp16",
                    max_batch: int = DEFAULT_MAX_BATCH) -> dict:
    """Build, gate and record a TensorRT engine of the served graph.

    Returns:
        The engine's gate figures.

    Raises:
        TensorRtError: in one line, when this host has no NVIDIA GPU or no TensorRT (checked
            first), the source graph failed its own gate, or the build failed.
    """
    from flannel.backends import BACKENDS
    from flannel.backends.tensorrt import TensorRtBackend

    target = TARGETS.get(precision)
    if target is None:
        raise TensorRtError(f"precision {precision!r}: use one of {sorted(TARGETS)}")
    backend = BACKENDS[target.backend]
    problem = backend.host_problem()
    if problem:
        raise TensorRtError(f"{backend.name} not built: {problem}")
    export_dir = export_dir_of(run_dir)
    gated_export(export_dir, TensorRtError)
    if target.source == ONNX_FP16:
        source_gate = export_fp16_graph(run_dir)
        if not source_gate["passed"]:
            raise TensorRtError(f"model.fp16.onnx failed its fp16 gate "
                                f"({'; '.join(source_gate['failures'])}): no engine built")
    manifest, graph, spec = gated_export(export_dir, TensorRtError)
    cfg = engine_config(graph, spec.resize, precision, max_batch)
    onnx_path = artifact_path(export_dir, manifest, target.source)
    log.info("building the TensorRT %s engine from %s (profile %s)", precision, onnx_path.name,
             cfg.to_dict()["profile"])
    out = export_dir / ARTIFACT_FILES[target.engine]
    out.write_bytes(build_engine(onnx_path, cfg))
    candidate = TensorRtBackend(backend.name, out, graph, graph.served_outputs, cfg.max_batch)
    try:
        result = gate_backend(candidate, manifest, export_dir, spec, target.tolerance,
                              batch_size=min(16, cfg.max_batch))
    except GateInputError as exc:
        raise TensorRtError(str(exc)) from exc
    record_gated_artifact(export_dir, manifest, target.engine, out, backend=backend.name,
                          precision=precision, runtime=backend.runtime,
                          tolerance=target.tolerance, gate=result,
                          **engine_entry_fields(cfg, target, engine_host_fields()))
    return result
