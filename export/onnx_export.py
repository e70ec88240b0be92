"""Export a trained base learner to one self-contained fp32 ONNX file, with its manifest.

    flannel export onnx runs/resnet18

Reads ``RUN_DIR/best.pt`` and writes ``RUN_DIR/export/``: ``model.onnx`` (input "image"
[batch, 3, crop, crop], outputs "logits" and "probabilities" [batch, classes], dynamic batch),
``model.optimized.onnx`` (the same graph after ONNX Runtime's extended graph optimisations, for
the CPU provider), ``preprocess.json``, ``index_to_name.json`` and ``manifest.json`` with the
sha256 of every artifact. The torch.export-based (dynamo) exporter is used; the TorchScript
exporter is a fallback only when dynamo raises, and the manifest records which one ran and why.
The run folder itself is never deleted; only the export artifacts above are overwritten.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
import torch.nn as nn

from flannel.checkpoint import Checkpoint, load_checkpoint
from flannel.checkpoint import library_versions as checkpoint_library_versions
from flannel.export.manifest import (ARTIFACT_FILES, INDEX_TO_NAME, MANIFEST_NAME, ONNX_FP32,
                                     ONNX_FP32_ORT_OPTIMIZED, PARITY_REPORT_NAME, PREPROCESS,
                                     artifact_entry, export_dir_of, sha256_file, write_manifest)
from flannel.export.specs import DEFAULT_OPSET, LEARNER, OnnxSpec

log = logging.getLogger(__name__)

# The batch size traced at export. Not 1: a batch of 1 invites exporters to specialise the batch
# dimension to a constant, and parity then checks sizes other than this one (1, 3, 8).
EXPORT_BATCH = 2
# Upper bound declared for the dynamic batch dimension; serving batches are far smaller.
MAX_BATCH = 1024
# Protobuf cannot serialise one message over 2 GiB; beyond that ONNX needs external data files.
PROTOBUF_LIMIT_BYTES = 2 * 1024**3


class ExportError(RuntimeError):
    """The exported graph is invalid, not self-contained, or has the wrong names."""


class LearnerOutputs(nn.Module):
    """Wrap a classifier so the graph returns ``(logits, softmax(logits))`` over the classes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(image)
        return logits, torch.softmax(logits, dim=1)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that produce and run the ONNX graph."""
    import onnxscript
    return {**checkpoint_library_versions(), "onnx": onnx.__version__,
            "onnxruntime": ort.__version__, "onnxscript": onnxscript.__version__}


def _export_dynamo(wrapper: nn.Module, example: torch.Tensor, path: Path, spec: OnnxSpec,
                   opset: int) -> None:
    batch = torch.export.Dim(spec.batch_axis_name, min=1, max=MAX_BATCH)
    program = torch.onnx.export(
        wrapper, (example,), None, dynamo=True, opset_version=opset,
        input_names=list(spec.input_names), output_names=list(spec.output_names),
        dynamic_shapes={spec.input_names[0]: {0: batch}}, verbose=False)
    # Saved by hand so every tensor lives inside the one .onnx file: the handler and the archive
    # ship a single file, and a missing side file would only show up at serving time.
    program.save(str(path), external_data=False)


def _export_torchscript(wrapper: nn.Module, example: torch.Tensor, path: Path, spec: OnnxSpec,
                        opset: int) -> None:
    axes = {name: {0: spec.batch_axis_name} for name in (*spec.input_names, *spec.output_names)}
    with warnings.catch_warnings():
        # Choosing the legacy exporter here is deliberate (dynamo failed); its notice is noise.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(wrapper, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=list(spec.input_names),
                          output_names=list(spec.output_names), dynamic_axes=axes)


def export_graph(wrapper: nn.Module, example: torch.Tensor, path: Path, *,
                 spec: OnnxSpec = LEARNER, opset: int = DEFAULT_OPSET) -> dict:
    """Export ``wrapper`` to ``path``: dynamo first, TorchScript only if dynamo raises.

    Args:
        wrapper: module in eval mode whose outputs follow ``spec.output_names``.
        example: an input batch used for tracing.
        path: destination .onnx file.
        spec: names and batch axis of the graph.
        opset: ONNX opset (18 or later).

    Returns:
        The manifest's ``onnx`` entry: opset, exporter, names, and the dynamo error on fallback.
    """
    info: dict = {"opset": opset, "exporter": "dynamo", "input_names": list(spec.input_names),
                  "output_names": list(spec.output_names)}
    try:
        _export_dynamo(wrapper, example, path, spec, opset)
    except Exception as err:  # noqa: BLE001 - any dynamo failure triggers the documented fallback
        log.warning("dynamo exporter failed (%s: %s); falling back to the TorchScript exporter",
                    type(err).__name__, err)
        info["exporter"] = "torchscript"
        info["dynamo_error"] = f"{type(err).__name__}: {err}"[:2000]
        _export_torchscript(wrapper, example, path, spec, opset)
    return info


def check_onnx_file(path: Path, spec: OnnxSpec = LEARNER) -> onnx.ModelProto:
    """Validate an exported file: full ONNX check, no external data, names equal to the spec's.

    Returns:
        The loaded model.

    Raises:
        ExportError: naming what is wrong.
    """
    model = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in model.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ExportError(f"{path} refers to external data for {len(external)} tensors "
                          f"(first: {external[0]}); the export must be one self-contained file")
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"{path} fails the ONNX checker: {err}") from err
    inputs = tuple(i.name for i in model.graph.input)
    outputs = tuple(o.name for o in model.graph.output)
    if inputs != spec.input_names or outputs != spec.output_names:
        raise ExportError(f"{path} has inputs {inputs} and outputs {outputs}; the {spec.kind} "
                          f"spec wants {spec.input_names} and {spec.output_names}")
    return model


def save_ort_optimized(src: Path, dst: Path) -> Path:
    """Save ONNX Runtime's graph-optimised copy of ``src`` (extended level, CPU provider).

    Extended optimisations fuse nodes into ONNX Runtime contrib ops, so the copy is for ONNX
    Runtime only, and saves the optimisation work at every server start.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    if not dst.is_file():
        raise ExportError(f"ONNX Runtime did not write the optimised model {dst}")
    return dst


def _write_side_files(export_dir: Path, ckpt: Checkpoint) -> tuple[Path, Path]:
    pre = export_dir / ARTIFACT_FILES[PREPROCESS]
    ckpt.preprocess.save(pre)
    names = export_dir / ARTIFACT_FILES[INDEX_TO_NAME]
    names.write_text(json.dumps({str(i): n for i, n in enumerate(ckpt.class_names)}, indent=2)
                     + "\n")
    return pre, names


def _example_input(ckpt: Checkpoint) -> torch.Tensor:
    spec = ckpt.preprocess
    generator = torch.Generator().manual_seed(0)
    return torch.randn(EXPORT_BATCH, spec.channels, spec.crop, spec.crop, generator=generator)


def export_onnx(run_dir: str | Path, *, checkpoint: str = "best.pt",
                opset: int = DEFAULT_OPSET) -> Path:
    """Export a run's checkpoint to ``RUN_DIR/export`` and write its manifest.

    Args:
        run_dir: run folder written by ``flannel train``.
        checkpoint: checkpoint file name inside ``run_dir``.
        opset: ONNX opset; the dynamo exporter needs 18 or later.

    Returns:
        The export folder.

    Raises:
        ExportError: the exported graph fails validation.
        FileNotFoundError: the checkpoint is missing.
    """
    if opset < DEFAULT_OPSET:
        raise ValueError(f"opset {opset} is below {DEFAULT_OPSET}, the minimum of the exporter")
    run_dir = Path(run_dir)
    ckpt_path = run_dir / checkpoint
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt_path}")
    ckpt = load_checkpoint(ckpt_path)
    export_dir = export_dir_of(run_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    stale = export_dir / PARITY_REPORT_NAME
    if stale.exists():  # a parity report of the previous graph must not vouch for the new one
        log.info("removing the parity report of the previous export: %s", stale)
        stale.unlink()
    log.info("exporting %s (%d classes, input %dx%d) from %s", ckpt.arch, len(ckpt.class_names),
             ckpt.preprocess.crop, ckpt.preprocess.crop, ckpt_path)
    wrapper = LearnerOutputs(ckpt.build_model()).eval()
    onnx_path = export_dir / ARTIFACT_FILES[ONNX_FP32]
    with torch.no_grad():
        onnx_info = export_graph(wrapper, _example_input(ckpt), onnx_path, opset=opset)
    if onnx_path.stat().st_size >= PROTOBUF_LIMIT_BYTES:
        raise ExportError(f"{onnx_path} is over 2 GiB; it cannot be one self-contained file")
    check_onnx_file(onnx_path, LEARNER)
    log.info("%s passes the ONNX checker (%s exporter, opset %d, %.1f MB)", onnx_path.name,
             onnx_info["exporter"], opset, onnx_path.stat().st_size / 1e6)
    optimized = save_ort_optimized(onnx_path, export_dir / ARTIFACT_FILES[ONNX_FP32_ORT_OPTIMIZED])
    pre, names = _write_side_files(export_dir, ckpt)
    manifest = {
        "model_name": ckpt.arch, "kind": LEARNER.kind, "arch": ckpt.arch,
        "class_names": list(ckpt.class_names), "preprocess": ckpt.preprocess.to_dict(),
        "artifacts": {name: artifact_entry(export_dir, p) for name, p in
                      ((ONNX_FP32, onnx_path), (ONNX_FP32_ORT_OPTIMIZED, optimized),
                       (PREPROCESS, pre), (INDEX_TO_NAME, names))},
        "onnx": onnx_info, "versions": library_versions(),
        "checkpoint": checkpoint, "checkpoint_sha256": sha256_file(ckpt_path),
    }
    write_manifest(export_dir, manifest)
    log.info("wrote %s with %d artifacts", export_dir / MANIFEST_NAME, len(manifest["artifacts"]))
    return export_dir
