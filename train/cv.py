"""K-fold cross-validation of one training recipe on the folds of a split manifest.

    flannel train cv --manifest data/manifest.csv --arch resnet18 --epochs 5 --out runs/cv

The manifest's ``fold`` column (``flannel data split --folds K``) fixes the folds. Fold k trains in
``OUT/fold{k}/run`` on a manifest (``OUT/fold{k}/manifest.csv``) whose test split is fold k, whose
validation split is fold (k+1) mod K and whose training split is every other fold, so each image is
tested exactly once. A fold whose run already finished with the same config is reused, so an
interrupted cross-validation continues where it stopped. ``cv_report.json`` and ``cv_report.md``
hold the per-fold test figures, their mean and sample standard deviation, and the confusion matrix
summed over folds.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from flannel.checkpoint import load_checkpoint
from flannel.data.records import ManifestRow, read_manifest, write_manifest
from flannel.data.split import MIN_FOLDS, fold_manifest
from flannel.labels import COVID_CLASS
from flannel.train.cli import add_train_options, config_from_args
from flannel.train.config import TrainConfig
from flannel.train.loop import resume_run, train_learner
from flannel.train.report import plot_confusion, write_confusion_csv

log = logging.getLogger(__name__)
FOLD_HINT = "write the folds with `flannel data split --folds K`"
SUMMARY_METRICS = ("accuracy", "macro_f1", "covid_recall")


def fold_ids(rows: list[ManifestRow], manifest: str | Path) -> list[int]:
    """The folds 0..K-1 of a manifest, or a ValueError saying what is missing.

    Args:
        rows: the manifest rows.
        manifest: the manifest path, for the message.

    Returns:
        ``[0, 1, ..., K-1]``.
    """
    unassigned = sum(r.fold < 0 for r in rows)
    if not rows or unassigned:
        raise ValueError(f"{manifest}: {unassigned} of {len(rows)} rows have no cross-validation "
                         f"fold; {FOLD_HINT}")
    folds = sorted({r.fold for r in rows})
    if folds != list(range(len(folds))) or len(folds) < MIN_FOLDS:
        raise ValueError(f"{manifest}: cross-validation needs folds 0..K-1 with K >= {MIN_FOLDS}, "
                         f"found folds {folds}; {FOLD_HINT}")
    return folds


def finished_report(cfg: TrainConfig) -> dict | None:
    """The report.json of ``cfg.out`` if that run finished with this config on this manifest."""
    path = Path(cfg.out) / "report.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    wanted = json.loads(json.dumps(cfg.resolved().to_dict()))
    if report.get("config") != wanted:
        log.info("%s: finished with another config; training again", cfg.out)
        return None
    if Path(cfg.manifest).stat().st_mtime > path.stat().st_mtime:
        log.info("%s: the manifest changed after the run finished; training again", cfg.out)
        return None
    return report


def train_or_reuse(cfg: TrainConfig) -> tuple[dict, bool]:
    """Train ``cfg`` unless its run folder already holds a finished run of the same config.

    Returns:
        The run's report (report.json) and whether it was reused.
    """
    report = finished_report(cfg)
    if report is not None:
        log.info("%s: reused (a finished run with the same config)", cfg.out)
        return report, True
    if interrupted_run(cfg):
        log.info("%s: resuming an interrupted run of the same config from last.pt", cfg.out)
        return resume_run(cfg.out).report, False
    return train_learner(cfg).report, False


def interrupted_run(cfg: TrainConfig) -> bool:
    """Whether ``cfg.out`` holds an unfinished run of this config with a resumable last.pt."""
    run_dir = Path(cfg.out)
    config, last = run_dir / "config.json", run_dir / "last.pt"
    if not (config.is_file() and last.is_file()):
        return False
    wanted = json.loads(json.dumps(cfg.resolved().to_dict()))
    return json.loads(config.read_text()) == wanted and \
        load_checkpoint(last).train_state is not None


def headline_metrics(report: dict, scheme: str) -> dict:
    """Test (else val) accuracy, macro-F1, COVID-19 recall and sick images called Normal."""
    split = "test" if "test" in report else "val"
    m = report[split]
    return {"evaluated_on": split, "images": int(np.sum(m["confusion"])),
            "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "covid_recall": m["per_class"][COVID_CLASS[scheme]]["recall"],
            "sick_called_normal": sum(m.get("called_normal", {}).values()),
            "collapsed_at_epoch": report.get("training", {}).get("collapsed_at_epoch")}


def mean_sd(values: list[float]) -> dict:
    """Mean and sample standard deviation (ddof=1; None for a single value)."""
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if len(a) > 1 else None}


def _write_if_changed(rows: list[ManifestRow], path: Path) -> None:
    # An unchanged manifest keeps its mtime, which finished_report compares with the report's.
    new = write_manifest(rows, path.with_name(path.name + ".new"))
    if path.is_file() and path.read_bytes() == new.read_bytes():
        new.unlink()
    else:
        new.replace(path)


def _run_fold(cfg: TrainConfig, rows: list[ManifestRow], k: int, out_dir: Path) -> dict:
    fold_dir = out_dir / f"fold{k}"
    rows = fold_manifest(rows, k)
    _write_if_changed(rows, fold_dir / "manifest.csv")
    counts = {s: sum(r.split == s for r in rows) for s in ("train", "val", "test")}
    log.info("fold %d: %d train / %d val / %d test images", k, counts["train"], counts["val"],
             counts["test"])
    fold_cfg = replace(cfg, manifest=str(fold_dir / "manifest.csv"), out=str(fold_dir / "run"))
    report, reused = train_or_reuse(fold_cfg)
    return {"fold": k, "run_dir": fold_cfg.out, "reused": reused,
            **headline_metrics(report, cfg.scheme), "class_names": report["test"]["class_names"],
            "confusion": report["test"]["confusion"]}


def run_cross_validation(cfg: TrainConfig, out_dir: str | Path, folds: list[int] | None = None) -> dict:
    """Train and test one recipe on every fold of ``cfg.manifest`` and write the CV report.

    Args:
        cfg: the training config; its ``manifest`` needs folds 0..K-1, its ``out`` is ignored.
        out_dir: folder for ``fold{k}/`` and ``cv_report.{json,md}``; created, never wiped.
        folds: the test folds to run; None for all of them.

    Returns:
        The CV report (also written to ``cv_report.json``).
    """
    out_dir = Path(out_dir)
    rows = read_manifest(cfg.manifest)
    all_folds = fold_ids(rows, cfg.manifest)
    chosen = folds or all_folds
    unknown = sorted(set(chosen) - set(all_folds))
    if unknown:
        raise ValueError(f"{cfg.manifest} has folds {all_folds}, not {unknown}")
    per_fold = [_run_fold(cfg, rows, k, out_dir) for k in chosen]
    report = {"manifest": cfg.manifest, "arch": cfg.arch, "scheme": cfg.scheme,
              "covid_class": COVID_CLASS[cfg.scheme], "n_folds": len(all_folds),
              "per_fold": per_fold,
              "summary": {m: mean_sd([f[m] for f in per_fold]) for m in SUMMARY_METRICS},
              "class_names": per_fold[0]["class_names"],
              "confusion": np.sum([f["confusion"] for f in per_fold], axis=0).tolist()}
    write_cv_report(report, out_dir)
    return report


def _figure(stat: dict) -> str:
    return f"{stat['mean']:.4f}" + ("" if stat["sd"] is None else f" ± {stat['sd']:.4f}")


def collapsed_note(row: dict) -> str:
    epoch = row.get("collapsed_at_epoch")
    return f" (collapsed at epoch {epoch})" if epoch else ""


def confusion_markdown(cm: list[list[int]], class_names: list[str]) -> str:
    """A confusion matrix as a Markdown table (rows true, columns predicted)."""
    lines = ["| true \\ predicted | " + " | ".join(class_names) + " |",
             "| --- |" + " --- |" * len(class_names)]
    lines += [f"| {name} | " + " | ".join(str(v) for v in row) + " |"
              for name, row in zip(class_names, cm)]
    return "\n".join(lines)


def cv_markdown(report: dict) -> str:
    """The CV report as Markdown: per-fold table, mean ± sd, summed confusion matrix."""
    covid, s = report["covid_class"], report["summary"]
    lines = [f"# {report['n_folds']}-fold cross-validation: {report['arch']} on {report['manifest']}",
             "", f"| fold | test images | accuracy | macro-F1 | {covid} recall | sick called Normal "
             "| run |", "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {f['fold']}{collapsed_note(f)} | {f['images']} | {f['accuracy']:.4f} | {f['macro_f1']:.4f} | "
              f"{f['covid_recall']:.4f} | {f['sick_called_normal']} | {f['run_dir']} |"
              for f in report["per_fold"]]
    lines += [f"| mean ± sd | | {_figure(s['accuracy'])} | {_figure(s['macro_f1'])} | "
              f"{_figure(s['covid_recall'])} | | |", "",
              "Standard deviations are sample standard deviations over folds.", "",
              "## Confusion matrix summed over folds", "",
              confusion_markdown(report["confusion"], report["class_names"]), "",
              "![summed confusion matrix](cv_confusion.png)", ""]
    return "\n".join(lines)


def write_cv_report(report: dict, out_dir: Path) -> None:
    """Write cv_report.json, cv_report.md and the summed confusion matrix as CSV and PNG."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cv_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "cv_report.md").write_text(cv_markdown(report))
    write_confusion_csv(report["confusion"], report["class_names"], out_dir / "cv_confusion.csv")
    plot_confusion(report["confusion"], report["class_names"],
                   f"{report['arch']} - {report['n_folds']} folds", out_dir / "cv_confusion.png")
    log.info("cross-validation report: %s", out_dir / "cv_report.md")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def register_subcommand(sub: argparse._SubParsersAction) -> None:
    """Add ``flannel train cv`` with every training option."""
    p = sub.add_parser("cv", help="K-fold cross-validation on the manifest's folds",
                       description=__doc__.splitlines()[0])
    add_train_options(p)
    p.add_argument("--folds", type=_ints, default=None,
                   help="test folds to run, comma-separated (default: all)")
    p.set_defaults(func=run, out="runs/cv")


def run(args: argparse.Namespace) -> int:
    try:
        report = run_cross_validation(config_from_args(args), args.out, args.folds)
    except ValueError as err:
        raise SystemExit(f"flannel train cv: {err}") from None
    print(cv_markdown(report))
    return 0
