"""Export a learner run or an ensemble folder to one self-contained fp32 ONNX file, with its manifest.

    flannel export onnx runs/resnet18        # a learner run (best.pt)
    flannel export onnx runs/ensemble        # an ensemble folder (fusion.pt and its members)

Writes ``RUN_DIR/export/``: ``model.onnx`` (input "image" [batch, 1, R, R] in [0, 1], the common
served input of ``flannel.artifacts``; outputs per kind: "logits" and "probabilities" for a
learner, "probabilities" and "learner_weights" for an ensemble; dynamic batch),
``model.optimized.onnx`` (the same graph after ONNX Runtime's extended graph optimisations, for
the CPU provider), ``input_spec.json`` (the host preprocessing), ``index_to_name.json``,
``reference_input.npy`` (the pinned reference tensor, ``flannel.pins``) and ``manifest.json``
with the sha256 of every artifact. The torch.export-based (dynamo) exporter is used; the
TorchScript exporter is a fallback only when dynamo raises, and the manifest records which one ran
and why. The run folder itself is never deleted; only the export artifacts are overwritten.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn

from flannel.artifacts import (ANSWER_POLICY, ARTIFACT_FILES, DEFAULT_OPSET, EAGER_FP32, FP32, INDEX_TO_NAME,
                               INPUT_SPEC, LEARNER, MANIFEST_NAME, ONNX_FP32,
                               ONNX_FP32_ORT_OPTIMIZED,
                               PARITY_REPORT_NAME, REFERENCE_INPUT, GraphSpec, artifact_entry,
                               export_dir_of, graph_entry, sha256_file, write_manifest)
from flannel.checkpoint import library_versions as checkpoint_library_versions
from flannel.export.answer_policy import PolicyConfig, fit_answer_policy, policy_summary
from flannel.export.answer_report import write_answer_policy
from flannel.export.sources import ServedSource, load_source
from flannel.pins import code_pins, reference_tensor

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


def library_versions() -> dict[str, str]:
    """Versions of the libraries that produce and run the ONNX graph."""
    import onnxscript
    return {**checkpoint_library_versions(), "onnx": onnx.__version__,
            "onnxruntime": ort.__version__, "onnxscript": onnxscript.__version__}


def _export_dynamo(wrapper: nn.Module, example: torch.Tensor, path: Path, spec: GraphSpec,
                   opset: int) -> None:
    batch = torch.export.Dim(spec.batch_axis_name, min=1, max=MAX_BATCH)
    program = torch.onnx.export(
        wrapper, (example,), None, dynamo=True, opset_version=opset,
        input_names=list(spec.input_names), output_names=list(spec.output_names),
        dynamic_shapes={spec.input_name: {0: batch}}, verbose=False)
    # Saved by hand so every tensor lives inside the one .onnx file: the handler and the archive
    # ship a single file, and a missing side file would only show up at serving time.
    program.save(str(path), external_data=False)


def _export_torchscript(wrapper: nn.Module, example: torch.Tensor, path: Path, spec: GraphSpec,
                        opset: int) -> None:
    axes = {name: {0: spec.batch_axis_name} for name in (*spec.input_names, *spec.output_names)}
    with warnings.catch_warnings():
        # Choosing the legacy exporter here is deliberate (dynamo failed); its notice is noise.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(wrapper, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=list(spec.input_names),
                          output_names=list(spec.output_names), dynamic_axes=axes)


def export_graph(wrapper: nn.Module, example: torch.Tensor, path: Path, *,
                 spec: GraphSpec = LEARNER, opset: int = DEFAULT_OPSET) -> dict:
    """Export ``wrapper`` to ``path``: dynamo first, TorchScript only if dynamo raises.

    Args:
        wrapper: module in eval mode whose outputs follow ``spec.output_names``.
        example: an input batch used for tracing.
        path: destination .onnx file.
        spec: names and batch axis of the graph.
        opset: ONNX opset (18 or later).

    Returns:
        The manifest's ``onnx`` entry: opset, exporter, and the dynamo error on fallback.
    """
    info: dict = {"opset": opset, "exporter": "dynamo"}
    try:
        _export_dynamo(wrapper, example, path, spec, opset)
    except Exception as err:  # noqa: BLE001 - any dynamo failure triggers the documented fallback
        log.warning("dynamo exporter failed (%s: %s); falling back to the TorchScript exporter",
                    type(err).__name__, err)
        info["exporter"] = "torchscript"
        info["dynamo_error"] = f"{type(err).__name__}: {err}"[:2000]
        _export_torchscript(wrapper, example, path, spec, opset)
    return info


def check_onnx_file(path: Path, spec: GraphSpec = LEARNER) -> onnx.ModelProto:
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
        # From the file: the checker reads it itself instead of serialising the loaded model
        # again (tens of seconds for a gigabyte-sized ensemble).
        onnx.checker.check_model(str(path), full_check=True)
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


def _write_side_files(export_dir: Path, source: ServedSource) -> dict[str, Path]:
    files = {k: export_dir / ARTIFACT_FILES[k] for k in (INPUT_SPEC, INDEX_TO_NAME,
                                                          REFERENCE_INPUT)}
    source.input_spec.save(files[INPUT_SPEC])
    files[INDEX_TO_NAME].write_text(json.dumps({str(i): n for i, n in
                                                enumerate(source.class_names)}, indent=2) + "\n")
    np.save(files[REFERENCE_INPUT], reference_tensor(source.input_spec))
    return files


def example_input(side: int, batch: int = EXPORT_BATCH) -> torch.Tensor:
    """A seeded batch of the common input (N, 1, side, side) in [0, 1]."""
    generator = torch.Generator().manual_seed(0)
    return torch.rand(batch, 1, side, side, generator=generator)


def export_source(source: ServedSource, *, opset: int = DEFAULT_OPSET,
                  policy: PolicyConfig | None = None) -> Path:
    """Fit the answer policy into a loaded model, export it to ``source.run_dir/export`` and
    write its manifest."""
    if opset < DEFAULT_OPSET:
        raise ValueError(f"opset {opset} is below {DEFAULT_OPSET}, the minimum of the exporter")
    export_dir = export_dir_of(source.run_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    stale = export_dir / PARITY_REPORT_NAME
    if stale.exists():  # a parity report of the previous graph must not vouch for the new one
        log.info("removing the parity report of the previous export: %s", stale)
        stale.unlink()
    side = source.input_spec.resize
    log.info("fitting the answer policy of %s on its splits", source.describe())
    answer, plots = fit_answer_policy(source.module, source.split_manifest, source.input_spec,
                                      source.class_names, policy or PolicyConfig())
    policy_path = write_answer_policy(export_dir, answer, plots)
    log.info("exporting %s", source.describe())
    onnx_path = export_dir / ARTIFACT_FILES[ONNX_FP32]
    with torch.no_grad():
        onnx_info = export_graph(source.module.eval(), example_input(side), onnx_path,
                                 spec=source.graph, opset=opset)
    if onnx_path.stat().st_size >= PROTOBUF_LIMIT_BYTES:
        raise ExportError(f"{onnx_path} is over 2 GiB; it cannot be one self-contained file")
    check_onnx_file(onnx_path, source.graph)
    log.info("%s passes the ONNX checker (%s exporter, opset %d, %.1f MB)", onnx_path.name,
             onnx_info["exporter"], opset, onnx_path.stat().st_size / 1e6)
    optimized = save_ort_optimized(onnx_path, export_dir / ARTIFACT_FILES[ONNX_FP32_ORT_OPTIMIZED])
    side_files = _write_side_files(export_dir, source)
    side_files[EAGER_FP32] = export_dir / ARTIFACT_FILES[EAGER_FP32]
    side_files[ANSWER_POLICY] = policy_path
    torch.save(source.module.state_dict(), side_files[EAGER_FP32])
    runtime = {"precision": "fp32", "runtime": "onnxruntime", "tolerance_profile": FP32.name}
    artifacts = {ONNX_FP32: artifact_entry(export_dir, onnx_path, backend="ort-fp32", **runtime),
                 ONNX_FP32_ORT_OPTIMIZED: artifact_entry(export_dir, optimized, **runtime),
                 **{k: artifact_entry(export_dir, p) for k, p in side_files.items()}}
    manifest = {
        "model_name": source.model_name, "kind": source.graph.kind,
        "graph": graph_entry(source.graph, side), "class_names": list(source.class_names),
        "input": {"spec": source.input_spec.to_dict(), "artifact": INPUT_SPEC},
        "precision": "fp32", "runtime": "onnxruntime", "tolerance_profile": FP32.name,
        "members": source.members, "artifacts": artifacts, "onnx": onnx_info,
        "versions": library_versions(), "pins": code_pins(source.input_spec),
        "checkpoint": str(source.checkpoint), "checkpoint_sha256": sha256_file(source.checkpoint),
        "split_manifest": None if source.split_manifest is None else str(source.split_manifest),
        "answer_policy": policy_summary(answer),
    }
    write_manifest(export_dir, manifest)
    log.info("wrote %s with %d artifacts", export_dir / MANIFEST_NAME, len(artifacts))
    return export_dir


def export_onnx(run_dir: str | Path, *, checkpoint: str = "best.pt",
                opset: int = DEFAULT_OPSET, policy: PolicyConfig | None = None) -> Path:
    """Export a learner run or an ensemble folder to ``RUN_DIR/export``.

    Args:
        run_dir: a run folder written by ``flannel train`` or ``flannel ensemble train``.
        checkpoint: learner checkpoint file inside ``run_dir`` (ignored for an ensemble).
        opset: ONNX opset; the dynamo exporter needs 18 or later.
        policy: what the answer policy fits (calibration, operating point, coverage).

    Returns:
        The export folder.

    Raises:
        ExportError: the exported graph fails validation.
        FileNotFoundError: the checkpoint is missing.
    """
    return export_source(load_source(run_dir, checkpoint), opset=opset, policy=policy)
