"""`flannel bench model`: what one model call costs per backend, subject and batch size.

    flannel bench model runs/real/ensemble_lite runs/real/compare_lr3e-4/resnet18 \
        --batches 1,8,32 --out runs/bench/model

For every subject (an exported learner run or ensemble folder) and every backend it offers and
this host can run (eager fp32; eager bf16 autocast with channels_last where the CPU has native
bf16; then every gated artifact: ONNX Runtime fp32/int8, compiled fp32/bf16, CUDA/TensorRT on GPU
hosts), at each batch size after warm-up calls, it reports the call latency p50/p90/p99, images/s,
the peak resident memory of this process during the cell (every backend of the subject is loaded
by then, so the growth over the cell's start, the batch's working memory, is given too), the achieved GFLOP/s (the model's FLOPs
per image counted by torch's FLOP counter on the eager module, times images/s) as a fraction of the
machine's practical peak measured in the same run: a large fp32 GEMM, ONNX Runtime's int8 GEMM
for int8 backends, and a bf16 GEMM for bf16 ones where the CPU has native bf16; and the
throughput ratio to eager fp32 of the same subject and batch.

Preprocessing (decode + resize + normalise, the serving code path) is timed per image for PNG
(8- and 16-bit), JPEG and DICOM files of radiograph size and printed beside the model's time per
image. Nothing else should run meanwhile; every figure is printed with the CPU's model name.
"""
from __future__ import annotations

import copy
import logging
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from flannel import hardware
from flannel.artifacts import export_dir_of, read_manifest
from flannel.benchmarks.memory import RssSampler
from flannel.cpus import usable_cores

log = logging.getLogger(__name__)
DEFAULT_BATCHES = (1, 8, 32)
# Files for the preprocessing cost: 512 px, the size of the public datasets' images (the 3-class
# set's median side), and 2048 px, the size of a detector's radiograph (most are 2000-3000 px).
PREPROCESS_SIDES = (512, 2048)
PREPROCESS_KINDS = ("png8", "png16", "jpeg", "dcm_mono2")
# bf16 backends are measured against the bf16 GEMM peak, int8 ones against ONNX Runtime's int8
# GEMM, the others against fp32's.
BF16_BACKENDS = ("eager bf16 CL", "torch-bf16")
INT8_BACKENDS = ("ort-int8",)


def peak_of(backend: str) -> str:
    """Which GEMM peak a backend's arithmetic rate is compared with."""
    return "bf16" if backend in BF16_BACKENDS else "int8" if backend in INT8_BACKENDS else "fp32"


def call_times(fn: Callable[[], object], warmup: int, repeats: int) -> np.ndarray:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return np.array(times)


def gemm_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Practical GFLOP/s of this process's threads: the best of ``repeats`` n x n matmuls."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.rand(n, n, generator=gen).to(dtype) for _ in range(2))
    best = call_times(lambda: a @ b, 2, repeats).min()
    return 2 * n ** 3 / best / 1e9


def int8_gemm_peak(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """Practical int8 GOP/s of ONNX Runtime's own u8s8 GEMM (``MatMulInteger``, the kernels
    ort-int8's quantised convolutions run on): VNNI or AMX where the CPU has them, 16-bit pair
    sums on AVX2 alone."""
    from onnx import TensorProto, helper, numpy_helper

    from flannel.backends import make_session

    gen = np.random.default_rng(0)
    b = numpy_helper.from_array(gen.integers(-127, 128, (n, n), dtype=np.int8), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "int8_gemm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])], [b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    session = make_session(model.SerializeToString(), threads)
    a = gen.integers(0, 256, (n, n), dtype=np.uint8)
    best = call_times(lambda: session.run(None, {"a": a}), 2, repeats).min()
    return 2 * n ** 3 / best / 1e9


def flops_per_image(module: torch.nn.Module, side: int) -> float:
    """FLOPs of one image through the eager module (torch's FLOP counter; convolutions and
    matmuls, which are nearly all of a CNN's work)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(torch.rand(1, 1, side, side))
    return float(counter.get_total_flops())


def eager_bf16_runner(module: torch.nn.Module) -> Callable[[np.ndarray], object]:
    """The eager module under bf16 autocast with channels_last weights and inputs."""
    model = copy.deepcopy(module).to(memory_format=torch.channels_last).eval()

    def run(x: np.ndarray):
        batch = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(batch)
    return run


def subject_runners(run_dir: Path, threads: int, with_bf16: bool):
    """(eager module, name -> (run, gate note), name -> reason it is not measured)."""
    from flannel.benchmarks.backends import backend_runners
    from flannel.export.sources import load_source

    module = load_source(run_dir).module.eval()
    runners, skipped = backend_runners(run_dir, threads, module=module)
    if with_bf16:
        runners = {"eager fp32": runners.pop("eager fp32"),
                   "eager bf16 CL": (eager_bf16_runner(module), "autocast"), **runners}
    else:
        skipped["eager bf16 CL"] = hardware.bf16_problem() or ""
    return module, runners, skipped


def measure_cell(run: Callable[[np.ndarray], object], x: np.ndarray, warmup: int,
                 repeats: int) -> dict:
    """Latency percentiles, throughput and peak RSS of one backend at one batch size."""
    with RssSampler() as rss:
        times = call_times(lambda: run(x), warmup, repeats)
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    return {"p50_ms": 1000 * p50, "p90_ms": 1000 * p90, "p99_ms": 1000 * p99,
            "ms_per_image": 1000 * p50 / len(x), "images_per_s": len(x) / p50,
            "peak_rss_mb": rss.peak(), "rss_growth_mb": rss.peak() - rss.first(),
            "calls": int(repeats)}


def preprocess_costs(spec, sides=PREPROCESS_SIDES, repeats: int = 5) -> list[dict]:
    """ms per image to prepare files of each kind and side through the handler's own function
    (``flannel.handlers.serving.prepare_item``), and of that the decoding alone (the rest is the
    intensity policy, the resize and the normalisation)."""
    from flannel.data.synth import SynthConfig, render, write_image
    from flannel.decode import decode_gray
    from flannel.handlers.serving import prepare_item

    rows = []
    with tempfile.TemporaryDirectory(prefix="flannel-bench-") as tmp:
        for side in sides:
            img, _ = render("Normal", SynthConfig(size=side), np.random.default_rng(0))
            for kind in PREPROCESS_KINDS:
                path = Path(tmp) / f"cxr{side}.{kind}"
                write_image(path, img, kind, uid_key="bench")
                data = path.read_bytes()
                total = call_times(lambda: prepare_item(data, spec), 1, repeats)
                decode = call_times(lambda: decode_gray(data), 1, repeats)
                rows.append({"kind": kind, "side": side, "bytes": len(data),
                             "ms_per_image": 1000 * float(np.median(total)),
                             "decode_ms": 1000 * float(np.median(decode))})
    return rows


def bench_model(run_dirs: list[str | Path], batches=DEFAULT_BATCHES, warmup: int = 2,
                repeats: int = 10, threads: int | None = None,
                preprocess_repeats: int = 5) -> dict:
    """Measure every subject x backend x batch cell; returns the figures (see module doc)."""
    from flannel.preprocess import PreprocessSpec

    threads = threads or usable_cores()
    torch.set_num_threads(threads)
    native_bf16 = hardware.bf16_problem() is None
    peaks = {"fp32": gemm_peak(torch.float32), "int8": int8_gemm_peak(threads)}
    if native_bf16:
        peaks["bf16"] = gemm_peak(torch.bfloat16)
    log.info("GEMM peak on %s, %d threads: %s", hardware.cpu_model(), threads,
             ", ".join(f"{k} {v:.0f} {'GOP' if k == 'int8' else 'GFLOP'}/s"
                       for k, v in peaks.items()))
    rows, skipped_rows, preprocess = [], [], []
    for run_dir in map(Path, run_dirs):
        manifest = read_manifest(export_dir_of(run_dir))
        side = manifest["input"]["spec"]["resize"]
        subject = {"model": manifest["model_name"], "kind": manifest["kind"], "input": side,
                   "members": [m["name"] for m in manifest.get("members", [])]}
        module, runners, skipped = subject_runners(run_dir, threads, native_bf16)
        flops = flops_per_image(module, side)
        skipped_rows += [{**subject, "backend": n, "reason": r} for n, r in skipped.items()]
        for batch in batches:
            x = np.random.default_rng(0).random((batch, 1, side, side), dtype=np.float32)
            eager = None
            for name, (run, note) in runners.items():
                cell = measure_cell(run, x, warmup, repeats)
                eager = cell["images_per_s"] if name == "eager fp32" else eager
                gflops = flops * cell["images_per_s"] / 1e9
                peak = peaks[peak_of(name)]
                row = {**subject, "backend": name, "batch": batch, **cell, "note": note,
                       "gflop_per_image": flops / 1e9, "gflops": gflops,
                       "peak_fraction": gflops / peak, "vs_eager_fp32": cell["images_per_s"] / eager}
                log.info("%s %s batch %d: p50 %.1f ms, %.1f img/s (%.2fx eager fp32), %.0f GFLOP/s "
                         "(%.0f%% of peak), peak RSS %.0f MB", subject["model"], name, batch,
                         row["p50_ms"], row["images_per_s"], row["vs_eager_fp32"], gflops,
                         100 * row["peak_fraction"], row["peak_rss_mb"])
                rows.append(row)
        spec = PreprocessSpec.from_dict(manifest["input"]["spec"])
        for cost in preprocess_costs(spec, repeats=preprocess_repeats):
            preprocess.append({**subject, **cost})
    best = {}
    for r in rows:  # the fastest gated backend per subject at the largest batch measured
        if r["batch"] == max(batches) and r["note"] != "gate FAILED" and (
                r["model"] not in best or r["images_per_s"] > best[r["model"]]["images_per_s"]):
            best[r["model"]] = r
    for p in preprocess:
        model_ms = best[p["model"]]["ms_per_image"]
        p.update(model_backend=best[p["model"]]["backend"], model_ms_per_image=model_ms,
                 fraction_of_model=p["ms_per_image"] / model_ms)
    return {"machine": {"cpu": hardware.cpu_model(), "threads": threads,
                        "capability": torch.backends.cpu.get_cpu_capability(),
                        "native_bf16": hardware.native_bf16_flags(),
                        "gemm_peak_gflops": peaks,
                        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
            "warmup": warmup, "repeats": repeats, "batches": list(batches), "rows": rows,
            "not_measured": skipped_rows, "preprocess": preprocess}


def format_summary(result: dict) -> str:
    """Markdown tables: backends per subject and batch, then the preprocessing cost."""
    m = result["machine"]
    peaks = ", ".join(f"{k} {v:.0f} {'GOP' if k == 'int8' else 'GFLOP'}/s"
                      for k, v in m["gemm_peak_gflops"].items())
    lines = [f"# Model benchmark on {m['cpu']}", "",
             f"{m['threads']} threads, torch CPU capability {m['capability']}, native bf16: "
             f"{', '.join(m['native_bf16']) or 'none'}; GEMM peak (same run): {peaks}; "
             f"{result['repeats']} timed calls after {result['warmup']} warm-up per cell.", "",
             "| model | backend | batch | p50 ms | p90 ms | p99 ms | ms/image | images/s | "
             "vs eager fp32 | GFLOP/s | % of peak | peak RSS MB (+cell) | gate |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['backend']} | {r['batch']} | {r['p50_ms']:.1f} | "
                     f"{r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['ms_per_image']:.2f} | "
                     f"{r['images_per_s']:.1f} | {r['vs_eager_fp32']:.2f}x | {r['gflops']:.0f} | "
                     f"{100 * r['peak_fraction']:.0f}% ({peak_of(r['backend'])}) | "
                     f"{r['peak_rss_mb']:.0f} "
                     f"(+{r['rss_growth_mb']:.0f}) | {r['note']} |")
    for s in result["not_measured"]:
        lines.append(f"| {s['model']} | {s['backend']} | - | - | - | - | - | - | - | - | - | - | "
                     f"not measured: {s['reason']} |")
    lines += ["", "Preprocessing per image (the handler's code: decode, then the intensity policy, "
              "resize and normalisation) beside the fastest gated backend's model time per image "
              "at the largest batch:", "",
              "| model | file | side | bytes | preprocess ms | of which decode ms | "
              "model ms (backend) | preprocess / model |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in result["preprocess"]:
        lines.append(f"| {p['model']} | {p['kind']} | {p['side']} | {p['bytes']:,} | "
                     f"{p['ms_per_image']:.1f} | {p['decode_ms']:.1f} | "
                     f"{p['model_ms_per_image']:.1f} ({p['model_backend']}) | "
                     f"{100 * p['fraction_of_model']:.0f}% |")
    return "\n".join(lines)


def plot_backends(result: dict, out: Path) -> Path:
    """Bar chart: images/s per backend for each subject at the largest batch."""
    from flannel.benchmarks.output import pyplot, save_figure

    plt = pyplot()

    batch = max(result["batches"])
    rows = [r for r in result["rows"] if r["batch"] == batch]
    models = list(dict.fromkeys(r["model"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(models) * len(backends) / 3, 4))
    width = 0.8 / len(backends)
    for i, b in enumerate(backends):
        vals = [next((r["images_per_s"] for r in rows if r["model"] == m and r["backend"] == b), 0)
                for m in models]
        ax.bar([j + i * width for j in range(len(models))], vals, width, label=b)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models)
    ax.set_ylabel(f"images/s at batch {batch}")
    ax.legend(fontsize=7)
    return save_figure(fig, out, "model_backends.png", f"Backends on {result['machine']['cpu']} "
                       f"({result['machine']['threads']} threads)")


def plot_batch_scaling(result: dict, out: Path) -> Path:
    """Lines: images/s against batch size, one line per subject and backend."""
    from flannel.benchmarks.output import pyplot, save_figure

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    keys = list(dict.fromkeys((r["model"], r["backend"]) for r in result["rows"]))
    for model, backend in keys:
        pts = [(r["batch"], r["images_per_s"]) for r in result["rows"]
               if (r["model"], r["backend"]) == (model, backend)]
        ax.plot(*zip(*pts), marker="o", label=f"{model} {backend}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s")
    ax.legend(fontsize=6)
    return save_figure(fig, out, "model_batch_scaling.png",
                       f"Throughput against batch size, {result['machine']['cpu']}")
