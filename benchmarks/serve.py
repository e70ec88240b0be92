"""`flannel bench serve`: a live TorchServe under load, over HTTP and gRPC, against the stock path.

    flannel bench serve runs/real/ensemble_lite --out runs/bench/serve

Builds, from one exported run, an archive per serving variant (dynamic batching on and off, 1 and
2 workers; batch size and delay as ``flannel archive`` writes them) and the stock baseline (the
same model as a TorchScript trace behind a stock-style handler: per-request PIL/torchvision
preprocessing, batch size 1; ``benchmarks/stock_handler.py``), starts one private TorchServe on
free loopback ports with all of them, and for each variant, protocol and concurrency level (1, 2,
4, 8, 16, 32) sends a warm-up, then a fixed number of requests of one radiograph-sized PNG within
a time bound. It stops the server afterwards.

The load generator is closed-loop: ``concurrency`` client threads each send their next request when
the previous answer arrives, using the same HTTP (requests) and gRPC (stubs generated from
TorchServe's protos) paths as ``flannel predict``. Threads suffice because clients wait on sockets
(the GIL is released), the request count per level is exact, and no load-testing dependency is
added; latency is measured around each call.

Per level: latency p50/p90/p95/p99, throughput, error rate, and from TorchServe's metrics endpoint
the mean queue time and inference time per request (frontend counters) and the handler's time
per batch (the worker's last PredictionTime; TorchServe 0.12 exposes no latency counters for
gRPC requests, so those columns are empty for gRPC), and from the product handler's own metrics
(both protocols) its mean batch and its decode, preprocessing and model ms per image. The same
backend's model-level throughput at the archive's batch size and its batch-1 latency are measured
in the same run before the server starts, so served figures read as fractions of them.
"""
from __future__ import annotations

import json
import logging
import re
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from flannel import hardware
from flannel.cpus import usable_cores

log = logging.getLogger(__name__)
LEVELS = (1, 2, 4, 8, 16, 32)
STOCK = "stock"
PAYLOAD_SIDE = 2048
METRIC_NAMES = ("ts_inference_requests_total", "ts_inference_latency_microseconds",
                "ts_queue_latency_microseconds", "PredictionTime", "FlannelBatchSize_sum",
                "FlannelBatchSize_count", "FlannelDecodeMs_sum", "FlannelPreprocessMs_sum",
                "FlannelInferenceMs_sum")


@dataclass(frozen=True)
class Variant:
    """One serving configuration of the product's handler."""

    name: str
    batch_size: int
    max_batch_delay_ms: int
    workers: int


def default_variants(batch_size: int | None = None,
                     delays_ms: tuple[int, ...] | None = None) -> list[Variant]:
    """Batching on (the archive defaults) and off, each with 1 and 2 workers; with several
    ``delays_ms``, batching on once per delay (named ``batch8-d5-w1``...)."""
    from flannel.handlers.archive import DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_DELAY_MS

    b = batch_size or DEFAULT_BATCH_SIZE
    delays = tuple(delays_ms or (DEFAULT_MAX_BATCH_DELAY_MS,))
    out = []
    for workers in (1, 2):
        for d in delays:
            tag = f"-d{d}" if len(delays) > 1 else ""
            out.append(Variant(f"batch{b}{tag}-w{workers}", b, d, workers))
        out.append(Variant(f"nobatch-w{workers}", 1, 0, workers))
    return out


def radiograph_png(path: Path, side: int = PAYLOAD_SIDE) -> Path:
    """A synthetic chest radiograph of ``side`` px as an 8-bit PNG (the request payload)."""
    from flannel.data.synth import SynthConfig, render, write_image

    img, _ = render("Normal", SynthConfig(size=side), np.random.default_rng(0))
    write_image(path, img, "png8")
    return path


def build_stock_archive(run_dir: Path, store: Path, name: str = STOCK) -> Path:
    """The stock baseline: TorchScript trace + stock-style handler, batch size 1, one worker."""
    import shutil

    import torch
    import yaml
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import package_model
    from model_archiver.model_packaging_utils import ModelExportUtils

    from flannel.artifacts import INDEX_TO_NAME, artifact_path, export_dir_of, read_manifest
    from flannel.export.sources import load_source
    from flannel.handlers.trust import trust_archive

    export = export_dir_of(run_dir)
    manifest = read_manifest(export)
    side = manifest["input"]["spec"]["resize"]
    module = load_source(run_dir).module.eval()
    with tempfile.TemporaryDirectory(prefix="flannel-stock-") as tmp:
        tmp = Path(tmp)
        with torch.no_grad(), warnings.catch_warnings():
            # TorchScript is what the stock path serves; its deprecation notice is not ours.
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace(module, torch.rand(1, 1, side, side), strict=False)
        traced.save(str(tmp / "model.pt"))
        (tmp / "stock_config.json").write_text(json.dumps({"side": side}))
        shutil.copy(artifact_path(export, manifest, INDEX_TO_NAME), tmp / "index_to_name.json")
        (tmp / "model-config.yaml").write_text(yaml.safe_dump(
            {"minWorkers": 1, "maxWorkers": 1, "batchSize": 1, "maxBatchDelay": 0,
             "responseTimeout": 120}))
        config = ModelArchiverConfig(
            model_name=name, handler=str(Path(__file__).with_name("stock_handler.py")),
            version="1.0", serialized_file=str(tmp / "model.pt"),
            extra_files=f"{tmp / 'stock_config.json'},{tmp / 'index_to_name.json'}",
            export_path=str(store), force=True, config_file=str(tmp / "model-config.yaml"))
        package_model(config, manifest=ModelExportUtils.generate_manifest_json(config))
    mar = store / f"{name}.mar"
    trust_archive(mar)  # built here, so listed: `flannel serve start` refuses unlisted archives
    return mar


def closed_loop(send: Callable[[], int], concurrency: int, total: int,
                time_limit: float) -> dict:
    """``concurrency`` threads send ``total`` requests between them (fewer if ``time_limit``
    seconds pass first); returns each request's latency and status and the wall time."""
    lock = threading.Lock()
    issued = [0]
    records: list[tuple[float, int]] = []
    deadline = time.perf_counter() + time_limit

    def worker() -> None:
        while True:
            with lock:
                if issued[0] >= total or time.perf_counter() > deadline:
                    return
                issued[0] += 1
            start = time.perf_counter()
            try:
                status = send()
            except Exception as exc:  # noqa: BLE001 - any client failure counts as an error
                log.debug("request failed: %s", exc)
                status = 0
            with lock:
                records.append((time.perf_counter() - start, status))

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": [r[0] for r in records], "statuses": [r[1] for r in records],
            "seconds": time.perf_counter() - started}


def http_sender(url: str, model: str, token: str, payload: bytes) -> Callable[[], int]:
    import requests

    local = threading.local()
    endpoint = f"{url.rstrip('/')}/predictions/{model}"
    headers = {"Authorization": f"Bearer {token}"}

    def send() -> int:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        return local.session.post(endpoint, data=payload, headers=headers, timeout=120).status_code
    return send


def grpc_sender(target: str, model: str, token: str, payload: bytes) -> Callable[[], int]:
    """gRPC Predictions on one shared channel; the status is read as ``flannel predict`` reads it
    (TorchServe answers gRPC OK with the handler's JSON error body for a refused item)."""
    import grpc

    from flannel.handlers.client import _GRPC_TO_HTTP, _parse
    from flannel.handlers.grpc_stubs import load_stubs

    stubs = load_stubs()
    channel = grpc.insecure_channel(target, options=[
        ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)])
    stub = stubs["inference_pb2_grpc"].InferenceAPIsServiceStub(channel)
    metadata = [("authorization", f"Bearer {token}")]
    request = stubs["inference_pb2"].PredictionsRequest(model_name=model, input={"data": payload})

    def send() -> int:
        try:
            reply = stub.Predictions(request, metadata=metadata, timeout=120)
        except grpc.RpcError as exc:
            return _GRPC_TO_HTTP.get(exc.code().name, 500)
        body = _parse(reply.prediction.decode("utf-8", errors="replace"))
        return int(body.get("code", 400)) if body is not None and "error" in body else 200
    return send


_LINE = re.compile(r'^(\w+)\{([^}]*)\}\s+([-+0-9.eE]+|NaN)$')


def scrape(metrics_url: str) -> dict[tuple[str, str], float]:
    """(metric, model) -> value for ``METRIC_NAMES`` from TorchServe's Prometheus endpoint."""
    import requests

    return parse_metrics(requests.get(f"{metrics_url.rstrip('/')}/metrics", timeout=10).text)


def parse_metrics(text: str) -> dict[tuple[str, str], float]:
    """(metric, model) -> value of ``METRIC_NAMES`` in Prometheus text, summed over other
    labels (model versions, hosts)."""
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if not m or m.group(1) not in METRIC_NAMES:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        model = labels.get("model_name") or labels.get("ModelName") or ""
        out[(m.group(1), model)] = out.get((m.group(1), model), 0.0) + float(m.group(3))
    return out


def server_side(before: dict, after: dict, model: str, protocol: str = "http") -> dict:
    """Where a level's time went, from the metrics endpoint: mean queue and inference ms per
    request (TorchServe's frontend counters), the worker's last PredictionTime (ms for one
    handler call, i.e. one batch), and from the product's handler its mean batch size and its
    decode, preprocessing and model ms per image.

    TorchServe 0.12 counts gRPC requests in ``ts_inference_requests_total`` but adds nothing to
    the latency counters for them, so gRPC levels report None rather than a false zero; the
    handler's own figures hold for both protocols (None for a handler without them, the stock
    one). The frontend reads the worker's metrics a little late, so a level's handler figures
    are ratios of sums over the batches reported during it, each ratio over the same batches.
    """
    def delta(name: str) -> float:
        return after.get((name, model), 0.0) - before.get((name, model), 0.0)

    n = delta("ts_inference_requests_total")
    timed = protocol == "http" and n > 0
    images, batches = delta("FlannelBatchSize_sum"), delta("FlannelBatchSize_count")

    def per_image(name: str) -> float | None:
        return delta(name) / images if images > 0 else None
    return {"queue_ms_per_request": delta("ts_queue_latency_microseconds") / n / 1000
            if timed else None,
            "inference_ms_per_request": delta("ts_inference_latency_microseconds") / n / 1000
            if timed else None,
            "handler_ms_last_batch": after.get(("PredictionTime", model)),
            "mean_batch": images / batches if batches > 0 else None,
            "decode_ms_per_image": per_image("FlannelDecodeMs_sum"),
            "preprocess_ms_per_image": per_image("FlannelPreprocessMs_sum"),
            "model_ms_per_image": per_image("FlannelInferenceMs_sum")}


def summarize(load: dict) -> dict:
    lat = np.array(load["latencies"]) * 1000
    statuses = np.array(load["statuses"])
    ok = int((statuses == 200).sum())
    p = np.percentile(lat, [50, 90, 95, 99]) if lat.size else [float("nan")] * 4
    return {"requests": int(lat.size), "ok": ok, "error_rate": 1 - ok / max(1, lat.size),
            "p50_ms": float(p[0]), "p90_ms": float(p[1]), "p95_ms": float(p[2]),
            "p99_ms": float(p[3]), "throughput": ok / load["seconds"],
            "statuses": {str(s): int((statuses == s).sum()) for s in np.unique(statuses)}}


def model_reference(run_dir: Path, backend: str, batch_size: int, repeats: int = 10) -> dict:
    """The backend's own images/s at ``batch_size`` and its batch-1 latency, in this process."""
    from flannel.artifacts import export_dir_of, graph_spec, read_manifest
    from flannel.benchmarks.model import call_times
    from flannel.backends import backend_spec, load_backend

    export = export_dir_of(run_dir)
    manifest = read_manifest(export)
    side = manifest["input"]["spec"]["resize"]
    engine = load_backend(backend_spec(backend), export, manifest, graph_spec(manifest),
                          usable_cores())
    out = {}
    for batch in sorted({1, batch_size}):
        x = np.random.default_rng(0).random((batch, 1, side, side), dtype=np.float32)
        t = float(np.median(call_times(lambda: engine.run(x), 2, repeats)))
        out[batch] = {"p50_ms": 1000 * t, "images_per_s": batch / t}
    return {"backend": backend, "batch_size": batch_size, "batch1_p50_ms": out[1]["p50_ms"],
            "images_per_s": out[batch_size]["images_per_s"]}


def bench_serve(run_dir: str | Path, *, template: str | Path = "config.properties",
                backend: str = "auto", levels=LEVELS, requests_per_level: int = 64,
                warmup: int = 4, time_limit: float = 60.0, protocols=("http", "grpc"),
                variants: list[Variant] | None = None, stock: bool = True,
                payload_side: int = PAYLOAD_SIDE, start_timeout: float = 300) -> dict:
    """Serve every variant (and the stock baseline) from one private TorchServe and load each.

    Returns:
        ``{"machine", "settings", "reference", "rows": [one per model x protocol x level]}``.
    """
    from flannel.artifacts import export_dir_of
    from flannel.handlers.archive import (ArchiveSettings, build_archive, check_export,
                                          fastest_passing_backend)
    from flannel.handlers.keys import read_tokens
    from flannel.handlers.ts_config import loopback_config
    from flannel.handlers.ts_process import start_server, stop_server

    run_dir = Path(run_dir)
    variants = variants if variants is not None else default_variants()
    export = export_dir_of(run_dir)
    manifest = check_export(export)
    if backend == "auto":
        backend = fastest_passing_backend(export, manifest, max(v.batch_size for v in variants))
    batch_size = max(v.batch_size for v in variants)
    reference = model_reference(run_dir, backend, batch_size)
    log.info("model-level %s: %.1f images/s at batch %d, batch-1 p50 %.1f ms", backend,
             reference["images_per_s"], batch_size, reference["batch1_p50_ms"])
    rows = []
    with tempfile.TemporaryDirectory(prefix="flannel-bench-serve-") as tmp:
        tmp = Path(tmp)
        store = tmp / "model_store"
        store.mkdir()
        payload = radiograph_png(tmp / "cxr.png", payload_side).read_bytes()
        models = {}
        for v in variants:
            name = f"{manifest['model_name']}-{v.name}"
            build_archive(run_dir, store, model_name=name, settings=ArchiveSettings(
                batch_size=v.batch_size, max_batch_delay_ms=v.max_batch_delay_ms,
                workers=v.workers, backend=backend))
            models[name] = asdict(v)
        if stock:
            build_stock_archive(run_dir, store)
            models[STOCK] = {"name": STOCK, "batch_size": 1, "max_batch_delay_ms": 0,
                             "workers": 1}
        config = loopback_config(tmp / "config.properties", store, template,
                                 job_queue_size=str(max(64, 2 * max(levels))))
        info = start_server(config, timeout=start_timeout)
        try:
            token = read_tokens(info.key_file)["inference"]
            for model, variant in models.items():
                rows += load_levels(info, token, model, payload, protocols, levels,
                                    requests_per_level, warmup, time_limit, variant=variant,
                                    backend=STOCK if model == STOCK else backend)
        finally:
            stop_server(config)
    return _result(rows, reference, levels, requests_per_level, warmup, time_limit,
                   payload_side, len(payload), protocols)


def _result(rows, reference, levels, requests_per_level, warmup, time_limit, payload_side,
            payload_bytes, protocols, server: str = "private") -> dict:
    return {"machine": {"cpu": hardware.cpu_model(), "cores": usable_cores()},
            "settings": {"levels": list(levels), "requests_per_level": requests_per_level,
                         "warmup": warmup, "time_limit_s": time_limit,
                         "payload": f"{payload_side} px 8-bit PNG, {payload_bytes:,} bytes",
                         "protocols": list(protocols), "server": server},
            "reference": reference, "rows": rows}


def load_levels(info, token: str, model: str, payload: bytes, protocols, levels,
                requests_per_level: int, warmup: int, time_limit: float, *,
                variant: dict | None = None, backend: str | None = None) -> list[dict]:
    """One served model under closed-loop load at each protocol and concurrency level: a
    warm-up, then ``requests_per_level`` timed requests, with TorchServe's own counters read
    before and after. ``info``: the server's addresses (``ts_config.ServerInfo``)."""
    variant = variant or {}
    rows = []
    for protocol in protocols:
        send = (http_sender(info.inference_url, model, token, payload) if protocol == "http"
                else grpc_sender(info.grpc_inference, model, token, payload))
        for level in levels:
            closed_loop(send, level, max(warmup, level), time_limit)
            before = scrape(info.metrics_url)
            load = closed_loop(send, level, requests_per_level, time_limit)
            row = {"model": model, "variant": variant.get("name", model), "backend": backend,
                   "batch_size": variant.get("batch_size"), "workers": variant.get("workers"),
                   "protocol": protocol, "concurrency": level, **summarize(load),
                   **server_side(before, scrape(info.metrics_url), model, protocol)}
            log.info("%s %s c=%d: %.1f req/s, p50 %.0f ms, p99 %.0f ms, errors %.1f%%", model,
                     protocol, level, row["throughput"], row["p50_ms"], row["p99_ms"],
                     100 * row["error_rate"])
            rows.append(row)
    return rows


def served_settings(info, management_token: str, model: str) -> dict:
    """Batch size, max batch delay and worker count of a served model, from the management API."""
    from flannel.handlers.management import describe_model

    desc = describe_model(info, management_token, model)[0]
    return {"name": model, "batch_size": int(desc.get("batchSize", 1)),
            "max_batch_delay_ms": int(desc.get("maxBatchDelay", 0)),
            "workers": len(desc.get("workers", []))}


def bench_attached(config: str | Path, model: str, *, run_dir: str | Path | None = None,
                   backend: str | None = None, levels=LEVELS, requests_per_level: int = 64,
                   warmup: int = 4, time_limit: float = 60.0, protocols=("http", "grpc"),
                   payload_side: int = PAYLOAD_SIDE) -> dict:
    """Load ``model`` on the TorchServe already running from ``config`` (its addresses and token
    file); nothing is started or stopped. With ``run_dir`` and ``backend`` the model-level
    reference is measured first, in this process, so served figures read as fractions of it
    (the server shares the machine: run it on an otherwise idle host)."""
    from flannel.handlers.keys import read_tokens
    from flannel.handlers.ts_config import ServeError
    from flannel.handlers.ts_process import server_status

    info = server_status(config)
    if info is None:
        raise ServeError(f"no TorchServe is running from {config}: start one with "
                         f"`flannel serve start --config {config}` or leave out --attach")
    if model not in info.models:
        raise ServeError(f"{model!r} is not served by the TorchServe of {config}; it serves "
                         f"{sorted(info.models) or 'nothing'}")
    tokens = read_tokens(info.key_file)
    variant = served_settings(info, tokens["management"], model)
    reference = (model_reference(Path(run_dir), backend, variant["batch_size"])
                 if run_dir is not None and backend is not None else None)
    with tempfile.TemporaryDirectory(prefix="flannel-bench-serve-") as tmp:
        payload = radiograph_png(Path(tmp) / "cxr.png", payload_side).read_bytes()
    rows = load_levels(info, tokens["inference"], model, payload, protocols, levels,
                       requests_per_level, warmup, time_limit, variant=variant, backend=backend)
    return _result(rows, reference, levels, requests_per_level, warmup, time_limit,
                   payload_side, len(payload), protocols, server=f"attached ({config})")


def format_summary(result: dict) -> str:
    m, ref, st = result["machine"], result["reference"], result["settings"]
    reference = ("no model-level reference (attached without RUN_DIR and --backend)."
                 if ref is None else
                 f"Model-level {ref['backend']} in the same run: {ref['images_per_s']:.1f} "
                 f"images/s at batch {ref['batch_size']}, batch-1 p50 "
                 f"{ref['batch1_p50_ms']:.1f} ms.")
    lines = [f"# Served under load on {m['cpu']} ({m['cores']} cores)", "",
             f"Server: {st.get('server', 'private')}. Payload {st['payload']}; "
             f"{st['requests_per_level']} requests per level after a warm-up; closed loop. "
             f"{reference}", "",
             "Queue and inference ms per request are TorchServe's; the handler's mean batch and "
             "its decode, preprocessing (intensity, resize) and model ms per image are the "
             "product handler's metrics (decode and preprocessing are summed over the threads "
             "that prepare a batch's images concurrently).", "",
             "| model | protocol | conc. | req/s | vs model | p50 ms | p90 ms | p95 ms | p99 ms | "
             "errors | queue ms | inference ms | handler ms/batch | mean batch | decode ms/img | "
             "preprocess ms/img | model ms/img |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
             "| --- | --- | --- |"]

    def num(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['protocol']} | {r['concurrency']} | "
                     f"{r['throughput']:.1f} | "
                     f"{'-' if ref is None else format(r['throughput'] / ref['images_per_s'], '.0%')} | "
                     f"{r['p50_ms']:.0f} | {r['p90_ms']:.0f} | {r['p95_ms']:.0f} | "
                     f"{r['p99_ms']:.0f} | {100 * r['error_rate']:.1f}% | "
                     f"{num(r['queue_ms_per_request'])} | {num(r['inference_ms_per_request'])} | "
                     f"{num(r['handler_ms_last_batch'])} | {num(r.get('mean_batch'))} | "
                     f"{num(r.get('decode_ms_per_image'))} | "
                     f"{num(r.get('preprocess_ms_per_image'))} | "
                     f"{num(r.get('model_ms_per_image'))} |")
    return "\n".join(lines)


def plot_latency(result: dict, out: Path) -> Path:
    """p50 and p99 latency against concurrency, one line per model and protocol."""
    from flannel.benchmarks.output import pyplot, save_figure

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    keys = list(dict.fromkeys((r["model"], r["protocol"]) for r in result["rows"]))
    for model, protocol in keys:
        rows = [r for r in result["rows"] if (r["model"], r["protocol"]) == (model, protocol)]
        c = [r["concurrency"] for r in rows]
        (line,) = axes[0].plot(c, [r["p50_ms"] for r in rows], marker="o")
        axes[0].plot(c, [r["p99_ms"] for r in rows], ls="--", alpha=0.6, color=line.get_color())
        axes[1].plot(c, [r["throughput"] for r in rows], marker="o", label=f"{model} {protocol}",
                     color=line.get_color())
    for ax, label in ((axes[0], "latency ms (solid p50, dashed p99)"), (axes[1], "requests/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
    axes[1].legend(fontsize=6)
    return save_figure(fig, out, "serve_latency.png",
                       f"TorchServe under load, {result['machine']['cpu']}")
