"""`flannel evaluate`: external validation of a run's checkpoint on dataset folders from elsewhere.

    flannel evaluate runs/resnet18 ../shared/datasets/external-cxr/hannover-covid19 \
        ../shared/datasets/external-cxr/openist-normal --name external-cxr

Every image of the folders is a test image. The folders are read with the same readers as training
data, under the checkpoint's label scheme, and the checkpoint runs in fp32 with the evaluation
transform of its own preprocessing spec. External sets rarely hold every class, so the report says
which classes have no images there ("not externally validated") instead of letting a macro average
hide it, and gives per-class recall: a model that learned its training archives rather than the
disease keeps COVID-19 recall and loses Normal recall on radiographs from other hospitals.
Written to ``RUN_DIR/external/<name>/``: report.md, report.json, confusion.csv and confusion.png.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Sequence

from flannel import labels as L
from flannel.checkpoint import Checkpoint, load_checkpoint
from flannel.data.readers import DatasetRead, read_dataset
from flannel.data.records import ManifestRow
from flannel.data.torch_dataset import XrayDataset, check_readable
from flannel.train.evaluate import predict, split_metrics
from flannel.train.report import markdown_table, plot_confusion, write_confusion_csv

EXTERNAL_DIR = "external"
DEFAULT_CHECKPOINT = "best.pt"
# The pair of recalls that exposes a source shortcut (DESIGN.md, "Measured on real data"): a model
# that recognises its training archives keeps COVID-19 recall and loses Normal recall elsewhere.
SHORTCUT_FINDINGS = (L.COVID19, L.NORMAL)


class ExternalDataError(ValueError):
    """The external folders or the checkpoint cannot give a meaningful external evaluation."""


def load_run_checkpoint(run_dir: str | Path, checkpoint: str = DEFAULT_CHECKPOINT) -> Checkpoint:
    """Load ``run_dir/checkpoint`` and check that its label scheme matches its class names.

    Raises:
        ExternalDataError: no scheme in the checkpoint's config, or classes that differ from it.
    """
    ckpt = load_checkpoint(Path(run_dir) / checkpoint)
    scheme = ckpt.config.get("scheme")
    if scheme is None:
        raise ExternalDataError(f"{run_dir}/{checkpoint}: config has no label scheme; cannot tell "
                                "how to map the external findings onto its classes")
    expected = list(L.get_scheme(scheme).classes)
    if list(ckpt.class_names) != expected:
        raise ExternalDataError(f"{run_dir}/{checkpoint}: class names {ckpt.class_names} do not "
                                f"match its label scheme {scheme!r} {expected}")
    return ckpt


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
        scheme: the checkpoint's label scheme.

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


def _markdown(report: dict) -> str:
    recalls = report["recall_summary"]
    title = f"{report['arch']} ({report['checkpoint']}) on {report['name']}"
    lines = [f"# External validation: {title}", "",
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
    """Evaluate a run's checkpoint on external folders and write the report.

    Args:
        run_dir: the run folder holding ``checkpoint``.
        data_dirs: dataset folders in any known layout; every usable image is a test image.
        name: report folder under ``run_dir/external``; default from the folder names.
        checkpoint: checkpoint file name inside ``run_dir``.
        batch_size: inference batch size.

    Returns:
        The report dict (also written as report.json), with ``out_dir``.

    Raises:
        ExternalDataError: scheme/class mismatch, no image mapping onto the checkpoint's classes,
            or files that cannot be decoded (checked before any prediction).
    """
    ckpt = load_run_checkpoint(run_dir, checkpoint)
    scheme = ckpt.config["scheme"]
    rows, dataset = external_rows(data_dirs, scheme)
    images = XrayDataset(rows, ckpt.class_names, ckpt.preprocess)
    _check_decodable(images)
    metrics = split_metrics(predict(ckpt.build_model().float(), images, batch_size),
                            ckpt.class_names, scheme)
    name = name or default_name(data_dirs)
    out_dir = Path(run_dir) / EXTERNAL_DIR / name
    report = {"name": name, "run_dir": str(run_dir), "checkpoint": checkpoint, "arch": ckpt.arch,
              "scheme": scheme, "precision": "fp32", "images": len(rows),
              "sources": dataset.sources, "counts_by_source": _source_counts(rows),
              "metrics": metrics,
              "recall_summary": recall_summary(metrics, scheme),
              "excluded_findings": dict(dataset.excluded), "skipped": dict(dataset.skipped),
              "problems": [{"path": p.path, "reason": p.reason} for p in dataset.problems]}
    write_external_report(out_dir, report)
    return {**report, "out_dir": str(out_dir)}


def register(parser: argparse.ArgumentParser) -> None:
    """Add the ``flannel evaluate`` arguments."""
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("data_dirs", nargs="+", metavar="DATA_DIR")
    parser.add_argument("--name", help="report folder under RUN_DIR/external (default: the "
                        "data folders' names)")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        r = evaluate_external(args.run_dir, args.data_dirs, args.name, args.checkpoint,
                              args.batch_size)
    except ExternalDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    recalls = r["recall_summary"]
    print(f"{r['images']} external images, scheme {r['scheme']}, {r['arch']} ({r['checkpoint']})")
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
    print(f"  problems: {len(r['problems'])}")
    for p in r["problems"]:
        print(f"    {p['path']}: {p['reason']}")
    print(f"report {r['out_dir']}/report.md")
    return 0
