"""The accuracy gate every non-reference backend passes before it may be archived.

    python -c "from flannel.export.gate import gate_backend; help(gate_backend)"

The candidate runs through the same ``Backend`` object the handler serves with, and ONNX Runtime
fp32 on the plain ``model.onnx`` (itself held to the eager checkpoint by the parity gate) is the
reference. Both see every image of the validation split, preprocessed once on the host. The
artifact's tolerance profile (``flannel.artifacts.TOLERANCES``: fp32, bf16, fp16, int8) decides:

- values: every served output (probabilities, an ensemble's learner weights) within atol/rtol,
  where the profile judges values (int8 records them only);
- decisions: top-1 agreement with the reference at least ``min_argmax_agreement``;
- accuracy: macro-F1 against the labels at most ``max_macro_f1_drop`` below the reference's.

The figures go into the artifact's manifest entry and ``<artifact>_gate.json`` whether the gate
passes or fails; the archive refuses an artifact whose gate failed.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from flannel.artifacts import (INPUT_SPEC, OOD_PASS_LIMIT, ONNX_FP32, GraphSpec, Tolerance,
                               artifact_entry, artifact_path, graph_spec, relative_diff,
                               verify_manifest, write_manifest)
from flannel.cpus import usable_cores
from flannel.data.records import read_manifest as read_split, resolve_path
from flannel.metrics import classification_metrics
from flannel.preprocess import PreprocessSpec, load_tensor

log = logging.getLogger(__name__)
GATE_SPLIT = "val"


class GateInputError(RuntimeError):
    """The export records no split to gate (or calibrate) on, or the split is empty."""


def gated_export(export_dir: Path, error: type[Exception] = GateInputError
                 ) -> tuple[dict, GraphSpec, PreprocessSpec]:
    """The verified manifest, graph names and input spec of an export that has the fp32 ONNX
    graph every gate takes as its reference.

    Raises:
        ``error``: the export has no fp32 ONNX graph.
        ManifestError: an artifact does not match its sha256.
    """
    manifest = verify_manifest(export_dir)
    if ONNX_FP32 not in manifest["artifacts"]:
        raise error(f"{export_dir} has no fp32 ONNX graph (every backend's gate compares with "
                    "it): run `flannel export all` first")
    spec = PreprocessSpec.load(artifact_path(export_dir, manifest, INPUT_SPEC))
    return manifest, graph_spec(manifest), spec


def split_rows(manifest: dict, split: str) -> tuple[list, Path]:
    """Rows of one split of the export's split manifest, and that manifest's path."""
    path = manifest.get("split_manifest")
    if not path or not Path(path).is_file():
        raise GateInputError(f"no split manifest recorded or found ({path}): backends are gated on "
                             "the validation split (and int8 calibrates on the training split)")
    path = Path(path)
    rows = read_split(path, split=split)
    if not rows:
        raise GateInputError(f"{path} has no {split!r} rows")
    return rows, path


def split_tensors(rows: list, split_manifest: Path, spec: PreprocessSpec) -> np.ndarray:
    """The served input of each row's image, stacked."""
    return np.stack([load_tensor(resolve_path(r.path, split_manifest.parent), spec).numpy()
                     for r in rows])


def judge(tolerance: Tolerance, ref: dict[str, np.ndarray], got: dict[str, np.ndarray],
          decision: str, labels: np.ndarray, classes: list[str],
          scores: tuple[str, ...] = ()) -> dict:
    """The gate's figures and verdict for reference and candidate outputs of the same images.

    ``scores`` name unbounded outputs (the out-of-distribution score), judged on
    ``relative_diff``; their pass-or-fail agreement at 1 is recorded.
    """
    failures = []
    values = {}
    for name in ref:
        diff = np.abs(got[name].astype(np.float64) - ref[name].astype(np.float64))
        if name in scores:
            diff = relative_diff(diff, ref[name])
        ok = tolerance.values_pass(diff, 0.0 if name in scores else ref[name])
        values[name] = {"max_abs_diff": float(diff.max()) if diff.size else 0.0,
                        "within_tolerance": ok if tolerance.atol is not None else None}
        if name in scores:
            values[name]["diff"] = "relative to max(1, |reference|)"
            values[name]["pass_agreement"] = float(np.mean((got[name] <= OOD_PASS_LIMIT)
                                                           == (ref[name] <= OOD_PASS_LIMIT)))
        if not ok:
            failures.append(f"{name}: max abs diff {values[name]['max_abs_diff']:.3g} > atol "
                            f"{tolerance.atol:g} + rtol {tolerance.rtol:g}")
    agreement = float((ref[decision].argmax(1) == got[decision].argmax(1)).mean())
    if agreement < tolerance.min_argmax_agreement:
        failures.append(f"argmax agreement {agreement:.4f} < {tolerance.min_argmax_agreement}")
    f1_ref, f1_got = (classification_metrics(labels, p[decision].argmax(1), classes,
                                             normal_class=None)["macro_f1"] for p in (ref, got))
    drop = float(f1_ref - f1_got)
    if tolerance.max_macro_f1_drop is not None and drop > tolerance.max_macro_f1_drop:
        failures.append(f"macro-F1 drop {drop:.4f} > {tolerance.max_macro_f1_drop}")
    return {"name": tolerance.name, "images": int(len(labels)), "reference": "ort-fp32",
            "argmax_agreement": agreement,
            "min_argmax_agreement": tolerance.min_argmax_agreement,
            "macro_f1_reference": float(f1_ref), "macro_f1_candidate": float(f1_got),
            "macro_f1_drop": drop, "max_macro_f1_drop": tolerance.max_macro_f1_drop,
            "atol": tolerance.atol, "rtol": tolerance.rtol, "values": values,
            "max_abs_diff": max(v["max_abs_diff"] for v in values.values()),
            "failures": failures, "passed": not failures}


def gate_backend(candidate, manifest: dict, export_dir: Path, spec: PreprocessSpec,
                 tolerance: Tolerance, batch_size: int = 16) -> dict:
    """Run ``candidate`` (a ``Backend``) and ORT fp32 on the whole validation split and judge it.

    Returns:
        The figures (``passed`` says whether the artifact may be archived).

    Raises:
        GateInputError: no validation split is recorded.
    """
    from flannel.backends import OrtBackend

    graph = graph_spec(manifest)
    rows, path = split_rows(manifest, GATE_SPLIT)
    classes = list(manifest["class_names"])
    outputs = list(graph.served_outputs)
    reference = OrtBackend("ort-fp32", artifact_path(export_dir, manifest, ONNX_FP32),
                           graph.input_name, outputs, usable_cores())
    ref: dict[str, list] = {n: [] for n in outputs}
    got: dict[str, list] = {n: [] for n in outputs}
    for i in range(0, len(rows), batch_size):
        x = split_tensors(rows[i:i + batch_size], path, spec)  # decoded once for both
        for acc, engine in ((ref, reference), (got, candidate)):
            out = engine.run(x)
            for n in outputs:
                acc[n].append(np.asarray(out[n], dtype=np.float32))
    labels = np.array([classes.index(r.label) for r in rows])
    result = judge(tolerance, {n: np.concatenate(v) for n, v in ref.items()},
                   {n: np.concatenate(v) for n, v in got.items()}, graph.decision_output,
                   labels, classes, graph.score_outputs)
    result["split"] = GATE_SPLIT
    log.info("%s gate %s on %d validation images: argmax agreement %.4f (>= %g), macro-F1 %.4f -> "
             "%.4f (drop <= %s), max abs diff %.3g%s", tolerance.name,
             "passed" if result["passed"] else "FAILED", result["images"],
             result["argmax_agreement"], tolerance.min_argmax_agreement,
             result["macro_f1_reference"], result["macro_f1_candidate"],
             tolerance.max_macro_f1_drop, result["max_abs_diff"],
             "" if result["passed"] else f" ({'; '.join(result['failures'])})")
    return result


def gate_report_name(artifact_key: str) -> str:
    return f"{artifact_key}_gate.json"


def record_gated_artifact(export_dir: Path, manifest: dict, key: str, path: Path, *, backend: str,
                          precision: str, runtime: str, tolerance: Tolerance, gate: dict,
                          report: dict | None = None, **fields) -> dict:
    """Write ``<key>_gate.json`` and the artifact's manifest entry (sha256, backend, precision,
    tolerance profile and the gate it passed or failed). Returns the entry."""
    (export_dir / gate_report_name(key)).write_text(
        json.dumps({"gate": gate, **(report or {})}, indent=2) + "\n")
    entry = artifact_entry(export_dir, path, backend=backend, precision=precision,
                           runtime=runtime, tolerance_profile=tolerance.name, gate=gate, **fields)
    manifest["artifacts"][key] = entry
    write_manifest(export_dir, manifest)
    return entry


def format_gate(backend: str, gate: dict) -> str:
    """One line for the CLI."""
    line = (f"{backend} gate ({gate['name']}) {'passed' if gate['passed'] else 'FAILED'}: argmax "
            f"agreement {gate['argmax_agreement']:.4f} (>= {gate['min_argmax_agreement']}), "
            f"macro-F1 {gate['macro_f1_reference']:.4f} -> {gate['macro_f1_candidate']:.4f}, "
            f"max abs diff {gate['max_abs_diff']:.3g}, {gate['images']} validation images")
    return line + ("" if gate["passed"] else f" -- {'; '.join(gate['failures'])}")
