"""What every benchmark script does with its figures: print the table, keep the JSON.

    python -m flannel.benchmarks.backends RUN_DIR --out runs/bench/backends.json
"""
from __future__ import annotations

import json
from pathlib import Path


def publish(result: dict, table: str, out: str | None) -> None:
    """Print ``table``; when ``out`` is given, also write ``result`` there as JSON."""
    print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
