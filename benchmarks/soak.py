"""Soak and worst-case memory runs against a running TorchServe: does the service hold up?

    flannel bench soak --model ensemble --config config.properties --minutes 5 --concurrency 4
    flannel bench soak --model ensemble --worst-case          # peak worker RSS, 8 worst-case inputs

Soak: closed-loop clients send real-sized radiographs (PNG and DICOM) for a fixed time; every
answer is compared with the answer the same file got alone before the run, so an error, a wrong or
a swapped answer is counted, not only a missing one. Each worker's resident memory is sampled
throughout; growth is measured from the end of the warm-up to the end of the run (target: below
10%). Worst case: one batch of 8 concurrent requests of the largest image the serving pixel limit
admits (a flat PNG of a few tens of KB that decodes to the limit), with the worker's RSS sampled
every few milliseconds; without per-item resizing that batch would hold 8 full-resolution float32
copies at once. Neither runs in CI: they take minutes and their figures are read, not asserted.
"""
from __future__ import annotations

import io
import logging
import math
import threading
import time
from pathlib import Path

import numpy as np

from flannel import hardware
from flannel.benchmarks.memory import RssSampler, rss_mb
from flannel.cpus import usable_cores
from flannel.handlers.management import worker_pids

log = logging.getLogger(__name__)

# Growth of worker RSS from the end of the warm-up to the end of the run, in percent.
RSS_GROWTH_TARGET_PCT = 10.0
WORST_CASE_REQUESTS = 8


def soak_files(folder: Path, side: int = 2048, count: int = 4) -> list[Path]:
    """Real-sized inputs: synthetic radiograph PNGs of ``side`` px and, when installed, the
    pydicom test radiograph."""
    from flannel.benchmarks.serve import radiograph_png
    from flannel.samples import real_chest_dicom

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        path = folder / f"soak-{side}-{i}.png"
        if not path.is_file():
            radiograph_png(path, side - 16 * i)  # slightly different sizes: different answers
        files.append(path)
    dicom = real_chest_dicom()
    return files + ([Path(dicom)] if dicom else [])


def soak(config: str | Path, model: str, files: list[Path], *, seconds: float = 300.0,
         concurrency: int = 4, warmup_s: float = 30.0, sample_s: float = 1.0) -> dict:
    """Closed-loop load for ``seconds``, every answer checked, worker RSS sampled.

    Returns:
        Counts (answered, errors, wrong answers), throughput and latency percentiles, the RSS
        timeline per worker and its growth after the warm-up.
    """
    from flannel.handlers.client import NO_RETRY, Client

    # Each request sent once: a retry would hide the very failures a soak is looking for.
    client = Client.from_config(config, model=model, retry=NO_RETRY)
    info = client.info
    reference = {}
    for result in client.predict(files):
        if not result.ok:
            raise RuntimeError(f"{result.file} is not answered alone: {result.summary()}")
        reference[result.file] = np.array(list(result.probabilities.values()))
    pids = worker_pids(info, model)
    lock = threading.Lock()
    counts = {"answered": 0, "errors": 0, "wrong": 0}
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    deadline = time.perf_counter() + seconds

    def worker(k: int) -> None:
        i = k
        while time.perf_counter() < deadline:
            path = files[i % len(files)]
            i += concurrency
            start = time.perf_counter()
            (result,) = client.predict([path])
            elapsed = time.perf_counter() - start
            with lock:
                statuses[result.status] = statuses.get(result.status, 0) + 1
                if not result.ok:
                    counts["errors"] += 1
                    continue
                counts["answered"] += 1
                latencies.append(elapsed)
                got = np.array(list(result.probabilities.values()))
                if not np.allclose(got, reference[str(path)], atol=1e-6):
                    counts["wrong"] += 1

    log.info("soak: %d clients for %.0f s against %s on %s (workers %s)", concurrency, seconds,
             model, info.inference_url, pids)
    with RssSampler(pids, sample_s) as sampler:
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
    timeline = [{"t_s": round(t, 2), **{str(p): round(v, 1) for p, v in rss.items()}}
                for t, rss in sampler.samples]
    growth = {}
    for pid in pids:
        after = [rss[pid] for t, rss in sampler.samples if t >= warmup_s and not math.isnan(rss[pid])]
        if len(after) >= 2:
            growth[str(pid)] = {"after_warmup_mb": round(after[0], 1),
                                "end_mb": round(after[-1], 1), "max_mb": round(max(after), 1),
                                "growth_pct": round(100 * (after[-1] / after[0] - 1), 2)}
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {"machine": {"cpu": hardware.cpu_model(), "cores": usable_cores()},
            "model": model, "files": [str(f) for f in files], "concurrency": concurrency,
            "seconds": round(wall, 1), "warmup_s": warmup_s, **counts, "statuses": statuses,
            "throughput": round(counts["answered"] / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "workers_still_the_same": worker_pids(info, model) == pids,
            "rss_growth": growth, "rss_timeline": timeline,
            "rss_growth_target_pct": RSS_GROWTH_TARGET_PCT}


def flat_png(side: int) -> bytes:
    """A flat gray PNG of side x side pixels: tens of KB that decode to side**2 pixels."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (side, side), 128).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def worst_case(config: str | Path, model: str, max_pixels: int, folder: Path,
               requests: int = WORST_CASE_REQUESTS, sample_s: float = 0.005) -> dict:
    """Peak worker RSS while ``requests`` concurrent requests of the largest admitted image are
    answered (one batch when the archive's batch size allows)."""
    from concurrent.futures import ThreadPoolExecutor

    from flannel.handlers.client import NO_RETRY, Client

    side = math.isqrt(max_pixels)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"flat-{side}.png"
    path.write_bytes(flat_png(side))
    client = Client.from_config(config, model=model, retry=NO_RETRY)
    pids = worker_pids(client.info, model)
    time.sleep(1.0)
    before = rss_mb(pids)
    with RssSampler(pids, sample_s) as sampler:
        with ThreadPoolExecutor(requests) as pool:
            results = list(pool.map(lambda _: client.predict([path])[0], range(requests)))
    peak = {pid: sampler.peak(pid) for pid in pids}
    decoded_mb = side * side * 4 / 2**20
    return {"machine": {"cpu": hardware.cpu_model(), "cores": usable_cores()}, "model": model,
            "image": {"side": side, "file_kb": round(path.stat().st_size / 1024, 1),
                      "float32_decoded_mb": round(decoded_mb, 1)},
            "requests": requests, "statuses": [r.status for r in results],
            "rss_before_mb": {str(p): round(v, 1) for p, v in before.items()},
            "rss_peak_mb": {str(p): round(v, 1) for p, v in peak.items()},
            "rss_rise_mb": {str(p): round(peak[p] - before[p], 1) for p in pids},
            "all_at_once_mb": round(requests * decoded_mb, 1),
            "samples": len(sampler.samples)}


def format_soak(result: dict) -> str:
    lines = [f"# Soak: {result['model']} on {result['machine']['cpu']} "
             f"({result['machine']['cores']} cores)", "",
             f"{result['concurrency']} clients for {result['seconds']} s: {result['answered']} "
             f"answered, {result['errors']} errors, {result['wrong']} wrong answers; "
             f"{result['throughput']} req/s, p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms; "
             f"statuses {result['statuses']}; same workers throughout: "
             f"{result['workers_still_the_same']}", "",
             "| worker | RSS after warm-up MB | end MB | max MB | growth % |",
             "| --- | --- | --- | --- | --- |"]
    for pid, g in result["rss_growth"].items():
        lines.append(f"| {pid} | {g['after_warmup_mb']} | {g['end_mb']} | {g['max_mb']} | "
                     f"{g['growth_pct']} |")
    lines.append(f"\nTarget: growth below {result['rss_growth_target_pct']}% after "
                 f"{result['warmup_s']} s of warm-up, zero errors.")
    return "\n".join(lines)


def format_worst_case(result: dict) -> str:
    image = result["image"]
    return "\n".join([
        f"# Worst-case batch: {result['model']} on {result['machine']['cpu']}", "",
        f"{result['requests']} concurrent requests of a flat {image['side']}x{image['side']} PNG "
        f"({image['file_kb']} KB, {image['float32_decoded_mb']} MB decoded as float32): "
        f"statuses {result['statuses']}.",
        f"Worker RSS before {result['rss_before_mb']} MB, peak {result['rss_peak_mb']} MB, "
        f"rise {result['rss_rise_mb']} MB (all {result['requests']} decoded images held at once "
        f"would be {result['all_at_once_mb']} MB)."])


def plot_rss(result: dict, out: Path) -> Path | None:
    """Each worker's RSS over the soak, with the end of the warm-up marked."""
    from flannel.benchmarks.output import pyplot, save_figure

    timeline = result.get("rss_timeline")
    if not timeline:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for pid in result["rss_growth"] or [k for k in timeline[0] if k != "t_s"]:
        ax.plot([s["t_s"] for s in timeline], [s[pid] for s in timeline], label=f"worker {pid}")
    ax.axvline(result["warmup_s"], ls="--", color="gray", label="end of warm-up")
    ax.set_xlabel("seconds")
    ax.set_ylabel("worker RSS MB")
    ax.legend(fontsize=7)
    return save_figure(fig, out, "soak_rss.png",
                       f"Soak, {result['concurrency']} clients, {result['machine']['cpu']}")
