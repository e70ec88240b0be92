"""The export's answer policy on disk: ``answer_policy.json`` (what the handler applies, and the
figures that judge it), ``answer_report.md`` and its two figures.

    python -c "from flannel.export.answer_report import policy_markdown; help(policy_markdown)"
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from flannel.calibration import reliability_diagram
from flannel.export.answer_policy import POLICY_FILE, REPORT_FILE, PolicyPlots

RELIABILITY_PNG = "reliability.png"
OOD_PNG = "ood_scores.png"


def _f(value, digits: int = 3) -> str:
    return "missing" if value is None else f"{value:.{digits}f}"


def _interval(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        return "n/a"
    return f"{entry['value']:.3f} ({_f(entry.get('low'))}–{_f(entry.get('high'))})"


def calibration_lines(cal: dict) -> list[str]:
    what = (f"temperature T = {cal['temperature']:.4g}" if cal["kind"] == "temperature" else
            f"{cal['kind']} scaling")
    lines = [f"## Calibration ({what}, fitted on val, in the graph)", "",
             "| split | ECE before | ECE after | Brier before | Brier after | log loss before | "
             "log loss after |", "|---|---|---|---|---|---|---|"]
    for split, fig in cal["figures"].items():
        b, a = fig["before"], fig.get("after", {})
        lines.append(f"| {split} | {_f(b.get('ece'))} | {_f(a.get('ece'))} | "
                     f"{_f(b.get('brier'))} | {_f(a.get('brier'))} | {_f(b.get('nll'))} | "
                     f"{_f(a.get('nll'))} |")
    return lines + ["", f"![reliability]({RELIABILITY_PNG})", ""]


def decision_lines(title: str, figures: dict | None) -> list[str]:
    if not figures:
        return [f"## {title}", "", "no test split: not measured", ""]
    lines = [f"## {title}", "",
             f"{figures['images']} test images of {figures['patients']} patients; accuracy "
             f"{figures['accuracy']:.3f}, macro-F1 {figures['macro_f1']:.3f}; 95% intervals "
             f"from {figures['bootstrap']['replicates']} patient-level bootstrap replicates.", "",
             "| class | sensitivity | specificity |", "|---|---|---|"]
    for name, f in figures["per_class"].items():
        lines.append(f"| {name} | {_interval(f.get('sensitivity'))} | "
                     f"{_interval(f.get('specificity'))} |")
    return lines + [""]


def conformal_lines(conf: dict) -> list[str]:
    test = conf.get("test")
    measured = ("not measured (no test split)" if not test else
                f"test coverage {test['coverage']:.3f}, mean set size "
                f"{test['mean_size']:.2f}")
    return [f"## Prediction sets (split conformal, {conf['score']}, target coverage "
            f"{conf['coverage']:.2f}, fitted on {conf['n']} val images)", "", measured, ""]


def ood_lines(ood: dict) -> list[str]:
    inside = ood.get("in_distribution", {})
    lines = [f"## Out-of-distribution score ({ood['method']}, threshold set on val for "
             f"{ood['target_pass_rate']:.0%} passing; val pass rate {ood['val_pass_rate']:.3f})",
             "", f"In-distribution ({inside.get('split')}, {inside.get('images')} images) pass "
             f"rate {_f(inside.get('pass_rate'))}.", "",
             "| set | images | AUROC | pass rate |", "|---|---|---|---|"]
    for name, f in ood.get("evaluation", {}).get("sets", {}).items():
        lines.append(f"| {name} | {f['images']} | {_f(f['auroc'])} | {_f(f['pass_rate'])} |")
    return lines + ["", f"![ood scores]({OOD_PNG})", ""]


def policy_markdown(policy: dict) -> str:
    point = policy["operating_point"]
    targets = ", ".join(f"{t['class_name']}:{t['metric']}>={t['bound']}"
                        for t in point.get("targets", [])) or "none (argmax)"
    lines = ["# Answer policy", "", f"Classes: {', '.join(policy['class_names'])}. Fitted on "
             f"{policy['fitted_on']['split_manifest']}.", ""]
    lines += calibration_lines(policy["calibration"])
    lines += decision_lines("Test figures at argmax", policy.get("test_figures"))
    lines += decision_lines(f"Operating point: {targets}", point.get("test"))
    lines += [f"Thresholds chosen on val: {point['thresholds'] or 'none (argmax)'}; achieved "
              f"there: {point['achieved'] or 'n/a'}.", ""]
    lines += conformal_lines(policy["conformal"])
    lines += ood_lines(policy["ood"])
    return "\n".join(lines)


def ood_plot(plots: PolicyPlots, path: Path) -> Path:
    from flannel.benchmarks.output import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    groups = {"chest (in distribution)": plots.in_scores, **plots.ood_sets}
    for i, (name, scores) in enumerate(groups.items()):
        y = np.full(len(scores), i) + np.linspace(-0.25, 0.25, max(len(scores), 1))[:len(scores)]
        ax.scatter(np.maximum(scores, 1e-3), y, s=9)
    ax.axvline(1.0, color="k", ls="--", lw=1, label="threshold (1)")
    ax.set(xscale="log", yticks=range(len(groups)), yticklabels=list(groups),
           xlabel="ood_score (distance / threshold)")
    ax.legend(fontsize=7)
    return save_figure(fig, path.parent, path.name, "Out-of-distribution score per set")


def write_answer_policy(export_dir: Path, policy: dict, plots: PolicyPlots) -> Path:
    """``answer_policy.json``, ``answer_report.md`` and its figures; the JSON's path."""
    reliability_diagram(plots.reliability, export_dir / RELIABILITY_PNG,
                        "Served probabilities: before and after calibration")
    ood_plot(plots, export_dir / OOD_PNG)
    (export_dir / REPORT_FILE).write_text(policy_markdown(policy) + "\n")
    path = export_dir / POLICY_FILE
    path.write_text(json.dumps(policy, indent=2, allow_nan=False) + "\n")
    return path
