"""int8: ONNX Runtime static quantisation of the fp32 graph, behind its own accuracy gate.

    flannel export int8 RUN_DIR [--calibration minmax|entropy|percentile] [--exclude fusion|...]

Starts from the plain ``model.onnx`` (never the ORT-optimised copy, whose fused operators are
CPU-specific), runs ONNX Runtime's shape pre-processing, then ``quantize_static`` in QDQ format
with per-channel int8 weights and uint8 activations, calibrated on a seeded, class-stratified
sample of the training split (never validation or test). Convolutions, Gemm and MatMul are
quantised; the fusion head of an ensemble (a handful of tiny ops on probabilities whose 8-bit
rounding would move every learner weight) stays fp32 by default, and depthwise convolutions can be
left fp32 too (``--exclude fusion+depthwise``).

The gate (``flannel.export.gate``, profile ``int8``) compares the served int8 backend with ONNX
Runtime fp32 on the whole validation split: top-1 agreement >= 99% and macro-F1 (against the
labels) at most 0.01 below fp32's; probability differences are recorded, not judged. The figures
go to ``onnx_int8_gate.json`` and into the manifest entry of the artifact whether it passes or
not; the archive refuses an artifact whose gate failed.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from flannel.artifacts import (INT8, ONNX_FP32, ONNX_INT8, ARTIFACT_FILES, artifact_path,
                               export_dir_of)
from flannel.cpus import usable_cores
from flannel.export.gate import (GateInputError, gate_backend, gated_export,
                                 record_gated_artifact, split_rows, split_tensors)
from flannel.export.parity import stratified_sample
from flannel.preprocess import PreprocessSpec

log = logging.getLogger(__name__)
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# Parts left in fp32, joined by "+": the ensemble's fusion head, depthwise (grouped) convolutions,
# and the learners' classifier layers (Gemm/MatMul outside the fusion).
EXCLUDE_PARTS = ("fusion", "depthwise", "heads")
QUANTIZED_OPS = ["Conv", "Gemm", "MatMul"]
FUSION_CLASS = "flannel.fusion.NeuralWeightModule"


class Int8Error(RuntimeError):
    """int8 cannot be built (no fp32 export, no training images to calibrate on)."""


@dataclass
class Int8Config:
    """How the int8 graph is built; recorded in the manifest."""

    # Measured on the real data (lite ensemble and resnet18, 114 validation images): see the
    # README; minmax keeps only ranges, so its memory does not grow with the calibration set
    # (percentile with 128 images of the 5-learner ensemble ran out of memory).
    calibration: str = "minmax"
    exclude: str = "fusion+depthwise"
    calibration_images: int = 256
    batch_size: int = 8
    seed: int = 0


def calibration_batches(manifest: dict, spec: PreprocessSpec, cfg: Int8Config) -> list[np.ndarray]:
    """Host-preprocessed batches of a seeded, class-stratified sample of the training split."""
    try:
        rows, path = split_rows(manifest, "train")
    except GateInputError as exc:
        raise Int8Error(str(exc)) from exc
    picked = stratified_sample(rows, cfg.calibration_images, cfg.seed)
    log.info("calibrating on %d training images of %s", len(picked), path)
    return [split_tensors(picked[i:i + cfg.batch_size], path, spec)
            for i in range(0, len(picked), cfg.batch_size)]


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over fixed batches."""

    def __init__(self, input_name: str, batches: list[np.ndarray]) -> None:
        self._items = iter([{input_name: b} for b in batches])

    def get_next(self):
        return next(self._items, None)


def exclude_parts(policy: str) -> set[str]:
    """The parts named by an exclude policy ("none" or parts joined by "+")."""
    parts = set() if policy == "none" else set(policy.split("+"))
    unknown = parts - set(EXCLUDE_PARTS)
    if unknown:
        raise ValueError(f"exclude policy {policy!r}: parts {sorted(unknown)} are not "
                         f"{EXCLUDE_PARTS} (or 'none')")
    return parts


def excluded_nodes(model: onnx.ModelProto, policy: str) -> list[str]:
    """Node names left in fp32 by ``policy`` (see ``EXCLUDE_PARTS``)."""
    parts = exclude_parts(policy)
    names = []
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        in_fusion = FUSION_CLASS in meta.get("pkg.torch.onnx.class_hierarchy", "")
        if in_fusion:
            if "fusion" in parts:
                names.append(node.name)
        elif "depthwise" in parts and node.op_type == "Conv" and any(
                a.name == "group" and a.i > 1 for a in node.attribute):
            names.append(node.name)
        elif "heads" in parts and node.op_type in ("Gemm", "MatMul"):
            names.append(node.name)
    return names


def quantize(fp32_path: Path, out_path: Path, input_name: str, batches: list[np.ndarray],
             cfg: Int8Config) -> dict:
    """Shape pre-processing, then QDQ static quantisation; returns what was done."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if cfg.calibration not in methods:
        raise ValueError(f"calibration {cfg.calibration!r}: use one of {CALIBRATION_METHODS}")
    with tempfile.TemporaryDirectory(prefix="flannel-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(fp32_path), str(pre))
        except Exception as exc:  # noqa: BLE001 - symbolic shape inference fails on some graphs
            log.warning("symbolic shape inference failed (%s); ONNX shape inference only", exc)
            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        model = onnx.load(str(pre))
        exclude = excluded_nodes(model, cfg.exclude)
        quantize_static(str(pre), str(out_path), _Reader(input_name, batches),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=methods[cfg.calibration],
                        op_types_to_quantize=QUANTIZED_OPS, nodes_to_exclude=exclude,
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
    quantized = sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(out_path)).graph.node)
    return {"format": "QDQ", "per_channel": True, "weights": "int8", "activations": "uint8",
            "op_types": QUANTIZED_OPS, "excluded_nodes": len(exclude),
            "quantize_linear_nodes": quantized}


def export_int8(run_dir: str | Path, cfg: Int8Config = Int8Config()) -> dict:
    """Build ``model.int8.onnx`` next to the fp32 export, gate it and record both in the manifest.

    Returns:
        The gate figures (``passed`` says whether the artifact may be archived).

    Raises:
        Int8Error: no verified fp32 export, or no split to calibrate and gate on.
    """
    from flannel.handlers.backends import BACKENDS, OrtBackend

    export_dir = export_dir_of(run_dir)
    manifest, graph, spec = gated_export(export_dir, Int8Error)
    fp32 = artifact_path(export_dir, manifest, ONNX_FP32)
    out = export_dir / ARTIFACT_FILES[ONNX_INT8]
    batches = calibration_batches(manifest, spec, cfg)
    log.info("quantising %s (calibration %s, exclude %s)", fp32.name, cfg.calibration, cfg.exclude)
    recipe = quantize(fp32, out, graph.input_name, batches, cfg)
    backend = BACKENDS["ort-int8"]
    candidate = OrtBackend(backend.name, out, graph.input_name, graph.served_outputs,
                           usable_cores())
    try:
        result = gate_backend(candidate, manifest, export_dir, spec, INT8)
    except GateInputError as exc:
        raise Int8Error(str(exc)) from exc
    record_gated_artifact(export_dir, manifest, ONNX_INT8, out, backend=backend.name,
                          precision=backend.precision, runtime=backend.runtime, tolerance=INT8,
                          gate=result, report={"config": asdict(cfg), "recipe": recipe,
                                               "calibration_split": "train"},
                          quantization={**asdict(cfg), **recipe})
    return result
