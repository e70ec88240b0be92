"""The run report: metrics tables in Markdown and JSON, confusion matrices as CSV and PNG, and
the calibration section (temperature scaling fitted on validation, ``reliability.png``).

    python -c "import json; print(json.load(open('runs/x/report.json'))['test']['macro_f1'])"

The tables carry what both source reports published: accuracy, per-class precision/recall/F1,
macro-F1, one-vs-rest ROC-AUC, and the number of sick images called "Normal".
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from flannel.train.calibration_report import CalibrationSection, calibration_section


def plot_confusion(cm: np.ndarray, class_names: list[str], title: str, path: Path) -> Path:
    """Save a confusion matrix heatmap with counts and row-normalised percentages."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(class_names), 1.2 + 1.2 * len(class_names)))
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{cm[i, j]}\n{frac[i, j]:.0%}", ha="center", va="center",
                    color="white" if frac[i, j] > 0.6 else "black", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_confusion_csv(cm: np.ndarray, class_names: list[str], path: Path) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["true \\ predicted", *class_names])
        for name, row in zip(class_names, np.asarray(cm).tolist()):
            writer.writerow([name, *row])
    return path


def _epoch_seconds(run_dir: Path) -> list[float]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with path.open() as fh:
        return [float(r["epoch_seconds"]) for r in csv.DictReader(fh)]


def markdown_table(metrics: dict) -> str:
    """Per-class table of one split."""
    lines = ["| class | precision | recall | F1 | ROC-AUC | support | called Normal |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    auc = metrics.get("roc_auc", {})
    called = metrics.get("called_normal", {})
    for name, m in metrics["per_class"].items():
        a = auc.get(name)
        lines.append(f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | "
                     f"{'-' if a is None else f'{a:.3f}'} | {m['support']} | "
                     f"{called.get(name, '-')} |")
    absent = metrics.get("absent_classes") or []
    lines.append(f"\naccuracy **{metrics['accuracy']:.4f}**, macro-F1 **{metrics['macro_f1']:.4f}**, "
                 f"{metrics['n']} images"
                 + (f"; no images of {', '.join(absent)} (left out of macro-F1)" if absent else ""))
    return "\n".join(lines)


def run_calibration(run_dir: Path, arch: str,
                        predictions: dict[str, tuple[np.ndarray, np.ndarray]]
                        ) -> CalibrationSection:
    """Temperature scaling of the learner fitted on ``val``, measured on every split, with
    ``reliability.png`` in ``run_dir`` (``flannel.train.calibration_report``)."""
    return calibration_section({s: p for s, (p, _) in predictions.items()},
                               {s: t for s, (_, t) in predictions.items()}, run_dir,
                               heading="Calibration",
                               title=f"{arch}: temperature scaling fitted on val")


def write_report(run_dir: Path, config: dict, best_epoch: int, splits: dict, seconds: float,
                 extra: dict | None = None,
                 predictions: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> dict:
    """Write report.json, report.md, per-split confusion CSV/PNG and the reliability diagram
    into ``run_dir``.

    Args:
        run_dir: the run folder.
        config: the resolved training config.
        best_epoch: epoch of the checkpoint evaluated.
        splits: split name -> metrics dict (``flannel.train.evaluate.split_metrics``).
        seconds: wall time of the whole run.
        extra: more JSON sections (how it was trained, DDP replica digests, ...).
        predictions: split name -> (probabilities, true labels) of the evaluated checkpoint;
            with them the report gains ``calibration`` (temperature fitted on ``val``).

    Returns:
        The report dict (also saved as report.json).
    """
    run_dir = Path(run_dir)
    epoch_s = _epoch_seconds(run_dir)
    report = {"arch": config["arch"], "best_epoch": best_epoch, "train_seconds": round(seconds, 1),
              "epoch_seconds": epoch_s, "config": config, **(extra or {}), **splits}
    md = [f"# {config['arch']} on {config['manifest']}", "",
          f"Best epoch {best_epoch} of {config['epochs']} (by validation macro-F1); "
          f"training took {seconds:.0f} s, "
          f"{(sum(epoch_s) / len(epoch_s)) if epoch_s else 0:.1f} s per epoch.", ""]
    training = (extra or {}).get("training")
    if training and training.get("collapsed_at_epoch"):
        md += [f"**Collapsed at epoch {training['collapsed_at_epoch']}**: every validation image "
               "got the same probabilities and training stopped; the figures below are those of "
               f"a constant classifier. Train again with a lower learning rate than "
               f"{config['lr']:g}.", ""]
    if training:
        md += [f"Trained in {training['precision']} on {training['device']} "
               f"({training.get('cpu', '?')}, {training.get('threads', '?')} threads, "
               f"world size {training.get('world_size', 1)}): {training['reason']}. "
               "Evaluation runs in fp32.", ""]
    md += [f"Losses are the training objective ({config.get('loss', 'ce')}, class balance "
           f"{config.get('class_balance', 'loss')}) on every split. Macro-F1 averages the classes "
           "present in a split; absent classes are listed, never counted as 0.", ""]
    for split, metrics in splits.items():
        names = metrics["class_names"]
        write_confusion_csv(metrics["confusion"], names, run_dir / f"confusion_{split}.csv")
        plot_confusion(metrics["confusion"], names, f"{config['arch']} - {split}",
                       run_dir / f"confusion_{split}.png")
        md += [f"## {split}", "", markdown_table(metrics), "",
               f"![confusion matrix]({f'confusion_{split}.png'})", ""]
    if predictions:
        calibration = run_calibration(run_dir, config["arch"], predictions)
        report["calibration"] = calibration.figures
        md += calibration.markdown
    if (extra or {}).get("checks"):
        from flannel.train.report_checks import checks_markdown
        md += checks_markdown(extra["checks"])
    (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (run_dir / "report.md").write_text("\n".join(md))
    return report
