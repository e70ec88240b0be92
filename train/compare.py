"""Train several architectures with one recipe and tabulate them, best macro-F1 first.

    flannel train compare --archs resnet18,squeezenet1_1,densenet121 --manifest data/manifest.csv --out runs/compare

Each architecture trains in ``OUT/<arch>`` with the same options (a finished run with the same
config is reused). ``compare.json``, ``compare.csv`` and ``compare.md`` hold one row per
architecture: test accuracy, macro-F1, COVID-19 recall, sick images called "Normal", mean seconds
per epoch and trainable/total parameters, sorted by macro-F1 as the FLANNEL reproduction ranked its
base learners before keeping the best five. ``compare.png`` plots accuracy, macro-F1 and COVID-19
recall per architecture.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
from dataclasses import replace
from pathlib import Path

from flannel.labels import COVID_CLASS, get_scheme
from flannel.registry import build_model, freeze, get_arch
from flannel.train.cli import add_train_options, config_from_args
from flannel.train.config import TrainConfig
from flannel.train.cv import collapsed_note, headline_metrics, train_or_reuse

log = logging.getLogger(__name__)
COLUMNS = ("arch", "evaluated_on", "images", "accuracy", "macro_f1", "covid_recall",
           "sick_called_normal", "collapsed_at_epoch", "seconds_per_epoch", "trainable_params", "total_params",
           "input_size", "run_dir", "reused")
PLOTTED = ("accuracy", "macro_f1", "covid_recall")


def parameter_counts(arch: str, num_classes: int, freeze_policy: str = "none") -> tuple[int, int]:
    """Trainable and total parameters of ``arch`` with a ``num_classes`` head under a freeze policy.

    Args:
        arch: registry name.
        num_classes: outputs of the head.
        freeze_policy: ``none``, ``head`` or ``last:FRACTION`` (``flannel.registry.freeze``).

    Returns:
        ``(trainable, total)``.
    """
    model = freeze(build_model(arch, num_classes), get_arch(arch), freeze_policy)
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def architecture_row(cfg: TrainConfig, report: dict, reused: bool) -> dict:
    """One row of the comparison: the run's headline figures, speed and size."""
    epoch_s = report.get("epoch_seconds") or []
    trainable, total = parameter_counts(cfg.arch, len(get_scheme(cfg.scheme).classes), cfg.freeze)
    return {"arch": cfg.arch, **headline_metrics(report, cfg.scheme),
            "seconds_per_epoch": sum(epoch_s) / len(epoch_s) if epoch_s else None,
            "trainable_params": trainable, "total_params": total,
            "input_size": report["config"]["input_size"], "run_dir": cfg.out, "reused": reused}


def compare_architectures(cfg: TrainConfig, archs: list[str], out_dir: str | Path,
                          overrides: dict[str, dict] | None = None) -> dict:
    """Train every architecture in ``archs`` with ``cfg``'s other settings and compare them.

    Args:
        cfg: the shared training config; its ``arch`` and ``out`` are replaced per architecture.
        archs: registry names, each once.
        out_dir: folder for ``<arch>/`` runs and ``compare.{json,csv,md,png}``; never wiped.
        overrides: per architecture, config fields that differ from ``cfg`` (e.g. ``lr``); each
            run's ``config.json`` records what it used.

    Returns:
        The comparison (also written to ``compare.json``), rows sorted by macro-F1, best first.
    """
    if not archs or len(set(archs)) != len(archs):
        raise ValueError(f"name each architecture once, got {archs}")
    for arch in archs:
        get_arch(arch)  # an unknown name fails before anything trains
    out_dir = Path(out_dir)
    rows = []
    for i, arch in enumerate(archs, 1):
        log.info("architecture %d/%d: %s", i, len(archs), arch)
        arch_cfg = replace(cfg, arch=arch, out=str(out_dir / arch), **(overrides or {}).get(arch, {}))
        if (overrides or {}).get(arch):
            log.info("%s: %s instead of the shared recipe", arch, overrides[arch])
        rows.append(architecture_row(arch_cfg, *train_or_reuse(arch_cfg)))
    rows.sort(key=lambda r: (-r["macro_f1"], -r["accuracy"], r["arch"]))
    result = {"manifest": cfg.manifest, "scheme": cfg.scheme, "covid_class": COVID_CLASS[cfg.scheme],
              "sorted_by": "macro_f1", "rows": rows}
    write_comparison(result, out_dir)
    return result


def compare_markdown(result: dict) -> str:
    """The comparison table in Markdown."""
    lines = [f"# Architectures on {result['manifest']}, best macro-F1 first", "",
             f"| arch | accuracy | macro-F1 | {result['covid_class']} recall | sick called Normal | "
             "s/epoch | trainable params | total params | input |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        speed = "-" if r["seconds_per_epoch"] is None else f"{r['seconds_per_epoch']:.1f}"
        lines.append(f"| {r['arch']}{collapsed_note(r)} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | "
                     f"{r['covid_recall']:.4f} | {r['sick_called_normal']} | {speed} | "
                     f"{r['trainable_params']:,} | {r['total_params']:,} | {r['input_size']} |")
    splits = sorted({r["evaluated_on"] for r in result["rows"]})
    lines += ["", f"Figures from the {' and '.join(splits)} split; ![chart](compare.png)", ""]
    return "\n".join(lines)


def plot_comparison(result: dict, path: Path) -> Path:
    """Grouped bars of accuracy, macro-F1 and COVID-19 recall per architecture."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, width = result["rows"], 0.8 / len(PLOTTED)
    labels = {"accuracy": "accuracy", "macro_f1": "macro-F1",
              "covid_recall": f"{result['covid_class']} recall"}
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(2.5 + 1.2 * len(rows), 4))
    for i, key in enumerate(PLOTTED):
        ax.bar(x + (i - 1) * width, [r[key] for r in rows], width, label=labels[key])
    ax.set_xticks(x, [r["arch"] for r in rows], rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(PLOTTED), fontsize=8,
              frameon=False)  # above the axes, clear of bars that reach 1.0
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_comparison(result: dict, out_dir: Path) -> None:
    """Write compare.json, compare.csv, compare.md and compare.png into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    with (out_dir / "compare.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(result["rows"])
    (out_dir / "compare.md").write_text(compare_markdown(result))
    plot_comparison(result, out_dir / "compare.png")
    log.info("comparison: %s", out_dir / "compare.md")


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def register_subcommand(sub: argparse._SubParsersAction) -> None:
    """Add ``flannel train compare`` with every training option."""
    p = sub.add_parser("compare", help="train several architectures alike and rank them",
                       description=__doc__.splitlines()[0])
    add_train_options(p)
    p.add_argument("--archs", type=_names, required=True,
                   help="architectures, comma-separated (registry names)")
    p.set_defaults(func=run, out="runs/compare")


def run(args: argparse.Namespace) -> int:
    try:
        result = compare_architectures(config_from_args(args), args.archs, args.out)
    except (ValueError, KeyError) as err:
        raise SystemExit(f"flannel train compare: {err.args[0]}") from None
    print(compare_markdown(result))
    return 0
