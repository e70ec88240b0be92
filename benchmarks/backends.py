"""Inference speed per backend, side by side in one run: eager PyTorch fp32 against every backend
whose artifact the export holds and this host can run (ONNX Runtime fp32 and int8, compiled
PyTorch fp32 and bf16, and on GPU hosts ONNX Runtime CUDA and TensorRT), on an exported learner
run or ensemble folder.

    python -m flannel.benchmarks.backends runs/ensemble runs/resnet18 --batches 1,8 \
        --out runs/bench/backends.json

Each cell runs the served graph (the common N x 1 x R x R input, preprocessing inside) on a fixed
random batch after warm-up runs and reports the median ms per image and images/s, with the ratio
to eager fp32 of the same model and batch. Each row says whether its artifact passed its gate;
a backend this host cannot run is listed with the reason instead of a time.
The CPU model and thread count are printed beside the table. Nothing else should run meanwhile.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from flannel import hardware
from flannel.artifacts import export_dir_of, graph_spec, read_manifest
from flannel.cpus import usable_cores
from flannel.handlers.backends import BACKENDS, BackendError, load_backend
from flannel.benchmarks.output import publish
from flannel.timing import median_seconds

log = logging.getLogger(__name__)


def backend_runners(run_dir: Path, threads: int, module: torch.nn.Module | None = None
                    ) -> tuple[dict[str, tuple[Callable, str]], dict[str, str]]:
    """Name -> (run(batch), gate note) for eager fp32 and every backend this run's export offers
    and this host can run; and name -> reason for those it cannot run. ``module``: the eager
    model when the caller has loaded it already."""
    from flannel.export.sources import load_source

    export = export_dir_of(run_dir)
    manifest = read_manifest(export)
    graph = graph_spec(manifest)
    module = (module or load_source(run_dir).module).eval()
    torch.set_num_threads(threads)

    def eager(x: np.ndarray):
        with torch.no_grad():
            return module(torch.from_numpy(x))

    runners = {"eager fp32": (eager, "")}
    skipped = {}
    for spec in BACKENDS.values():
        entry = manifest["artifacts"].get(spec.artifact)
        if entry is None:
            continue
        try:
            engine = load_backend(spec, export, manifest, graph, threads)
        except BackendError as exc:
            skipped[spec.name] = str(exc)
            continue
        gate = entry.get("gate") or {}
        note = "gate passed" if gate.get("passed") else "gate FAILED" if gate else "no gate"
        runners[spec.name] = (engine.run, note)
    return runners, skipped


def measure_backends(run_dirs: list[str | Path], batches: list[int], warmup: int = 2,
                     repeats: int = 5, threads: int | None = None) -> dict:
    threads = threads or usable_cores()
    rows = []
    for run_dir in map(Path, run_dirs):
        manifest = read_manifest(export_dir_of(run_dir))
        side = manifest["input"]["spec"]["resize"]
        members = [m["name"] for m in manifest.get("members", [])]
        runners, skipped = backend_runners(run_dir, threads)
        for name, reason in skipped.items():
            log.info("%s: %s not measured: %s", manifest["model_name"], name, reason)
            rows.append({"model": manifest["model_name"], "kind": manifest["kind"],
                         "members": members, "input": side, "backend": name, "batch": None,
                         "ms_per_image": None, "images_per_s": None, "vs_eager_fp32": None,
                         "note": reason})
        for batch in batches:
            x = np.random.default_rng(0).random((batch, 1, side, side), dtype=np.float32)
            eager_s = None
            for name, (run, note) in runners.items():
                seconds = median_seconds(lambda: run(x), warmup, repeats)
                eager_s = seconds if name == "eager fp32" else eager_s
                row = {"model": manifest["model_name"], "kind": manifest["kind"],
                       "members": members, "input": side, "backend": name, "batch": batch,
                       "ms_per_image": 1000 * seconds / batch, "images_per_s": batch / seconds,
                       "vs_eager_fp32": eager_s / seconds, "note": note}
                log.info("%s %s batch %d: %.1f ms/image (%.2fx eager fp32) %s", row["model"],
                         name, batch, row["ms_per_image"], row["vs_eager_fp32"], note)
                rows.append(row)
    return {"machine": {"cpu": hardware.cpu_model(), "threads": threads,
                        "capability": torch.backends.cpu.get_cpu_capability()},
            "warmup": warmup, "repeats": repeats, "rows": rows}


def format_table(result: dict) -> str:
    m = result["machine"]
    lines = [f"Inference per backend on {m['cpu']} ({m['threads']} threads, {m['capability']}); "
             f"median of {result['repeats']} runs after {result['warmup']} warm-up", "",
             "| model | backend | batch | ms/image | images/s | vs eager fp32 | note |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        if r["batch"] is None:
            lines.append(f"| {r['model']} ({r['input']} px) | {r['backend']} | - | - | - | - | "
                         f"{r['note']} |")
            continue
        lines.append(f"| {r['model']} ({r['input']} px) | {r['backend']} | {r['batch']} | "
                     f"{r['ms_per_image']:.1f} | {r['images_per_s']:.1f} | "
                     f"{r['vs_eager_fp32']:.2f}x | {r['note']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", help="exported learner runs or ensemble folders")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="default: the usable cores")
    p.add_argument("--out", help="also write the figures as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    result = measure_backends(args.run_dirs, [int(b) for b in args.batches.split(",")],
                              args.warmup, args.repeats, args.threads)
    publish(result, format_table(result), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
