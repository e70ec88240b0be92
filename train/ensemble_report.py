"""The ensemble report: every learner, every baseline and FLANNEL side by side, and plots.

    python -c "from flannel.train.ensemble_report import report_markdown; help(report_markdown)"

Writes ``ensemble_report.json`` and ``.md``, one confusion matrix PNG per method on the test split
(validation when there is no test split) under ``confusion/``, and ``learner_weights.png``: the
distribution of each learner's weight, per true class. The calibration sections (the fused
answer's and each learner's temperature scaling, with their reliability diagrams) are measured and
drawn by ``flannel.train.ensemble``; this module turns their figures into Markdown.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from flannel.train.calibration_report import calibration_markdown
from flannel.train.fusion_fit import fused_outputs
from flannel.train.report import plot_confusion

FUSED_CALIBRATION_HEADING = "Calibration of the fused probabilities"
LEARNER_CALIBRATION_HEADING = "Calibration of each learner"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def methods_table(rows: list[dict], class_names: list[str], covid: str) -> list[str]:
    head = (f"| method | accuracy | macro-F1 | {covid} recall | sick called Normal | "
            + " | ".join(f"F1 {c}" for c in class_names) + " |")
    lines = [head, "|" + " --- |" * (5 + len(class_names))]
    for r in rows:
        name = f"**{r['name']}**" if r["kind"] == "flannel" else r["name"]
        lines.append(f"| {name} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | "
                     f"{r['covid_recall']:.4f} | {r['sick_called_normal']} | "
                     + " | ".join(f"{r['per_class_f1'][c]:.3f}" for c in class_names) + " |")
    return lines


def _ranked(r: dict) -> str:
    if r.get("collapsed_at_epoch"):
        return f"{r['arch']} ({r['val_macro_f1']:.4f}, collapsed at epoch {r['collapsed_at_epoch']})"
    return f"{r['arch']} ({r['val_macro_f1']:.4f})"


def report_markdown(report: dict) -> str:
    from flannel.labels import COVID_CLASS

    covid = COVID_CLASS[report["scheme"]]
    cv = ", ".join(f"{g}: {v:.4f}" for g, v in report["gamma_cv_macro_f1"].items())
    lines = [f"# FLANNEL ensemble of {', '.join(report['members'])}", "",
             f"Learners chosen by validation macro-F1 out of {len(report['ranking'])}: "
             + ", ".join(_ranked(r) for r in report["ranking"]) + ".",
             "",
             f"The fusion was fitted on the validation split ({report['images'].get('val', 0)} "
             f"images); the test split ({report['images'].get('test', 0)} images) was used for "
             "nothing but these figures. Focal-loss gamma "
             f"{report['gamma']:g} was chosen by 5-fold CV macro-F1 inside the validation split"
             + (f" ({cv})" if cv else "") + f"; FLANNEL's own gamma {report['flannel_gamma']:g} "
             "is shown beside it. Alpha (inverse class frequency): "
             + ", ".join(f"{a:.3f}" for a in report["alpha"]) + ".", ""]
    for split, rows in report["methods"].items():
        lines += [f"## {split}", ""] + methods_table(rows, report["class_names"], covid) + [""]
    shown = "test" if "test" in report["methods"] else "val"
    lines += [f"Confusion matrices ({shown}): " + ", ".join(
        f"[{r['name']}](confusion/{_slug(r['name'])}.png)" for r in report["methods"][shown]), "",
        f"## Mean learner weight per true class ({shown})", "",
        "| class | " + " | ".join(report["members"]) + " |",
        "|" + " --- |" * (1 + len(report["members"]))]
    for c, w in report["learner_weights_by_class"][shown].items():
        lines.append(f"| {c} | " + " | ".join("-" if w[m] is None else f"{w[m]:.3f}"
                                              for m in report["members"]) + " |")
    lines += ["", "![learner weights](learner_weights.png)", ""]
    if report.get("calibration"):
        lines += calibration_markdown(report["calibration"], FUSED_CALIBRATION_HEADING)
    if report.get("learner_calibration"):
        lines += learner_calibration_markdown(report["learner_calibration"])
    return "\n".join(lines)


def _ece_cells(figures: dict, split: str) -> list[str]:
    f = figures.get(split)
    if f is None:
        return ["-", "-"]
    return [f"{f['before']['ece']:.4f}", f"{f['after']['ece']:.4f}" if "after" in f else "-"]


def learner_calibration_markdown(learners: dict[str, dict]) -> list[str]:
    """Each learner's temperature and its ECE before and after on validation and test."""
    bins = next(iter(learners.values()))["bins"]
    lines = [f"## {LEARNER_CALIBRATION_HEADING}", "",
             "Each learner's own temperature scaling, fitted by log loss on its validation "
             f"probabilities (the ones the fusion reads, which stay unscaled). ECE over {bins} "
             "equal-mass confidence bins, before and after:", "",
             "| learner | T | ECE val before | ECE val after | ECE test before | ECE test after "
             "| diagram |", "|" + " --- |" * 7]
    for name, f in learners.items():
        t = "-" if f["scaling"] is None else f"{f['scaling']['temperature']:.3f}"
        diagram = f"[reliability]({f['diagram']})" if f.get("diagram") else "-"
        lines.append(f"| {name} | {t} | " + " | ".join(_ece_cells(f, "val")
                                                       + _ece_cells(f, "test"))
                     + f" | {diagram} |")
    return lines + [""]


def plot_learner_weights(weights: np.ndarray, targets: np.ndarray, names: list[str],
                         class_names: list[str], path: Path) -> Path:
    """Box plots of each learner's weight, grouped by true class."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.5 + 1.6 * len(class_names), 4))
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        data = [weights[targets == i, j] for i in range(len(class_names))]
        pos = np.arange(len(class_names)) + (j - (len(names) - 1) / 2) * width
        kept = [(p, d) for p, d in zip(pos, data) if len(d)]
        if kept:
            box = ax.boxplot([d for _, d in kept], positions=[p for p, _ in kept], widths=width * 0.9,
                             patch_artist=True, showfliers=False)
            for patch in box["boxes"]:
                patch.set_facecolor(plt.cm.tab10(j % 10))
        ax.plot([], [], color=plt.cm.tab10(j % 10), lw=6, label=name)
    ax.axhline(1.0 / len(names), color="grey", lw=0.8, ls="--")  # the plain mean's weight
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_ylabel("learner weight")
    ax.set_xlabel("true class")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(5, len(names)), fontsize=8,
              frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report_files(out: Path, report: dict, data: dict, fusion_module) -> None:
    from flannel.train.ensemble import REPORT_NAME

    (out / f"{REPORT_NAME}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{REPORT_NAME}.md").write_text(report_markdown(report))
    shown = "test" if "test" in report["methods"] else "val"
    folder = out / "confusion"
    folder.mkdir(exist_ok=True)
    for r in report["methods"][shown]:
        plot_confusion(np.array(r["confusion"]), report["class_names"], f"{r['name']} - {shown}",
                       folder / f"{_slug(r['name'])}.png")
    _, weights = fused_outputs(fusion_module, data[shown].probs)
    plot_learner_weights(weights, data[shown].targets, report["members"], report["class_names"],
                         out / "learner_weights.png")
