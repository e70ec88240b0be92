"""Peak memory of decoding a full batch of the worst input each format admits, and what the
hostile inputs get: `flannel bench decode`.

    flannel bench decode                              # the decoder's default pixel limit, batch 8
    flannel bench decode --max-pixels 16000000 --only "PNG,RLE" --out runs/bench/decode

Each input (``benchmarks/decode_inputs.py``) is measured in a fresh process, so that memory one
input left with the allocator cannot hide another's: the process warms the decoders up on small
files, holds ``batch`` copies of the input (the request bodies a worker holds), then decodes and
preprocesses them as the handler does (``flannel.handlers.serving._prepare`` on
``ServedModel.map_items``, ``prepare_threads`` at a time) while its RSS is sampled every 2 ms
(``benchmarks/memory.py``). Reported per input: the answers, the file size, RSS before the batch,
its peak, and the growth, which is what the decoder and preprocessing cost on top of the bodies.
Run it on an otherwise quiet machine; the figures are read, not asserted.
"""
from __future__ import annotations

import gc
import logging
import time

from flannel import hardware
from flannel.benchmarks.decode_inputs import Input, admitted_inputs, hostile_inputs
from flannel.benchmarks.memory import RssSampler
from flannel.decode import DEFAULT_MAX_PIXELS

log = logging.getLogger(__name__)

# TorchServe's batch size for the served archives (model-config.yaml batchSize).
BATCH = 8
# Characters of a refusal kept in the table.
ERROR_CHARS = 90


def decoding_model(max_pixels: int, threads: int):
    """A ``ServedModel`` that only prepares items: the handler's decode and preprocessing under
    ``max_pixels`` on ``threads`` threads, with no backend."""
    from flannel.handlers.serving import ServedModel
    from flannel.preprocess import PreprocessSpec

    return ServedModel(name="decode-bench", version="0", class_names=[], backend=None,
                       spec=PreprocessSpec(max_pixels=max_pixels), input_name="input",
                       output_name="probabilities", explainer=None, prepare_threads=threads,
                       max_pixels=max_pixels)


def _inputs(kind: str, max_pixels: int) -> list[Input]:
    return admitted_inputs(max_pixels) if kind == "admitted" else hostile_inputs()


def prepare_item(model, body: bytes):
    """One item through the handler's preparation: its ``Prepared`` input, or the answer
    refusing it."""
    from flannel.decode import InputError
    from flannel.handlers.serving import _prepare, error_answer

    try:
        return _prepare(model, body)
    except InputError as exc:
        return error_answer(exc)


def _warm_up(model) -> None:
    """Import and initialise every decoder on small files, so the batch measures decoding."""
    for item in admitted_inputs(256 * 256):
        prepare_item(model, item.build())


def measure_input(kind: str, index: int, max_pixels: int, batch: int, threads: int) -> dict:
    """Decode and preprocess ``batch`` copies of one input as the handler does; RSS sampled.

    Returns:
        The input's name, kind, size and expected status, the answers' statuses, the first
        refusal's text, RSS before and at the peak (MB), their difference, and wall seconds.
    """
    from flannel.handlers.serving import Answer

    item = _inputs(kind, max_pixels)[index]
    model = decoding_model(max_pixels, threads)
    _warm_up(model)
    data = item.build()
    bodies = [bytes(bytearray(data)) for _ in range(batch)]  # one body per request
    size = len(data)
    del data
    gc.collect()
    start = time.perf_counter()
    with RssSampler() as rss:
        answers = model.map_items(lambda body: prepare_item(model, body), bodies)
    wall = time.perf_counter() - start
    statuses = [a.status if isinstance(a, Answer) else 200 for a in answers]
    error = next((a.body.get("error", "") for a in answers if isinstance(a, Answer)), "")
    return {"input": item.name, "kind": kind, "file_kb": round(size / 1024, 1),
            "expected": item.status, "statuses": statuses,
            "as_expected": all(s == item.status for s in statuses),
            "error": error[:ERROR_CHARS], "rss_before_mb": round(rss.first(), 1),
            "rss_peak_mb": round(rss.peak(), 1), "growth_mb": round(rss.peak() - rss.first(), 1),
            "seconds": round(wall, 2)}


def bench_decode(max_pixels: int = DEFAULT_MAX_PIXELS, batch: int = BATCH,
                 threads: int | None = None, only: list[str] | None = None) -> dict:
    """``measure_input`` for every admitted and hostile input (or those whose name contains
    one of ``only``), each in a fresh spawned process.

    Args:
        threads: items prepared at once; default the handler's (``resolve_threads``).

    Returns:
        The machine, the settings and one row per input.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from flannel.cpus import usable_cores
    from flannel.handlers.serving import resolve_threads

    threads = threads or resolve_threads({})
    context = multiprocessing.get_context("spawn")
    rows = []
    for kind in ("admitted", "hostile"):
        for index, item in enumerate(_inputs(kind, max_pixels)):
            if only and not any(o.strip().lower() in item.name.lower() for o in only):
                continue
            with ProcessPoolExecutor(1, mp_context=context) as pool:
                row = pool.submit(measure_input, kind, index, max_pixels, batch, threads).result()
            log.info("%s: %s, RSS +%.0f MB", row["input"], row["statuses"], row["growth_mb"])
            rows.append(row)
    return {"machine": {"cpu": hardware.cpu_model(), "cores": usable_cores()},
            "max_pixels": max_pixels, "batch": batch, "prepare_threads": threads, "rows": rows}


def format_decode(result: dict) -> str:
    """Markdown: one table of admitted inputs and one of hostile ones, with the machine."""
    machine = result["machine"]
    lines = [f"Decode and preprocess, batch of {result['batch']} on {result['prepare_threads']} "
             f"threads, pixel limit {result['max_pixels']}: {machine['cpu']}, "
             f"{machine['cores']} cores.", ""]
    for kind, title in (("admitted", "Worst admitted input of each format (at the limit)"),
                        ("hostile", "Hostile inputs")):
        rows = [r for r in result["rows"] if r["kind"] == kind]
        if not rows:
            continue
        lines += [f"**{title}**", "", "| input | file KB | answers | RSS before MB | peak MB | "
                  "growth MB |" + (" refusal |" if kind == "hostile" else ""),
                  "|---|---:|---|---:|---:|---:|" + ("---|" if kind == "hostile" else "")]
        for r in rows:
            answers = ", ".join(f"{s}x{r['statuses'].count(s)}" for s in sorted(set(r["statuses"])))
            flag = "" if r["as_expected"] else f" (expected {r['expected']})"
            error = f" {r['error'].replace('|', '/')} |" if kind == "hostile" else ""
            lines.append(f"| {r['input']} | {r['file_kb']:g} | {answers}{flag} | "
                         f"{r['rss_before_mb']:.0f} | {r['rss_peak_mb']:.0f} | "
                         f"{r['growth_mb']:.0f} |{error}")
        lines.append("")
    admitted = [r for r in result["rows"] if r["kind"] == "admitted"]
    if admitted:
        worst = max(admitted, key=lambda r: r["growth_mb"])
        lines.append(f"Largest growth for an admitted batch: {worst['growth_mb']:.0f} MB "
                     f"({worst['input']}).")
    return "\n".join(lines)
