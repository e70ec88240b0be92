"""Training throughput per precision and memory layout, side by side in one run.

    python -m flannel.benchmarks.train_throughput --archs resnet18,densenet121 --size 224 \
        --out runs/bench/train_throughput.json

Each cell times full training steps (forward, the training loss, backward, Adam step) on a fixed
random batch after warm-up steps, with the same model initialisation for every cell. Figures are
images per second and the ratio to contiguous fp32 of the same architecture, measured in the same
run; the CPU model and thread count are printed beside them. Nothing else should run meanwhile.
"""
from __future__ import annotations

import argparse
import logging
import time
from contextlib import nullcontext

import torch
import torch.nn as nn

from flannel import hardware
from flannel.benchmarks.output import publish
from flannel.registry import build_model
from flannel.train.loop import training_loss

log = logging.getLogger(__name__)
# (precision, channels_last) cells; contiguous fp32 is the reference of every ratio.
CELLS = (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True))


def _time_steps(arch: str, size: int, batch: int, precision: str, channels_last: bool,
                steps: int, warmup: int, seed: int = 0) -> float:
    """Seconds per training step of one cell."""
    torch.manual_seed(seed)
    model = build_model(arch, 3).train()
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 3, (batch,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" \
        else nullcontext

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with ctx():
            loss = training_loss(model, loss_fn, x, y)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def measure_training_throughput(archs: list[str], size: int = 224, batch: int = 16,
                                steps: int = 5, warmup: int = 2,
                                cells=CELLS) -> dict:
    """Images/s of every (architecture, precision, layout) cell, and ratios to contiguous fp32.

    Args:
        archs: registry names.
        size: input side in pixels.
        batch: images per step.
        steps: timed steps per cell (after ``warmup`` untimed ones).
        cells: (precision, channels_last) pairs; ("fp32", False) must come first.

    Returns:
        ``{"machine": ..., "rows": [{arch, precision, layout, images_per_s, ratio_to_fp32}]}``.
    """
    rows = []
    for arch in archs:
        reference = None
        for precision, cl in cells:
            seconds = _time_steps(arch, size, batch, precision, cl, steps, warmup)
            ips = batch / seconds
            reference = reference or ips
            rows.append({"arch": arch, "precision": precision,
                         "layout": "channels_last" if cl else "contiguous",
                         "images_per_s": round(ips, 2), "ratio_to_fp32": round(ips / reference, 2)})
            log.info("%s %s %s: %.1f images/s (%.2fx contiguous fp32)", arch, precision,
                     rows[-1]["layout"], ips, ips / reference)
    auto = hardware.choose_precision("auto")
    return {"machine": {"cpu": hardware.cpu_model(), "threads": torch.get_num_threads(),
                        "capability": torch.backends.cpu.get_cpu_capability(),
                        "native_bf16": hardware.native_bf16_flags()},
            "auto_choice": auto.to_dict(), "size": size, "batch": batch, "steps": steps,
            "rows": rows}


def format_table(result: dict) -> str:
    m = result["machine"]
    lines = [f"Training throughput, {result['size']} px, batch {result['batch']}, on {m['cpu']} "
             f"({m['threads']} threads, {m['capability']}, native bf16: "
             f"{', '.join(m['native_bf16']) or 'none'}); auto picks "
             f"{result['auto_choice']['precision']}", "",
             "| arch | precision | layout | images/s | vs contiguous fp32 |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['arch']} | {r['precision']} | {r['layout']} | {r['images_per_s']:.1f} | "
              f"{r['ratio_to_fp32']:.2f}x |" for r in result["rows"]]
    lines += [""] + [f"- {a['arch']}: auto ({a['auto']}) {a['auto_images_per_s']:.1f} images/s = "
                     f"{a['auto_vs_best_fp32']:.2f}x the best fp32 layout ({a['best_fp32']})"
                     for a in auto_versus_fp32(result)]
    return "\n".join(lines)


def auto_versus_fp32(result: dict) -> list[dict]:
    """Per architecture: the cell ``--precision auto`` trains with (its precision, always
    channels_last) against the fastest fp32 layout measured in the same run."""
    auto = result["auto_choice"]["precision"]
    out = []
    for arch in dict.fromkeys(r["arch"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["arch"] == arch]
        best = max((r for r in rows if r["precision"] == "fp32"), key=lambda r: r["images_per_s"])
        chosen = next((r for r in rows if r["precision"] == auto
                       and r["layout"] == "channels_last"), None)
        if chosen is None:
            continue
        out.append({"arch": arch, "auto": f"{auto} channels_last",
                    "auto_images_per_s": chosen["images_per_s"],
                    "best_fp32": f"fp32 {best['layout']}",
                    "auto_vs_best_fp32": chosen["images_per_s"] / best["images_per_s"]})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="resnet18,densenet121")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", help="also write the figures as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    result = measure_training_throughput(args.archs.split(","), args.size, args.batch, args.steps,
                                         args.warmup)
    publish(result, format_table(result), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
