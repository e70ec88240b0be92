"""`flannel evaluate`: external validation of a run's model on dataset folders from elsewhere.

    flannel evaluate runs/resnet18 ../shared/datasets/external-cxr/hannover-covid19 \
        ../shared/datasets/external-cxr/openist-normal --name external-cxr
    flannel evaluate runs/ensemble ../shared/datasets/external-cxr/hannover-covid19 --name hannover

RUN_DIR is a learner run (``best.pt``, ``flannel train``) or an ensemble folder (``fusion.pt``,
``flannel ensemble train``); what the folder holds picks how the images are predicted, and
everything after the predictions is the same for both. Every image of the folders is a test
image. The folders are read with the same readers as training data, under the model's label
scheme, and the model runs in fp32: a learner with the evaluation transform of its own
preprocessing spec, an ensemble's fused module on the common served input. External sets rarely
hold every class, so the report says which classes have no images there ("not externally
validated") instead of letting a macro average hide it, and gives per-class recall: a model that
learned its training archives rather than the disease keeps COVID-19 recall and loses Normal
recall on radiographs from other hospitals.

When the run has an export whose graph serves ``ood_score`` (``RUN_DIR/export``), the exported
fp32 graph runs on the external images too, and the report gives the share that passes as
in-distribution: external chest films are expected to pass, so a low rate means the score flags
real radiographs.
Written to ``RUN_DIR/external/<name>/``: report.md, report.json, confusion.csv and confusion.png.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from flannel import labels as L
from flannel.artifacts import (ENSEMBLE, INPUT_SPEC, LEARNER, MANIFEST_NAME, OOD_PASS_LIMIT,
                               OOD_SCORE, ONNX_FP32, ManifestError, artifact_path, export_dir_of,
                               read_artifact, read_manifest, sha256_bytes, sha256_file)
from flannel.checkpoint import Checkpoint, load_checkpoint
from flannel.data.readers import DatasetRead, read_dataset
from flannel.data.records import ManifestRow
from flannel.data.torch_dataset import XrayDataset, check_readable
from flannel.graphs import FUSION_CHECKPOINT, MemberChanged, load_fusion
from flannel.preprocess import PreprocessSpec
from flannel.quoting import clip
from flannel.train.calibration_report import (external_calibration, external_markdown,
                                               run_temperature)
from flannel.train.evaluate import Predictions, predict, split_metrics
from flannel.train.report import markdown_table, plot_confusion, write_confusion_csv

EXTERNAL_DIR = "external"
DEFAULT_CHECKPOINT = "best.pt"
# The pair of recalls that exposes a source shortcut (DESIGN.md, "Measured on real data"): a model
# that recognises its training archives keeps COVID-19 recall and loses Normal recall elsewhere.
SHORTCUT_FINDINGS = (L.COVID19, L.NORMAL)
# Fused probabilities are a convex mix of softmaxes and can round to 0 in fp32; the floor keeps
# the log loss finite (float32's smallest normal number, far below any probability that matters).
PROBABILITY_FLOOR = float(torch.finfo(torch.float32).tiny)
# The exported graph's per-image out-of-distribution output (flannel.ood) and the score that
# passes as a chest radiograph like the training ones.
OOD_OUTPUT = OOD_SCORE
OOD_THRESHOLD = OOD_PASS_LIMIT
NO_OOD_EXPORT = f"no export with an {OOD_OUTPUT} output: run flannel export onnx"


class ExternalDataError(ValueError):
    """The external folders or the model cannot give a meaningful external evaluation."""


@dataclass
class ExternalModel:
    """What the external evaluation needs from a run folder, whatever its kind.

    Attributes:
        kind: ``"learner"`` or ``"ensemble"`` (the export's graph kinds).
        arch: the learner's architecture, or the ensemble's model name.
        members: the member names (a learner's is its architecture).
        checkpoint: the file the model was loaded from (``best.pt``, ``fusion.pt``).
        class_names: output order.
        scheme: the label scheme the external findings are mapped with.
        preprocess: the spec that turns a file into the tensor ``predict`` takes.
        predict: ``(dataset, batch_size) -> Predictions`` in fp32.
    """

    kind: str
    arch: str
    members: list[str]
    checkpoint: Path
    class_names: list[str]
    scheme: str
    preprocess: PreprocessSpec
    predict: Callable[[XrayDataset, int], Predictions]


def check_scheme(where: str | Path, scheme: str | None, class_names: Sequence[str]) -> str:
    """The label scheme, checked against the model's class names.

    Raises:
        ExternalDataError: no scheme, or classes that differ from it.
    """
    if scheme is None:
        raise ExternalDataError(f"{where}: config has no label scheme; cannot tell how to map "
                                "the external findings onto its classes")
    expected = list(L.get_scheme(scheme).classes)
    if list(class_names) != expected:
        raise ExternalDataError(f"{where}: class names {list(class_names)} do not match its "
                                f"label scheme {scheme!r} {expected}")
    return scheme


def load_run_checkpoint(run_dir: str | Path, checkpoint: str = DEFAULT_CHECKPOINT) -> Checkpoint:
    """Load ``run_dir/checkpoint`` and check that its label scheme matches its class names.

    Raises:
        ExternalDataError: no scheme in the checkpoint's config, or classes that differ from it.
    """
    ckpt = load_checkpoint(Path(run_dir) / checkpoint)
    check_scheme(f"{run_dir}/{checkpoint}", ckpt.config.get("scheme"), ckpt.class_names)
    return ckpt


@torch.no_grad()
def predict_fused(module: nn.Module, dataset: XrayDataset, batch_size: int = 32) -> Predictions:
    """Run a fused ensemble over ``dataset`` (the common served input) in fp32.

    Args:
        module: a ``FusedEnsemble``; the first element of its output is the fused probabilities.
        dataset: the images under the ensemble's input spec.
        batch_size: items per forward pass.

    Returns:
        The fused probabilities, the labels, and the mean log loss (the cross-entropy a learner's
        ``predict`` reports, taken on probabilities).
    """
    module.eval()
    probs, targets = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        probs.append(module(x.float())[0].float().numpy())
        targets.append(y.numpy())
    if not probs:
        return Predictions(np.zeros((0, len(dataset.class_names))), np.zeros(0, dtype=int), 0.0)
    p, t = np.concatenate(probs), np.concatenate(targets)
    loss = -np.log(np.maximum(p[np.arange(len(t)), t], PROBABILITY_FLOOR)).mean()
    return Predictions(p, t, float(loss))


def learner_model(run_dir: Path, checkpoint: str) -> ExternalModel:
    """A learner run's checkpoint, predicted with its own evaluation transform."""
    ckpt = load_run_checkpoint(run_dir, checkpoint)
    return ExternalModel(LEARNER.kind, ckpt.arch, [ckpt.arch], run_dir / checkpoint,
                         list(ckpt.class_names), ckpt.config["scheme"], ckpt.preprocess,
                         partial(predict, ckpt.build_model().float()))


def ensemble_model(run_dir: Path, checkpoint: str) -> ExternalModel:
    """An ensemble folder's fused module, predicted on the common served input.

    Raises:
        ExternalDataError: a learner checkpoint is asked for, a member changed since the fusion
            was fitted, or the fusion's scheme does not match its classes.
    """
    from flannel.export.sources import load_source

    if checkpoint != DEFAULT_CHECKPOINT:
        raise ExternalDataError(f"{run_dir} is an ensemble folder, evaluated through its "
                                f"{FUSION_CHECKPOINT}; --checkpoint {checkpoint} applies to "
                                "learner runs")
    try:
        source = load_source(run_dir)
    except MemberChanged as exc:
        raise ExternalDataError(str(exc)) from exc
    config = load_fusion(source.checkpoint)[1].get("config", {})
    scheme = check_scheme(source.checkpoint, config.get("scheme"), source.class_names)
    return ExternalModel(ENSEMBLE.kind, source.model_name, [m["name"] for m in source.members],
                         source.checkpoint, list(source.class_names), scheme, source.input_spec,
                         partial(predict_fused, source.module))


# How each kind of run folder is predicted; everything after the predictions is shared.
MODEL_LOADERS: dict[str, Callable[[Path, str], ExternalModel]] = {
    LEARNER.kind: learner_model, ENSEMBLE.kind: ensemble_model}


def run_kind(run_dir: str | Path) -> str:
    """``"ensemble"`` for a folder holding ``fusion.pt``, else ``"learner"``."""
    return ENSEMBLE.kind if (Path(run_dir) / FUSION_CHECKPOINT).is_file() else LEARNER.kind


def load_external_model(run_dir: str | Path,
                        checkpoint: str = DEFAULT_CHECKPOINT) -> ExternalModel:
    """The model of a learner run or an ensemble folder, chosen by what the folder holds."""
    run_dir = Path(run_dir)
    return MODEL_LOADERS[run_kind(run_dir)](run_dir, checkpoint)


def _findings_text(dataset: DatasetRead) -> str:
    found = dict(dataset.excluded)
    for sample in dataset.samples:
        found[sample.finding] = found.get(sample.finding, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(found.items())) or "no images at all"


def external_rows(data_dirs: Sequence[str | Path], scheme: str) -> tuple[list[ManifestRow],
                                                                          DatasetRead]:
    """Read the folders under ``scheme`` and make every usable image a test row.

    Args:
        data_dirs: dataset folders in any known layout.
        scheme: the model's label scheme.

    Returns:
        (test rows, the dataset as read).

    Raises:
        ExternalDataError: no image maps onto the scheme's classes.
    """
    dataset = read_dataset(data_dirs, scheme)
    if not dataset.samples:
        raise ExternalDataError(
            f"no image in {[str(d) for d in data_dirs]} maps onto the checkpoint's classes "
            f"{list(L.get_scheme(scheme).classes)} (scheme {scheme}); findings there: "
            f"{_findings_text(dataset)}")
    rows = [ManifestRow(s.path, label, s.finding, s.source, s.patient_id, s.patient_known, "test")
            for s, label in zip(dataset.samples, dataset.labels)]
    return rows, dataset


def _check_decodable(dataset: XrayDataset) -> None:
    bad = check_readable(dataset)
    if bad:
        listing = "\n".join(f"  {path}: {reason}" for path, reason in bad)
        raise ExternalDataError(f"{len(bad)} file(s) cannot be decoded:\n{listing}")


def recall_summary(metrics: dict, scheme: str) -> dict:
    """Per-class recall of the classes with images, the classes without, and the shortcut pair.

    Args:
        metrics: ``split_metrics`` output.
        scheme: label scheme name.

    Returns:
        ``recall`` (validated classes only), ``not_externally_validated`` (no images), and
        ``covid_normal_mean_recall`` (None unless both classes have images).
    """
    per_class = metrics["per_class"]
    validated = {c: m["recall"] for c, m in per_class.items() if m["support"] > 0}
    pair = [L.get_scheme(scheme).label_of(f) for f in SHORTCUT_FINDINGS]
    both = all(c in validated for c in pair)
    return {"recall": validated,
            "not_externally_validated": [c for c in per_class if c not in validated],
            "covid_normal_classes": pair,
            "covid_normal_mean_recall": sum(validated[c] for c in pair) / 2 if both else None}


def _source_counts(rows: Sequence[ManifestRow]) -> dict:
    counts: dict = {}
    for r in rows:
        counts.setdefault(r.source, {}).setdefault(r.label, 0)
        counts[r.source][r.label] += 1
    return counts


def ood_export(run_dir: Path, checkpoint_sha256: str) -> tuple[dict | None, str | None]:
    """The run's export manifest when its graph serves ``ood_score`` for this very checkpoint.

    Returns:
        (manifest, None), or (None, why the out-of-distribution pass cannot run).
    """
    export_dir = export_dir_of(run_dir)
    if not (export_dir / MANIFEST_NAME).is_file():
        return None, NO_OOD_EXPORT
    try:
        manifest = read_manifest(export_dir)
    except (ManifestError, json.JSONDecodeError) as exc:
        return None, f"{export_dir / MANIFEST_NAME} cannot be read ({exc})"
    if OOD_OUTPUT not in manifest.get("graph", {}).get("output_names", []):
        return None, NO_OOD_EXPORT
    exported = manifest.get("checkpoint_sha256")
    if exported != checkpoint_sha256:
        return None, (f"the export in {export_dir} is of another checkpoint (sha256 {exported}, "
                      f"evaluated {checkpoint_sha256}): run flannel export onnx again")
    return manifest, None


def ood_scores(export_dir: Path, manifest: dict, rows: Sequence[ManifestRow],
               class_names: Sequence[str], batch_size: int) -> tuple[np.ndarray, str]:
    """Run the exported fp32 graph on ``rows`` and return each image's ``ood_score``.

    Args:
        export_dir: the export folder.
        manifest: its manifest (its graph serves ``ood_score``).
        rows: the external images.
        class_names: the model's classes (the rows' labels are checked against them).
        batch_size: images per run.

    Returns:
        (scores (N,), sha256 of the ONNX bytes that ran).

    Raises:
        ManifestError: the graph or the input spec differs from its manifest entry.
        ExternalDataError: the graph gives other than one score per image.
    """
    from flannel.backends import OrtBackend
    from flannel.cpus import usable_cores

    onnx = read_artifact(export_dir, manifest, ONNX_FP32)  # checked against the manifest
    spec = PreprocessSpec.from_json(read_artifact(export_dir, manifest, INPUT_SPEC).decode())
    backend = OrtBackend("ort-fp32", onnx, manifest["graph"]["input_names"][0], [OOD_OUTPUT],
                         usable_cores())
    scores = []
    for x, _ in DataLoader(XrayDataset(rows, class_names, spec, cache=False),
                           batch_size=batch_size, shuffle=False):
        score = np.asarray(backend.run(x.numpy().astype(np.float32))[OOD_OUTPUT], np.float64)
        if score.size != len(x):
            raise ExternalDataError(f"{OOD_OUTPUT} of {export_dir} has shape {score.shape} for "
                                    f"{len(x)} images; expected one score per image")
        scores.append(score.reshape(-1))
    return np.concatenate(scores), sha256_bytes(onnx)


def ood_summary(scores: np.ndarray, sources: Sequence[str]) -> dict:
    """Pass rate (score at most ``OOD_THRESHOLD``) and median score, overall and per source."""
    passed = scores <= OOD_THRESHOLD
    sources = np.asarray(sources)
    by_source = {s: {"images": int((sources == s).sum()),
                     "pass_rate": float(passed[sources == s].mean())}
                 for s in sorted(set(sources.tolist()))}
    return {"images": int(len(scores)), "pass_rate": float(passed.mean()),
            "median_score": float(np.median(scores)), "threshold": OOD_THRESHOLD,
            "by_source": by_source}


def ood_section(run_dir: Path, rows: Sequence[ManifestRow], class_names: Sequence[str],
                checkpoint_sha256: str, batch_size: int) -> dict:
    """The report's ``ood`` (None when it cannot run) and ``ood_reason`` (None when it ran).

    Args:
        run_dir: the run folder whose ``export/`` is used.
        rows: the external images.
        class_names: the evaluated model's classes.
        checkpoint_sha256: the evaluated checkpoint's; the export must be of the same one.
        batch_size: images per run.
    """
    manifest, reason = ood_export(run_dir, checkpoint_sha256)
    if manifest is None:
        return {"ood": None, "ood_reason": reason}
    export_dir = export_dir_of(run_dir)
    try:
        scores, onnx_sha256 = ood_scores(export_dir, manifest, rows, class_names, batch_size)
    except Exception as exc:  # noqa: BLE001 - the one boundary of this optional figure
        # A modified artifact, a graph the runtime refuses, a score of the wrong shape: the report
        # says why there is no pass rate, and the metrics computed above still stand.
        return {"ood": None, "ood_reason": f"{export_dir}: {type(exc).__name__}: {clip(str(exc))}"}
    onnx_path = artifact_path(export_dir, manifest, ONNX_FP32)
    return {"ood": {**ood_summary(scores, [r.source for r in rows]), "output": OOD_OUTPUT,
                    "onnx": str(onnx_path), "onnx_sha256": onnx_sha256},
            "ood_reason": None}


def _ood_lines(report: dict) -> list[str]:
    ood = report["ood"]
    if ood is None:
        return [f"Out-of-distribution check: not run ({report['ood_reason']})."]
    return [f"Out-of-distribution check ({ood['output']} of `{Path(ood['onnx']).name}`, sha256 "
            f"{ood['onnx_sha256'][:12]}): **{ood['pass_rate']:.1%}** of {ood['images']} images "
            f"pass (score <= {ood['threshold']:g}), median score {ood['median_score']:.3f}."]


def _markdown(report: dict) -> str:
    recalls = report["recall_summary"]
    title = f"{report['arch']} ({report['checkpoint']}) on {report['name']}"
    lines = [f"# External validation: {title}", "",
             f"Model: {report['kind']} ({', '.join(report['members'])}), checkpoint sha256 "
             f"{report['checkpoint_sha256'][:12]}.", "",
             f"Scheme {report['scheme']}; {report['images']} images, all used as test images:"]
    lines += [f"- `{d}` ({layout})" for d, layout in report["sources"].items()]
    missing = recalls["not_externally_validated"]
    if missing:
        lines += ["", f"**Not externally validated: {', '.join(missing)}** (no images of "
                      f"{'this class' if len(missing) == 1 else 'these classes'} in the external "
                      "data; their precision only counts false alarms)."]
    lines += ["", "Per-class recall: " + ", ".join(f"{c} {r:.3f}"
                                                 for c, r in recalls["recall"].items())]
    mean = recalls["covid_normal_mean_recall"]
    if mean is not None:
        a, b = recalls["covid_normal_classes"]
        lines.append(f"Mean of {a} and {b} recall: **{mean:.3f}**")
    lines += ["", markdown_table(report["metrics"]), "", "![confusion matrix](confusion.png)", ""]
    lines += _ood_lines(report) + [""]
    lines += external_markdown(report["calibration"])
    if report["excluded_findings"]:
        lines.append("Findings outside the scheme, not evaluated: " + ", ".join(
            f"{k} {v}" for k, v in report["excluded_findings"].items()))
    if report["problems"]:
        lines += ["", f"Files found but not usable ({len(report['problems'])}):"]
        lines += [f"- `{p['path']}`: {p['reason']}" for p in report["problems"]]
    return "\n".join(lines) + "\n"


def write_external_report(out_dir: Path, report: dict) -> Path:
    """Write report.json, report.md, confusion.csv and confusion.png into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = report["metrics"]
    write_confusion_csv(metrics["confusion"], metrics["class_names"], out_dir / "confusion.csv")
    plot_confusion(metrics["confusion"], metrics["class_names"],
                   f"{report['arch']} - external {report['name']}", out_dir / "confusion.png")
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(_markdown(report))
    return out_dir


def default_name(data_dirs: Sequence[str | Path]) -> str:
    """Report folder name from the data folders' names, e.g. ``hannover-covid19+openist-normal``."""
    joined = "+".join(Path(d).resolve().name for d in data_dirs)
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", joined)


def evaluate_external(run_dir: str | Path, data_dirs: Sequence[str | Path], name: str | None = None,
                      checkpoint: str = DEFAULT_CHECKPOINT, batch_size: int = 32) -> dict:
    """Evaluate a learner run or an ensemble folder on external folders and write the report.

    Args:
        run_dir: a learner run holding ``checkpoint``, or an ensemble folder holding
            ``fusion.pt``.
        data_dirs: dataset folders in any known layout; every usable image is a test image.
        name: report folder under ``run_dir/external``; default from the folder names.
        checkpoint: learner checkpoint file inside ``run_dir`` (an ensemble uses ``fusion.pt``).
        batch_size: inference batch size.

    Returns:
        The report dict (also written as report.json), with ``out_dir``.

    Raises:
        ExternalDataError: scheme/class mismatch, a changed ensemble member, no image mapping
            onto the model's classes, or files that cannot be decoded (checked before any
            prediction).
    """
    run_dir = Path(run_dir)
    model = load_external_model(run_dir, checkpoint)
    rows, dataset = external_rows(data_dirs, model.scheme)
    images = XrayDataset(rows, model.class_names, model.preprocess)
    _check_decodable(images)
    predictions = model.predict(images, batch_size)
    metrics = split_metrics(predictions, model.class_names, model.scheme)
    name = name or default_name(data_dirs)
    out_dir = run_dir / EXTERNAL_DIR / name
    checkpoint_sha256 = sha256_file(model.checkpoint)
    report = {"name": name, "run_dir": str(run_dir), "kind": model.kind,
              "checkpoint": str(model.checkpoint.relative_to(run_dir)),
              "checkpoint_sha256": checkpoint_sha256,
              "arch": model.arch, "members": model.members, "scheme": model.scheme,
              "precision": "fp32", "images": len(rows),
              "sources": dataset.sources, "counts_by_source": _source_counts(rows),
              "metrics": metrics,
              "recall_summary": recall_summary(metrics, model.scheme),
              "excluded_findings": dict(dataset.excluded), "skipped": dict(dataset.skipped),
              "problems": [{"path": p.path, "reason": p.reason} for p in dataset.problems]}
    report.update(ood_section(run_dir, rows, model.class_names, checkpoint_sha256, batch_size))
    # Calibration on the external set, with the run's own validation temperature when it has one.
    report["calibration"] = external_calibration(predictions, out_dir, f"{model.arch} on {name}",
                                                 run_temperature(run_dir, model, batch_size))
    write_external_report(out_dir, report)
    return {**report, "out_dir": str(out_dir)}


def register(parser: argparse.ArgumentParser) -> None:
    """Add the ``flannel evaluate`` arguments."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a learner run (best.pt) or an "
                        "ensemble folder (fusion.pt)")
    parser.add_argument("data_dirs", nargs="+", metavar="DATA_DIR")
    parser.add_argument("--name", help="report folder under RUN_DIR/external (default: the "
                        "data folders' names)")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                        help="learner checkpoint inside RUN_DIR (an ensemble uses fusion.pt)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.set_defaults(func=run)


def _print_ood(r: dict) -> None:
    ood = r["ood"]
    if ood is None:
        print(f"  out-of-distribution check not run: {r['ood_reason']}")
    else:
        print(f"  out-of-distribution pass rate {ood['pass_rate']:.3f} of {ood['images']} "
              f"(score <= {ood['threshold']:g}), median score {ood['median_score']:.3f}")


def run(args: argparse.Namespace) -> int:
    try:
        r = evaluate_external(args.run_dir, args.data_dirs, args.name, args.checkpoint,
                              args.batch_size)
    except ExternalDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    recalls = r["recall_summary"]
    print(f"{r['images']} external images, scheme {r['scheme']}, {r['kind']} {r['arch']} "
          f"({r['checkpoint']})")
    print("  recall: " + ", ".join(f"{c} {v:.3f}" for c, v in recalls["recall"].items()))
    if recalls["covid_normal_mean_recall"] is not None:
        a, b = recalls["covid_normal_classes"]
        print(f"  mean of {a} and {b} recall: {recalls['covid_normal_mean_recall']:.3f}")
    if recalls["not_externally_validated"]:
        print("  not externally validated (no images): "
              + ", ".join(recalls["not_externally_validated"]))
    if r["excluded_findings"]:
        print("  excluded findings: " + ", ".join(f"{k} {v}"
                                                  for k, v in r["excluded_findings"].items()))
    _print_ood(r)
    print(f"  problems: {len(r['problems'])}")
    for p in r["problems"]:
        print(f"    {p['path']}: {p['reason']}")
    print(f"report {r['out_dir']}/report.md")
    return 0
