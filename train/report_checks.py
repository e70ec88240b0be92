"""Checks that make a training report hard to fool: the harmonised-image shortcut check, the
logistic-regression pixel baseline and Grad-CAM overlays, run on the best checkpoint.

    python -c "from flannel.train.report_checks import report_checks"

Each check answers one question a reader of the headline accuracy should ask: does the model still
work once file format, size, mode and border marks no longer differ between classes (shortcut);
how much better is it than a linear model on 32x32 pixels (baseline); where does it look
(Grad-CAM)?
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch.nn as nn

from flannel.checkpoint import Checkpoint
from flannel.data.records import ManifestRow
from flannel.train.baseline import logistic_baseline
from flannel.train.gradcam import report_overlays
from flannel.train.shortcut import harmonised_metrics, shortcut_summary

log = logging.getLogger(__name__)
# Overlays per class in the report: enough to see a pattern, few enough to look at.
GRADCAM_PER_CLASS = 2


def report_checks(run_dir: Path, model: nn.Module, ckpt: Checkpoint, datasets: tuple,
                  splits: dict, scheme: str, batch_size: int) -> dict:
    """Run the three checks and return their report sections.

    Args:
        run_dir: the run folder (Grad-CAM PNGs go to ``run_dir/gradcam``).
        model: the best checkpoint's model, fp32, eval mode.
        ckpt: that checkpoint.
        datasets: (train, val, test) datasets of the run.
        splits: the main metrics per split (``"test"`` when the test split is not empty).
        scheme: label scheme name.
        batch_size: evaluation batch size.

    Returns:
        ``{"shortcut": ..., "baseline": ..., "gradcam": [...]}`` (shortcut only with a test split).
    """
    train_ds, val_ds, test_ds = datasets
    out: dict = {}
    target = "test" if "test" in splits else "val"
    eval_ds = test_ds if target == "test" else val_ds
    log.info("shortcut check: %s split with harmonised images", target)
    harmonised = harmonised_metrics(model, eval_ds, ckpt.class_names, scheme, batch_size)
    out["shortcut"] = {"split": target, **shortcut_summary(splits[target], harmonised),
                       "harmonised_metrics": harmonised}
    log.info("logistic-regression baseline on downsampled pixels")
    eval_sets = {"val": val_ds, **({"test": test_ds} if len(test_ds) else {})}
    out["baseline"] = logistic_baseline(train_ds, eval_sets, ckpt.class_names, scheme)
    rows = list(eval_ds.rows)
    out["gradcam"] = [str(p.relative_to(run_dir)) for p in
                      report_overlays(run_dir, ckpt, [_as_test(r) for r in rows],
                                      GRADCAM_PER_CLASS)]
    return out


def _as_test(row: ManifestRow) -> ManifestRow:
    """Overlays are drawn from the test split; without one, validation rows stand in."""
    return row if row.split == "test" else replace(row, split="test")


def checks_markdown(checks: dict) -> list[str]:
    """Report sections for ``report_checks``'s result."""
    md: list[str] = []
    s = checks.get("shortcut")
    if s:
        md += [f"## Shortcut check ({s['split']} split, harmonised images)", "",
               "Every image re-encoded alike (outer 10% cropped, one size, 8-bit grayscale PNG), "
               "then the same evaluation:", "",
               "| metric | original | harmonised | drop |", "| --- | --- | --- | --- |"]
        md += [f"| {k} | {s[k]['main']:.4f} | {s[k]['harmonised']:.4f} | {s[k]['drop']:+.4f} |"
               for k in ("accuracy", "macro_f1")]
        md.append("")
    b = checks.get("baseline")
    if b:
        md += ["## Baseline: logistic regression on 32x32 pixels", "",
               "| split | accuracy | macro-F1 |", "| --- | --- | --- |"]
        md += [f"| {split} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} |" for split, m in b.items()]
        md.append("")
    if checks.get("gradcam"):
        md += ["## Grad-CAM", ""] + [f"![Grad-CAM]({p})" for p in checks["gradcam"]] + [""]
    return md
