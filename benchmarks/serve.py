"""`flannel bench serve`: a live server under load, over each protocol, against the stock path.

    flannel bench serve runs/real/ensemble_lite --out runs/bench/serve
    flannel bench serve runs/real/ensemble_lite --runtime torchserve,triton --protocols v2,v2-grpc

Builds, from one exported run, an archive per serving variant (dynamic batching on and off, 1 and
2 workers; batch size and delay as ``flannel archive`` writes them) and the stock baseline (the
same model as a TorchScript trace behind a stock-style handler: per-request PIL/torchvision
preprocessing, batch size 1; ``benchmarks/stock_handler.py``). Then, for each runtime in turn
(TorchServe, and Triton serving the same archives; one at a time, never both, since they would
share the cores), it starts a private server on free loopback ports, and for each variant,
protocol and concurrency level (1, 2, 4, 8, 16, 32) sends a warm-up, then a fixed number of
requests of one radiograph-sized PNG within a time bound. It stops the server afterwards. The
stock baseline is TorchServe's alone; Triton answers only the v2 protocols (``RUNTIME_PROTOCOLS``).

The load generator is closed-loop: ``concurrency`` client threads each send their next request when
the previous answer arrives, using the same HTTP (requests) and gRPC (stubs generated from
TorchServe's protos) paths as ``flannel predict``. Threads suffice because clients wait on sockets
(the GIL is released), the request count per level is exact, and no load-testing dependency is
added; latency is measured around each call.

Per level: latency p50/p90/p95/p99, throughput, error rate; the frontend's share of the CPU time
the server's processes used during the timed load (TorchServe's JVM against its Python workers,
Triton's server process against its Python-backend stubs: what the frontend costs beside the
model); and from the runtime's metrics endpoint the mean queue time and inference time per request
(TorchServe's frontend counters, which 0.12 keeps for REST requests only, so gRPC levels leave
them empty; Triton's ``nv_inference_*`` counters, every protocol), TorchServe's handler time per
batch (the worker's last PredictionTime), and from the product handler's own metrics (every
protocol, both runtimes) its mean batch and its decode, preprocessing and model ms per image. The
same backend's model-level throughput at the archive's batch size and its batch-1 latency are
measured in the same run before any server starts, so served figures read as fractions of them.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from flannel import hardware
from flannel.cpus import usable_cores
from flannel.handlers.triton_model import METRIC_BATCH, METRIC_TIMES

log = logging.getLogger(__name__)
LEVELS = (1, 2, 4, 8, 16, 32)
STOCK = "stock"
PAYLOAD_SIDE = 2048
RUNTIMES = ("torchserve", "triton")
RUNTIME_NAMES = {"torchserve": "TorchServe", "triton": "Triton"}
# What each runtime answers: TorchServe its own APIs and the v2 (Open Inference) protocol over
# REST and gRPC; Triton the v2 protocol alone (flannel.handlers.client.Client.predict).
RUNTIME_PROTOCOLS = {"torchserve": ("http", "grpc", "v2", "v2-grpc"),
                     "triton": ("v2", "v2-grpc")}


@dataclass(frozen=True)
class ServerCounters:
    """One runtime's metrics that say where a level's time went: its requests and their summed
    queue and inference time (microseconds), and the product handler's batch histogram and
    summed decode, preprocessing and model times (ms over images)."""

    requests: str
    queue_us: str
    inference_us: str
    timed_protocols: tuple[str, ...]  # protocols whose requests the two latency sums include
    batch_sum: str
    batch_count: str
    decode_ms: str
    preprocess_ms: str
    model_ms: str
    handler_ms_last_batch: str | None = None  # a gauge: the last handler call's ms


COUNTERS = {
    # TorchServe 0.12 adds REST requests (predictions and v2 alike) to its latency counters,
    # gRPC ones to the request count only. The Flannel* names: handlers/image_classifier.py.
    "torchserve": ServerCounters(
        "ts_inference_requests_total", "ts_queue_latency_microseconds",
        "ts_inference_latency_microseconds", ("http", "v2"), "FlannelBatchSize_sum",
        "FlannelBatchSize_count", "FlannelDecodeMs_sum", "FlannelPreprocessMs_sum",
        "FlannelInferenceMs_sum", handler_ms_last_batch="PredictionTime"),
    # Triton's per-model counters hold for REST and gRPC alike.
    "triton": ServerCounters(
        "nv_inference_request_success", "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us", RUNTIME_PROTOCOLS["triton"],
        f"{METRIC_BATCH}_sum", f"{METRIC_BATCH}_count", METRIC_TIMES["decode_ms"],
        METRIC_TIMES["preprocess_ms"], METRIC_TIMES["inference_ms"]),
}
METRIC_NAMES = tuple(dict.fromkeys(
    name for c in COUNTERS.values() for name in (
        c.requests, c.queue_us, c.inference_us, c.batch_sum, c.batch_count, c.decode_ms,
        c.preprocess_ms, c.model_ms, c.handler_ms_last_batch) if name))


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


def v2_sender(url: str, model: str, token: str, payload: bytes) -> Callable[[], int]:
    """Open Inference Protocol (v2) REST: ``POST {url}/v2/models/{model}/infer`` with the file as
    a base64 BYTES tensor [1, 1], the body encoded once. The status is read as ``flannel predict``
    reads it: Triton answers a refused request 400, 500 or 503 with the handler's status first
    in its message, TorchServe with the handler's status."""
    import requests

    from flannel.handlers.client import _parse, refusal_status, v2_request

    local = threading.local()
    endpoint = f"{url.rstrip('/')}/v2/models/{model}/infer"
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    body = json.dumps(v2_request(payload, "bench")).encode("utf-8")

    def send() -> int:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        r = local.session.post(endpoint, data=body, headers=headers, timeout=120)
        if r.status_code == 200:
            return 200
        error = (_parse(r.text) or {}).get("error")
        return refusal_status(r.status_code, error)[0] if isinstance(error, str) else r.status_code
    return send


def v2_grpc_sender(target: str, model: str, token: str, payload: bytes,
                   runtime: str = "torchserve") -> Callable[[], int]:
    """v2 gRPC ``ModelInfer`` on one shared channel, to ``runtime``'s service
    (``client.V2_GRPC_SERVICES``), with its key header. The status is read as ``flannel predict``
    reads it: TorchServe answers OK with ``code`` and ``error`` outputs for a refused item,
    Triton with a gRPC error whose message starts with the handler's status."""
    import grpc

    from flannel.handlers.client import (TRITON_GRPC_KEY_PREFIX, V2_GRPC_SERVICES,
                                         _grpc_failure, _v2_tensor_data)
    from flannel.handlers.grpc_stubs import load_stubs

    pb = load_stubs()["open_inference_grpc_pb2"]
    channel = grpc.insecure_channel(target, options=[
        ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)])
    model_infer = channel.unary_unary(
        f"/{V2_GRPC_SERVICES[runtime]}/ModelInfer",
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelInferResponse.FromString)
    header = "authorization" if runtime == "torchserve" else \
        f"{TRITON_GRPC_KEY_PREFIX}authorization"
    metadata = [(header, f"Bearer {token}")]
    request = pb.ModelInferRequest(model_name=model, id="bench", inputs=[
        pb.ModelInferRequest.InferInputTensor(
            name="image", datatype="BYTES", shape=[1, 1],
            contents=pb.InferTensorContents(bytes_contents=[payload]))])

    def send() -> int:
        try:
            reply = model_infer(request, metadata=metadata, timeout=120)
        except grpc.RpcError as exc:
            return _grpc_failure("", exc).status
        code = [o for o in reply.outputs if o.name == "code"]
        return int(_v2_tensor_data(code[0])[0]) if code else 200
    return send


def sender(protocol: str, info, model: str, token: str, payload: bytes) -> Callable[[], int]:
    """The sender of ``protocol`` (one of ``RUNTIME_PROTOCOLS``) for the server ``info``
    (``ts_config.ServerInfo``: its addresses and runtime)."""
    runtime = getattr(info, "runtime", "torchserve")
    if protocol not in RUNTIME_PROTOCOLS[runtime]:
        raise ValueError(f"{runtime} does not answer {protocol!r}; it answers "
                         f"{', '.join(RUNTIME_PROTOCOLS[runtime])}")
    if protocol == "http":
        return http_sender(info.inference_url, model, token, payload)
    if protocol == "grpc":
        return grpc_sender(info.grpc_inference, model, token, payload)
    if protocol == "v2":
        return v2_sender(info.inference_url, model, token, payload)
    return v2_grpc_sender(info.grpc_inference, model, token, payload, runtime)


def protocols_for(runtime: str, protocols) -> tuple[str, ...]:
    """The protocols among ``protocols`` that ``runtime`` answers, in their order; each other
    one is skipped with a log line (Triton has no TorchServe ``http``/``grpc`` API).

    Raises:
        ValueError: an unknown runtime or protocol.
    """
    if runtime not in RUNTIME_PROTOCOLS:
        raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    known = RUNTIME_PROTOCOLS["torchserve"]
    unknown = [p for p in protocols if p not in known]
    if unknown:
        raise ValueError(f"unknown protocols {unknown}; choose from {', '.join(known)}")
    kept = tuple(p for p in protocols if p in RUNTIME_PROTOCOLS[runtime])
    for p in protocols:
        if p not in kept:
            log.info("%s: skipping %s (it answers %s)", runtime, p,
                     ", ".join(RUNTIME_PROTOCOLS[runtime]))
    return kept


_LINE = re.compile(r'^(\w+)\{([^}]*)\}\s+([-+0-9.eE]+|NaN)$')


def scrape(metrics_url: str) -> dict[tuple[str, str], float]:
    """(metric, model) -> value for ``METRIC_NAMES`` from the server's Prometheus endpoint."""
    import requests

    return parse_metrics(requests.get(f"{metrics_url.rstrip('/')}/metrics", timeout=10).text)


def parse_metrics(text: str) -> dict[tuple[str, str], float]:
    """(metric, model) -> value of ``METRIC_NAMES`` in Prometheus text (TorchServe's labels
    ``model_name``/``ModelName``, Triton's ``model``), summed over other labels (model
    versions, hosts, statuses)."""
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if not m or m.group(1) not in METRIC_NAMES:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        model = labels.get("model_name") or labels.get("ModelName") or labels.get("model") or ""
        out[(m.group(1), model)] = out.get((m.group(1), model), 0.0) + float(m.group(3))
    return out


def server_side(before: dict, after: dict, model: str, protocol: str = "http",
                runtime: str = "torchserve") -> dict:
    """Where a level's time went, from the metrics endpoint (``COUNTERS[runtime]``): mean queue
    and inference ms per request (TorchServe's frontend counters; Triton's queue and compute
    counters), TorchServe's last PredictionTime (ms for one handler call, i.e. one batch; None
    on Triton), and from the product's handler its mean batch size (requests per handler call,
    or per dynamic batch on Triton) and its decode, preprocessing and model ms per image.

    TorchServe 0.12 counts gRPC requests in ``ts_inference_requests_total`` but adds nothing to
    the latency counters for them, so its gRPC levels report None rather than a false zero; the
    handler's own figures hold for every protocol (None for a handler without them, the stock
    one). TorchServe's frontend reads the worker's metrics a little late, so a level's handler
    figures are ratios of sums over the batches reported during it, each over the same batches.
    """
    names = COUNTERS[runtime]

    def delta(name: str) -> float:
        return after.get((name, model), 0.0) - before.get((name, model), 0.0)

    n = delta(names.requests)
    timed = protocol in names.timed_protocols and n > 0
    images, batches = delta(names.batch_sum), delta(names.batch_count)

    def per_image(name: str) -> float | None:
        return delta(name) / images if images > 0 else None
    return {"queue_ms_per_request": delta(names.queue_us) / n / 1000 if timed else None,
            "inference_ms_per_request": delta(names.inference_us) / n / 1000 if timed else None,
            "handler_ms_last_batch": after.get((names.handler_ms_last_batch, model))
            if names.handler_ms_last_batch else None,
            "mean_batch": images / batches if batches > 0 else None,
            "decode_ms_per_image": per_image(names.decode_ms),
            "preprocess_ms_per_image": per_image(names.preprocess_ms),
            "model_ms_per_image": per_image(names.model_ms)}


def server_cpu_seconds(pid: int | None, also: tuple[int, ...] = ()) -> dict[int, float]:
    """User plus system CPU seconds so far of the server process ``pid`` (TorchServe's JVM,
    ``tritonserver``) and of each of its descendants (TorchServe's Python workers, Triton's
    Python-backend stubs), and of each process of ``also`` and its descendants (Triton's guard),
    by pid; empty when ``pid`` is None or has exited. A process's own time only: what its exited
    children used is not added to it."""
    import psutil

    if pid is None:
        return {}
    procs = []
    for root_pid in (pid, *also):
        try:
            root = psutil.Process(root_pid)
            procs += [root, *root.children(recursive=True)]
        except psutil.Error:
            if root_pid == pid:
                return {}
    out = {}
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.Error:  # exited between the listing and the reading
            continue
        out[proc.pid] = times.user + times.system
    return out


def frontend_processes(info) -> tuple[int, ...]:
    """The processes in front of the model: TorchServe's JVM; Triton's ``tritonserver`` and the
    nginx guard in front of its REST port (master and worker)."""
    import psutil

    pids = [info.pid] if info.pid else []
    if getattr(info, "runtime", "torchserve") == "triton":
        from flannel.handlers.triton_process import read_state

        state = read_state(info.workdir)
        if state is not None and state.guard_pid:
            try:
                guard = psutil.Process(state.guard_pid)
                pids += [guard.pid, *(c.pid for c in guard.children(recursive=True))]
            except psutil.Error:
                pass
    return tuple(pids)


def cpu_used(before: dict[int, float], after: dict[int, float]) -> dict[int, float]:
    """CPU seconds each process of ``after`` used since ``before`` (``server_cpu_seconds``
    samples); a process absent from ``before`` started meanwhile and counts from zero."""
    return {pid: max(0.0, seconds - before.get(pid, 0.0)) for pid, seconds in after.items()}


def frontend_cpu_share(before: dict[int, float], after: dict[int, float],
                       frontend_pid: int | tuple[int, ...] | None) -> float | None:
    """The frontend's part of the CPU time the server's processes used between two
    ``server_cpu_seconds`` samples: its seconds over all of theirs, in [0, 1]. A process that
    started between the samples counts from zero; one that exited is missing from ``after`` and
    its last seconds are lost. None when nothing was used or the frontend was not sampled.

    The kernel counts these times in clock ticks (10 ms on Linux, charged to whichever thread
    runs at the tick), so a level of a few light requests can read 0% for a frontend that used
    less than a tick; levels that keep the server busy for seconds read true."""
    used = cpu_used(before, after)
    total = sum(used.values())
    front = (frontend_pid,) if isinstance(frontend_pid, int) else tuple(frontend_pid or ())
    if not any(p in used for p in front) or total <= 0:
        return None
    return sum(used.get(p, 0.0) for p in front) / total


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


def runtime_protocols(runtimes, protocols) -> dict[str, tuple[str, ...]]:
    """Runtime -> the protocols it is loaded over (``protocols_for``), checked before anything
    is built or started.

    Raises:
        ValueError: an unknown runtime or protocol, or a runtime that answers none of
            ``protocols``.
    """
    chosen = {runtime: protocols_for(runtime, protocols) for runtime in runtimes}
    for runtime, kept in chosen.items():
        if not kept:
            raise ValueError(f"{runtime} answers none of the protocols {', '.join(protocols)}: "
                             f"add {' or '.join(RUNTIME_PROTOCOLS[runtime])}")
    return chosen


def served_store(store: Path, names, dest: Path) -> Path:
    """A model store at ``dest`` holding copies of the archives ``names`` of ``store``, each
    listed on the trust list as ``flannel archive`` lists what it writes: the product's archives
    without the stock baseline (a TorchServe-only handler), for Triton."""
    import shutil

    from flannel.handlers.trust import trust_archive

    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        trust_archive(shutil.copy2(store / f"{name}.mar", dest / f"{name}.mar"))
    return dest


@contextlib.contextmanager
def running_server(runtime: str, config: Path, timeout: float) -> Iterator:
    """A private server of ``runtime`` started from ``config`` for the block (its
    ``ts_config.ServerInfo``), stopped after it whatever happens."""
    if runtime == "triton":
        from flannel.handlers.triton_process import start_triton as start
        from flannel.handlers.triton_process import stop_triton as stop
    else:
        from flannel.handlers.ts_process import start_server as start
        from flannel.handlers.ts_process import stop_server as stop
    info = start(config, timeout=timeout)
    try:
        yield info
    finally:
        stop(config)


def check_installed(runtimes) -> None:
    """Raises ``ServeError`` when Triton is among ``runtimes`` and is not installed, before
    minutes of archives and TorchServe levels are spent."""
    if "triton" in runtimes:
        from flannel.handlers.triton_process import bundled_triton, stub_site

        bundled_triton()
        stub_site()


def bench_serve(run_dir: str | Path, *, template: str | Path = "config.properties",
                backend: str = "auto", levels=LEVELS, requests_per_level: int = 64,
                warmup: int = 4, time_limit: float = 60.0, protocols=("http", "grpc"),
                variants: list[Variant] | None = None, stock: bool = True,
                payload_side: int = PAYLOAD_SIDE, start_timeout: float = 300,
                runtimes=("torchserve",)) -> dict:
    """Serve every variant (and on TorchServe the stock baseline) from a private server of each
    runtime in turn, one at a time, and load each.

    Args:
        runtimes: among ``RUNTIMES``, served in this order from the same archives.
        protocols: each runtime is loaded over those it answers (``protocols_for``).

    Returns:
        ``{"machine", "settings", "reference", "rows": [one per runtime x model x protocol x
        level]}``.

    Raises:
        ValueError: an unknown runtime or protocol, or a runtime answering none of ``protocols``.
        ServeError: Triton asked for but not installed (before anything is built), or a server
            that does not start.
    """
    from flannel.artifacts import export_dir_of
    from flannel.handlers.archive import (ArchiveSettings, build_archive, check_export,
                                          fastest_passing_backend)
    from flannel.handlers.keys import read_key_file
    from flannel.handlers.ts_config import loopback_config

    runtimes = tuple(dict.fromkeys(runtimes))
    chosen = runtime_protocols(runtimes, protocols)
    check_installed(runtimes)
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
            # Private archives whose speed is measured, never served to anyone: a subject
            # with random weights has no external evaluation to show.
            build_archive(run_dir, store, model_name=name, settings=ArchiveSettings(
                batch_size=v.batch_size, max_batch_delay_ms=v.max_batch_delay_ms,
                workers=v.workers, backend=backend), allow_unvalidated=True)
            models[name] = asdict(v)
        product = list(models)
        stores = {runtime: store for runtime in runtimes}
        if stock and "torchserve" in runtimes:
            build_stock_archive(run_dir, store)
            models[STOCK] = {"name": STOCK, "batch_size": 1, "max_batch_delay_ms": 0,
                             "workers": 1}
            if "triton" in runtimes:
                stores["triton"] = served_store(store, product, tmp / "triton_store")
        for runtime in runtimes:
            folder = tmp / runtime  # each runtime's own config, ports, keys and logs
            folder.mkdir()
            config = loopback_config(folder / "config.properties", stores[runtime], template,
                                     job_queue_size=str(max(64, 2 * max(levels))))
            with running_server(runtime, config, start_timeout) as info:
                token = read_key_file(info.key_file)
                for model, variant in models.items():
                    if model == STOCK and runtime != "torchserve":
                        continue
                    rows += load_levels(info, token, model, payload, chosen[runtime], levels,
                                        requests_per_level, warmup, time_limit, variant=variant,
                                        backend=STOCK if model == STOCK else backend)
    return _result(rows, reference, levels, requests_per_level, warmup, time_limit,
                   payload_side, len(payload), protocols, runtimes=chosen)


def _result(rows, reference, levels, requests_per_level, warmup, time_limit, payload_side,
            payload_bytes, protocols, server: str = "private",
            runtimes: dict[str, tuple[str, ...]] | None = None) -> dict:
    runtimes = runtimes or {"torchserve": tuple(protocols)}
    return {"machine": {"cpu": hardware.cpu_model(), "cores": usable_cores()},
            "settings": {"levels": list(levels), "requests_per_level": requests_per_level,
                         "warmup": warmup, "time_limit_s": time_limit,
                         "payload": f"{payload_side} px 8-bit PNG, {payload_bytes:,} bytes",
                         "protocols": list(protocols), "server": server,
                         "runtimes": {r: list(p) for r, p in runtimes.items()}},
            "reference": reference, "rows": rows}


def load_levels(info, token: str, model: str, payload: bytes, protocols, levels,
                requests_per_level: int, warmup: int, time_limit: float, *,
                variant: dict | None = None, backend: str | None = None) -> list[dict]:
    """One served model under closed-loop load at each protocol and concurrency level: a
    warm-up, then ``requests_per_level`` timed requests, with the server's own counters and its
    processes' CPU times read before and after. ``info``: the server's addresses, runtime and
    pid (``ts_config.ServerInfo``)."""
    runtime = getattr(info, "runtime", "torchserve")
    variant = variant or {}
    rows = []
    for protocol in protocols:
        send = sender(protocol, info, model, token, payload)
        for level in levels:
            closed_loop(send, level, max(warmup, level), time_limit)
            before = scrape(info.metrics_url)
            front = frontend_processes(info)
            cpu_before = server_cpu_seconds(info.pid, front[1:])
            load = closed_loop(send, level, requests_per_level, time_limit)
            cpu_after = server_cpu_seconds(info.pid, front[1:])  # before a scrape adds to them
            after = scrape(info.metrics_url)
            used = cpu_used(cpu_before, cpu_after)
            row = {"runtime": runtime, "model": model, "variant": variant.get("name", model),
                   "backend": backend, "batch_size": variant.get("batch_size"),
                   "workers": variant.get("workers"), "protocol": protocol,
                   "concurrency": level, **summarize(load),
                   "frontend_cpu_share": frontend_cpu_share(cpu_before, cpu_after, front),
                   "frontend_cpu_s": sum(used.get(p, 0.0) for p in front),
                   "server_cpu_s": sum(used.values()),
                   **server_side(before, after, model, protocol, runtime)}
            log.info("%s %s %s c=%d: %.1f req/s, p50 %.0f ms, p99 %.0f ms, errors %.1f%%",
                     runtime, model, protocol, level, row["throughput"], row["p50_ms"],
                     row["p99_ms"], 100 * row["error_rate"])
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
    """One Markdown table of every runtime's rows, with the machine, payload and reference."""
    m, ref, st = result["machine"], result["reference"], result["settings"]
    reference = ("no model-level reference (attached without RUN_DIR and --backend)."
                 if ref is None else
                 f"Model-level {ref['backend']} in the same run: {ref['images_per_s']:.1f} "
                 f"images/s at batch {ref['batch_size']}, batch-1 p50 "
                 f"{ref['batch1_p50_ms']:.1f} ms.")
    runtimes = st.get("runtimes") or {"torchserve": st["protocols"]}
    served = "; ".join(f"{r} over {', '.join(p)}" for r, p in runtimes.items())
    lines = [f"# Served under load on {m['cpu']} ({m['cores']} cores)", "",
             f"Server: {st.get('server', 'private')} ({served}), one runtime at a time. Payload "
             f"{st['payload']}; {st['requests_per_level']} requests per level after a warm-up; "
             f"closed loop. {reference}", "",
             "Frontend CPU is the frontend process's share of the CPU time the server's "
             "processes used during a level (TorchServe's JVM against its Python workers, "
             "Triton's server process against its Python-backend stubs). Queue and inference ms "
             "per request are the runtime's own counters (TorchServe's for REST only); the "
             "handler's mean batch and its decode, preprocessing (intensity, resize) and model "
             "ms per image are the product handler's metrics (decode and preprocessing are "
             "summed over the threads that prepare a batch's images concurrently).", "",
             "| runtime | model | protocol | conc. | req/s | vs model | p50 ms | p90 ms | p95 ms "
             "| p99 ms | errors | frontend CPU | queue ms | inference ms | handler ms/batch "
             "| mean batch | decode ms/img | preprocess ms/img | model ms/img |",
             "|" + " --- |" * 19]

    def num(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)
    for r in result["rows"]:
        vs_model = None if ref is None else r["throughput"] / ref["images_per_s"]
        lines.append(f"| {r.get('runtime', 'torchserve')} | {r['model']} | {r['protocol']} | "
                     f"{r['concurrency']} | {r['throughput']:.1f} | {num(vs_model, '{:.0%}')} | "
                     f"{r['p50_ms']:.0f} | {r['p90_ms']:.0f} | {r['p95_ms']:.0f} | "
                     f"{r['p99_ms']:.0f} | {100 * r['error_rate']:.1f}% | "
                     f"{num(r.get('frontend_cpu_share'), '{:.0%}')} | "
                     f"{num(r['queue_ms_per_request'])} | {num(r['inference_ms_per_request'])} | "
                     f"{num(r['handler_ms_last_batch'])} | {num(r.get('mean_batch'))} | "
                     f"{num(r.get('decode_ms_per_image'))} | "
                     f"{num(r.get('preprocess_ms_per_image'))} | "
                     f"{num(r.get('model_ms_per_image'))} |")
    return "\n".join(lines)


def plot_latency(result: dict, out: Path) -> Path:
    """p50 and p99 latency against concurrency, one line per runtime, model and protocol."""
    from flannel.benchmarks.output import pyplot, save_figure

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))

    def key(r: dict) -> tuple[str, str, str]:
        return r.get("runtime", "torchserve"), r["model"], r["protocol"]
    # One colour per model and protocol, one marker and line style per runtime: the same
    # archive and protocol on each runtime read as a pair.
    pairs = list(dict.fromkeys(k[1:] for k in map(key, result["rows"])))
    colours = plt.get_cmap("tab10" if len(pairs) <= 10 else "tab20")
    runtime_style = {"torchserve": ("o", "-"), "triton": ("s", ":")}
    for k in dict.fromkeys(key(r) for r in result["rows"]):
        rows = [r for r in result["rows"] if key(r) == k]
        c = [r["concurrency"] for r in rows]
        colour = colours(pairs.index(k[1:]) % colours.N)
        marker, style = runtime_style.get(k[0], ("^", "-."))
        axes[0].plot(c, [r["p50_ms"] for r in rows], marker=marker, ls=style, color=colour)
        axes[0].plot(c, [r["p99_ms"] for r in rows], ls="--", alpha=0.4, color=colour)
        axes[1].plot(c, [r["throughput"] for r in rows], marker=marker, ls=style,
                     label=" ".join(k), color=colour)
    for ax, label in ((axes[0], "latency ms (p50 marked, p99 dashed)"), (axes[1], "requests/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
    axes[1].legend(fontsize=6)
    runtimes = " and ".join(dict.fromkeys(RUNTIME_NAMES.get(k[0], k[0])
                                          for k in map(key, result["rows"]))) or "Served"
    return save_figure(fig, out, "serve_latency.png",
                       f"{runtimes} under load, {result['machine']['cpu']}")
