"""int8: ONNX Runtime static quantisation of the fp32 graph, behind its own accuracy gate.

    flannel export int8 RUN_DIR [--calibration minmax|entropy|percentile] [--exclude fusion|...]

Starts from the plain ``model.onnx`` (never the ORT-optimised copy, whose fused operators are
CPU-specific), runs ONNX Runtime's shape pre-processing, then ``quantize_static`` in QDQ format
with per-channel int8 weights and uint8 activations, calibrated on a seeded, class-stratified
sample of the training split (never validation or test). Convolutions, Gemm and MatMul are
quantised; the fusion head of an ensemble (a handful of tiny ops on probabilities whose 8-bit
rounding would move every learner weight) stays fp32 by default, and depthwise convolutions can be
left fp32 too (``--exclude fusion+depthwise``).

The gate compares ONNX Runtime int8 with ONNX Runtime fp32 on the whole validation split: top-1
agreement >= 99% and macro-F1 (against the labels) at most 0.01 below fp32's. The figures go to
``int8_gate.json`` and into the manifest entry of the artifact whether it passes or not; the
archive refuses an artifact whose gate failed.
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from flannel.artifacts import (INPUT_SPEC, ONNX_FP32, ONNX_INT8, ARTIFACT_FILES, artifact_entry,
                               artifact_path, export_dir_of, graph_spec, verify_manifest,
                               write_manifest)
from flannel.cpus import usable_cores
from flannel.data.records import read_manifest as read_split, resolve_path
from flannel.export.parity import stratified_sample
from flannel.metrics import classification_metrics
from flannel.preprocess import PreprocessSpec, load_tensor
from flannel.handlers.backends import make_session

log = logging.getLogger(__name__)
GATE_NAME = "int8"
MIN_AGREEMENT = 0.99
MAX_MACRO_F1_DROP = 0.01
GATE_REPORT = "int8_gate.json"
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


def _split_rows(manifest: dict, split: str) -> tuple[list, Path]:
    """Rows of one split of the export's split manifest, and that manifest's path."""
    path = manifest.get("split_manifest")
    if not path or not Path(path).is_file():
        raise Int8Error(f"no split manifest recorded or found ({path}): int8 calibrates on the "
                        "training split and is gated on the validation split")
    path = Path(path)
    rows = read_split(path, split=split)
    if not rows:
        raise Int8Error(f"{path} has no {split!r} rows")
    return rows, path


def _tensors(rows: list, split_manifest: Path, spec: PreprocessSpec) -> np.ndarray:
    """The served input of each row's image, stacked."""
    return np.stack([load_tensor(resolve_path(r.path, split_manifest.parent), spec).numpy()
                     for r in rows])


def calibration_batches(manifest: dict, spec: PreprocessSpec, cfg: Int8Config) -> list[np.ndarray]:
    """Host-preprocessed batches of a seeded, class-stratified sample of the training split."""
    rows, path = _split_rows(manifest, "train")
    picked = stratified_sample(rows, cfg.calibration_images, cfg.seed)
    log.info("calibrating on %d training images of %s", len(picked), path)
    return [_tensors(picked[i:i + cfg.batch_size], path, spec)
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


def gate(fp32_path: Path, int8_path: Path, manifest: dict, spec: PreprocessSpec,
         batch_size: int = 16) -> dict:
    """ORT int8 against ORT fp32 on every validation image: agreement and macro-F1 drop."""
    graph = graph_spec(manifest)
    rows, path = _split_rows(manifest, "val")
    classes = list(manifest["class_names"])
    sessions = [make_session(p, usable_cores()) for p in (fp32_path, int8_path)]
    probs: list[list[np.ndarray]] = [[], []]
    for i in range(0, len(rows), batch_size):
        x = _tensors(rows[i:i + batch_size], path, spec)  # decoded once for both graphs
        for k, s in enumerate(sessions):
            probs[k].append(s.run([graph.decision_output], {graph.input_name: x})[0])
    p32, p8 = (np.concatenate(p) for p in probs)
    labels = np.array([classes.index(r.label) for r in rows])
    f1 = [classification_metrics(labels, p.argmax(1), classes, normal_class=None)["macro_f1"]
          for p in (p32, p8)]
    agreement = float((p32.argmax(1) == p8.argmax(1)).mean())
    out = {"name": GATE_NAME, "images": int(len(rows)), "argmax_agreement": agreement,
           "min_argmax_agreement": MIN_AGREEMENT, "macro_f1_fp32": float(f1[0]),
           "macro_f1_int8": float(f1[1]), "macro_f1_drop": float(f1[0] - f1[1]),
           "max_macro_f1_drop": MAX_MACRO_F1_DROP,
           "max_abs_prob_diff": float(np.abs(p32 - p8).max())}
    out["passed"] = agreement >= MIN_AGREEMENT and out["macro_f1_drop"] <= MAX_MACRO_F1_DROP
    return out


def export_int8(run_dir: str | Path, cfg: Int8Config = Int8Config()) -> dict:
    """Build ``model.int8.onnx`` next to the fp32 export, gate it and record both in the manifest.

    Returns:
        The gate figures (``passed`` says whether the artifact may be archived).

    Raises:
        Int8Error: no verified fp32 export, or no split to calibrate and gate on.
    """
    export_dir = export_dir_of(run_dir)
    manifest = verify_manifest(export_dir)
    if ONNX_FP32 not in manifest["artifacts"]:
        raise Int8Error(f"{export_dir} has no fp32 ONNX graph: run `flannel export onnx` first")
    graph = graph_spec(manifest)
    spec = PreprocessSpec.load(artifact_path(export_dir, manifest, INPUT_SPEC))
    fp32 = artifact_path(export_dir, manifest, ONNX_FP32)
    out = export_dir / ARTIFACT_FILES[ONNX_INT8]
    batches = calibration_batches(manifest, spec, cfg)
    log.info("quantising %s (calibration %s, exclude %s)", fp32.name, cfg.calibration, cfg.exclude)
    recipe = quantize(fp32, out, graph.input_name, batches, cfg)
    result = gate(fp32, out, manifest, spec)
    log.info("int8 gate %s: argmax agreement %.4f (>= %.2f), macro-F1 %.4f -> %.4f (drop <= %.2f) "
             "on %d validation images", "passed" if result["passed"] else "FAILED",
             result["argmax_agreement"], MIN_AGREEMENT, result["macro_f1_fp32"],
             result["macro_f1_int8"], MAX_MACRO_F1_DROP, result["images"])
    report = {"gate": result, "config": asdict(cfg), "recipe": recipe,
              "calibration_split": "train", "gate_split": "val"}
    (export_dir / GATE_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    manifest["artifacts"][ONNX_INT8] = artifact_entry(
        export_dir, out, backend="ort-int8", precision="int8", runtime="onnxruntime",
        tolerance_profile=GATE_NAME,
        gate=result, quantization={**asdict(cfg), **recipe})
    write_manifest(export_dir, manifest)
    return result
