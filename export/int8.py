"""int8: ONNX Runtime static quantisation of the fp32 graph, behind its own accuracy gate.

    flannel export int8 RUN_DIR [--calibration minmax|entropy|percentile] [--exclude fusion|...]
                                [--max-fp32-ops N]

Starts from the plain ``model.onnx`` (never the ORT-optimised copy, whose fused operators are
CPU-specific), runs ONNX Runtime's shape pre-processing, then ``quantize_static`` in QDQ format
with per-channel int8 weights and uint8 activations, calibrated on a seeded, class-stratified
sample of the training split (never validation or test). Convolutions, Gemm and MatMul are
quantised; the fusion head of an ensemble (a handful of tiny ops on probabilities whose 8-bit
rounding would move every learner weight) stays fp32 by default, and depthwise convolutions can be
left fp32 too (``--exclude fusion+depthwise``). Weights are 7-bit (``reduce_range``) on CPUs
without VNNI, where ONNX Runtime's u8s8 kernels can saturate 16-bit intermediate sums (its
quantisation documentation recommends this there).

When that graph fails its gate, the operators that stay fp32 are chosen by measured sensitivity
until it passes (``flannel.export.int8_search``); what stayed fp32 and why is in the manifest.

The gate (``flannel.export.gate``, profile ``int8``) compares the served int8 backend with ONNX
Runtime fp32 on the whole validation split: top-1 agreement >= 99% and macro-F1 (against the
labels) at most 0.01 below fp32's; probability differences are recorded, not judged. The figures
go to ``onnx_int8_gate.json`` and into the manifest entry of the artifact whether it passes or
not; the archive refuses an artifact whose gate failed.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from flannel.artifacts import (ONNX_FP32, ONNX_INT8, ARTIFACT_FILES, artifact_path,
                               export_dir_of)
from flannel.cpus import usable_cores
from flannel.export.gate import (GateInputError, gate_backend, gated_export,
                                 record_gated_artifact, split_rows, split_tensors)
from flannel.export.int8_search import measure_sensitivity, member_shares, search, search_members
from flannel.export.parity import stratified_sample
from flannel.preprocess import PreprocessSpec

log = logging.getLogger(__name__)
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# Parts left in fp32, joined by "+": the ensemble's fusion head, depthwise (grouped) convolutions,
# and the learners' classifier layers (Gemm/MatMul outside the fusion).
EXCLUDE_PARTS = ("fusion", "depthwise", "heads")
QUANTIZED_OPS = ["Conv", "Gemm", "MatMul"]
FUSION_CLASS = "flannel.fusion.NeuralWeightModule"
# The out-of-distribution score's distance (flannel.ood) always stays fp32: its whitening matrix
# spans orders of magnitude that one int8 scale per tensor cannot hold.
OOD_CLASS = "flannel.ood.MahalanobisDistance"
# The ensemble graph's output holding the fusion's weight of each learner (flannel.artifacts).
LEARNER_WEIGHTS = "learner_weights"


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
    # The accuracy-aware search keeps at most this many more operators fp32 (0: no search).
    max_fp32_ops: int = 32
    # Training images the sensitivity of each operator is measured on.
    sensitivity_images: int = 32
    # 7-bit weights: "auto" (on where the CPU lacks VNNI), "on" or "off".
    reduce_range: str = "auto"


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
        elif ("heads" in parts and node.op_type in ("Gemm", "MatMul")
              and OOD_CLASS not in meta.get("pkg.torch.onnx.class_hierarchy", "")):
            names.append(node.name)
    return names


def resolve_reduce_range(setting: str, flags: frozenset[str] | None = None) -> tuple[bool, str]:
    """Whether weights are 7-bit, and why, for ``setting`` ("auto", "on", "off")."""
    from flannel.backends.ort import INT8_DOT_FLAGS, int8_dot_flags

    if setting in ("on", "off"):
        return setting == "on", f"reduce_range {setting} requested"
    if setting != "auto":
        raise ValueError(f"reduce_range {setting!r}: use auto, on or off")
    dot = int8_dot_flags(flags)
    if dot:
        return False, f"auto: this CPU has {', '.join(dot)} (no u8s8 saturation), 8-bit weights"
    return True, (f"auto: this CPU has none of {', '.join(INT8_DOT_FLAGS)}, where u8s8 kernels "
                  "can saturate: 7-bit weights")


def score_nodes(model: onnx.ModelProto) -> list[str]:
    """The out-of-distribution distance's quantisable nodes (kept fp32 whatever the policy)."""
    return [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS and OOD_CLASS in
            {p.key: p.value for p in n.metadata_props}.get("pkg.torch.onnx.class_hierarchy", "")]


def policy_nodes(model: onnx.ModelProto, policy: str) -> list[dict]:
    """The nodes ``policy`` keeps fp32, and those of the out-of-distribution score, each with its
    reason."""
    kinds = {n.name: n.op_type for n in model.graph.node}
    by_policy = excluded_nodes(model, policy)
    return ([{"node": name, "op_type": kinds[name], "reason": f"policy: --exclude {policy}"}
             for name in by_policy] +
            [{"node": name, "op_type": kinds[name], "reason": "out-of-distribution score: fp32"}
             for name in score_nodes(model) if name not in by_policy])


def member_groups(model: onnx.ModelProto, manifest: dict,
                  candidates: set[str]) -> dict[str, tuple[list[str], str]]:
    """An ensemble graph's learners: name -> (its quantisable nodes among ``candidates``, the
    tensor of its probabilities, its Softmax's output). Empty for a learner graph, or where a
    learner's nodes or Softmax cannot be told apart."""
    names = [m["name"] for m in manifest.get("members", [])]
    groups: dict[str, tuple[list[str], str]] = {}
    for i, name in enumerate(names):
        scope = f"'learners.{i}'"
        nodes = [n for n in model.graph.node if scope in
                 {p.key: p.value for p in n.metadata_props}.get("pkg.torch.onnx.name_scopes", "")]
        softmax = [n.output[0] for n in nodes if n.op_type == "Softmax"]
        quantised = [n.name for n in nodes if n.name in candidates]
        if not softmax or not quantised:
            return {}
        groups[name] = (quantised, softmax[-1])
    return groups


def preprocess_graph(fp32_path: Path, out: Path) -> onnx.ModelProto:
    """ONNX Runtime's shape pre-processing of the plain graph, written to ``out``, with each
    node's exporter metadata (its module scope: which learner, the fusion head) copied back by
    node name where the pre-processing dropped it."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(fp32_path), str(out))
    except Exception as exc:  # noqa: BLE001 - symbolic shape inference fails on some graphs
        log.warning("symbolic shape inference failed (%s); ONNX shape inference only", exc)
        quant_pre_process(str(fp32_path), str(out), skip_symbolic_shape=True)
    model = onnx.load(str(out))
    scopes = {n.name: list(n.metadata_props)
              for n in onnx.load(str(fp32_path), load_external_data=False).graph.node}
    restored = 0
    for node in model.graph.node:
        if not node.metadata_props and scopes.get(node.name):
            node.metadata_props.extend(scopes[node.name])
            restored += 1
    if restored:
        onnx.save(model, str(out))
    return model


def quantize(pre: Path, out_path: Path, input_name: str, batches: list[np.ndarray],
             cfg: Int8Config, exclude: list[str], reduce_range: bool) -> dict:
    """QDQ static quantisation of the pre-processed graph ``pre`` with ``exclude`` left fp32;
    returns what was done."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if cfg.calibration not in methods:
        raise ValueError(f"calibration {cfg.calibration!r}: use one of {CALIBRATION_METHODS}")
    quantize_static(str(pre), str(out_path), _Reader(input_name, batches),
                    quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=reduce_range,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=methods[cfg.calibration],
                    op_types_to_quantize=QUANTIZED_OPS, nodes_to_exclude=exclude,
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
    quantized = sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(out_path)).graph.node)
    return {"format": "QDQ", "per_channel": True,
            "weights": "int8 (7-bit range)" if reduce_range else "int8", "activations": "uint8",
            "op_types": QUANTIZED_OPS, "excluded_nodes": len(exclude),
            "quantize_linear_nodes": quantized}


def export_int8(run_dir: str | Path, cfg: Int8Config = Int8Config()) -> dict:
    """Build ``model.int8.onnx`` next to the fp32 export, gate it and record both in the manifest.

    Returns:
        The gate figures (``passed`` says whether the artifact may be archived).

    Raises:
        Int8Error: no verified fp32 export, or no split to calibrate and gate on.
    """
    from flannel.backends import BACKENDS, OrtBackend
    from flannel.hardware import cpu_model

    export_dir = export_dir_of(run_dir)
    manifest, graph, spec = gated_export(export_dir, Int8Error)
    fp32 = artifact_path(export_dir, manifest, ONNX_FP32)
    out = export_dir / ARTIFACT_FILES[ONNX_INT8]
    batches = calibration_batches(manifest, spec, cfg)
    reduce_range, range_reason = resolve_reduce_range(cfg.reduce_range)
    backend = BACKENDS["ort-int8"]
    threads = usable_cores()
    log.info("quantising %s (calibration %s, exclude %s; %s)", fp32.name, cfg.calibration,
             cfg.exclude, range_reason)
    with tempfile.TemporaryDirectory(prefix="flannel-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        model = preprocess_graph(fp32, pre)
        policy = policy_nodes(model, cfg.exclude)
        candidates = {n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS} - {
            p["node"] for p in policy}
        recipe: dict = {}
        full = Path(tmp) / "full.onnx"

        def quantize_with(extra: list[str]) -> dict:
            recipe.clear()
            recipe.update(quantize(pre, out, graph.input_name, batches, cfg,
                                   [p["node"] for p in policy] + extra, reduce_range))
            if not extra and not full.exists():
                shutil.copyfile(out, full)  # the fully quantised graph, measured below
            return recipe

        def gate() -> dict:
            candidate = OrtBackend(backend.name, out, graph.input_name, graph.served_outputs,
                                   threads)
            try:
                return gate_backend(candidate, manifest, export_dir, spec, backend.tolerance)
            except GateInputError as exc:
                raise Int8Error(str(exc)) from exc

        sample = np.concatenate(batches)[:max(1, cfg.sensitivity_images)]
        sample = [sample[i:i + cfg.batch_size] for i in range(0, len(sample), cfg.batch_size)]

        def ranked():
            return measure_sensitivity(full, graph.input_name, sample, candidates, threads)

        result, searched, steps = search(quantize_with, gate, ranked, cfg.max_fp32_ops)
        members = member_groups(model, manifest, candidates)
        if (not result["passed"] and cfg.max_fp32_ops > 0 and members and full.exists()
                and LEARNER_WEIGHTS in graph.output_names):
            got, kept = search_members(
                quantize_with, gate, lambda: member_shares(pre, full, graph.input_name, batches,
                                                           members, LEARNER_WEIGHTS, threads),
                steps)
            if got is not None:
                result, searched = got, kept
    recipe.update({"reduce_range": reduce_range, "reduce_range_reason": range_reason,
                   "kept_fp32": policy + searched, "search": steps,
                   "quantized_candidates": len(candidates)})
    record_gated_artifact(export_dir, manifest, ONNX_INT8, out, backend=backend.name,
                          precision=backend.precision, runtime=backend.runtime,
                          tolerance=backend.tolerance, gate=result,
                          report={"config": asdict(cfg), "recipe": recipe,
                                  "calibration_split": "train"},
                          quantization={**asdict(cfg), **recipe}, built_on_cpu=cpu_model())
    return result
