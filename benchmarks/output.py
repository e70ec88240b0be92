"""What every benchmark does with its figures: print a summary, keep JSON, CSV, Markdown, plots.

    flannel bench model RUN_DIR --out runs/bench/model    # model.json, model.csv, model.md, *.png
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable, Sequence


def publish(result: dict, table: str, out: str | None) -> None:
    """Print ``table``; when ``out`` is given, also write ``result`` there as JSON."""
    print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")


def write_csv(rows: Sequence[dict], path: Path) -> Path:
    """One CSV row per dict; list values joined by '+'."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "+".join(map(str, v)) if isinstance(v, list) else v
                             for k, v in r.items()})
    return path


def write_outputs(result: dict, summary: str, out_dir: str | Path, stem: str,
                  plots: Sequence[Callable[[dict, Path], Path | None]] = ()) -> list[Path]:
    """Print ``summary`` and write ``<stem>.json`` (everything), ``<stem>.csv`` (the rows),
    ``<stem>.md`` (the summary) and each plot's PNG into ``out_dir``. Returns the files."""
    print(summary)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"{stem}.json", out / f"{stem}.md"]
    files[0].write_text(json.dumps(result, indent=2) + "\n")
    files[1].write_text(summary + "\n")
    if result.get("rows"):
        files.append(write_csv(result["rows"], out / f"{stem}.csv"))
    for plot in plots:
        path = plot(result, out)
        if path is not None:
            files.append(path)
    return files


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (benchmarks run on headless machines)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, out: Path, name: str, title: str) -> Path:
    """Title, tighten, save as ``out/name`` at 120 dpi and close; returns the path."""
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(out) / name
    fig.savefig(path, dpi=120)
    fig.clf()
    pyplot().close(fig)
    return path
