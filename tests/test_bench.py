"""`flannel bench`: the benchmark code runs end to end at tiny counts and writes its reports. No
figure is asserted against a target: only that every cell is measured and consistent."""
from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest

from flannel.handlers.triton_process import triton_problem
from flannel.benchmarks.serve import closed_loop, parse_metrics, server_side, summarize

METRICS = """# HELP ts_inference_requests_total Total number of inference requests.
# TYPE ts_inference_requests_total counter
ts_inference_requests_total{model_name="ens",model_version="default",hostname="h",} 10.0
ts_inference_latency_microseconds{model_name="ens",model_version="default",hostname="h",} 2000000.0
ts_queue_latency_microseconds{model_name="ens",model_version="default",hostname="h",} 500000.0
# TYPE PredictionTime gauge
PredictionTime{ModelName="ens",Level="Model",Hostname="h",} 41.5
FlannelBatchSize_sum{ModelName="ens",Level="Model",Hostname="h",} 16.0
FlannelBatchSize_count{ModelName="ens",Level="Model",Hostname="h",} 4.0
FlannelDecodeMs_sum{ModelName="ens",Level="Model",Hostname="h",} 320.0
FlannelPreprocessMs_sum{ModelName="ens",Level="Model",Hostname="h",} 80.0
FlannelInferenceMs_sum{ModelName="ens",Level="Model",Hostname="h",} 400.0
Requests2XX{Level="Host",Hostname="h",} 10.0
"""


def test_prometheus_text_gives_queue_and_inference_time_per_request():
    before = parse_metrics(METRICS)
    assert before[("ts_inference_requests_total", "ens")] == 10.0
    assert before[("PredictionTime", "ens")] == 41.5 and ("Requests2XX", "") not in before
    after = parse_metrics(METRICS.replace(" 10.0\n", " 20.0\n", 1)
                          .replace("2000000.0", "3000000.0").replace("500000.0", "700000.0")
                          .replace("} 16.0", "} 26.0").replace("} 4.0", "} 6.0")
                          .replace("} 320.0", "} 520.0").replace("} 80.0", "} 130.0")
                          .replace("} 400.0", "} 550.0"))
    side = server_side(before, after, "ens")
    assert side == {"queue_ms_per_request": 20.0, "inference_ms_per_request": 100.0,
                    "handler_ms_last_batch": 41.5, "mean_batch": 5.0,
                    "decode_ms_per_image": 20.0, "preprocess_ms_per_image": 5.0,
                    "model_ms_per_image": 15.0}
    idle = server_side(before, before, "ens")
    assert idle["queue_ms_per_request"] is None and idle["mean_batch"] is None
    grpc = server_side(before, after, "ens", "grpc")
    assert grpc["inference_ms_per_request"] is None and grpc["decode_ms_per_image"] == 20.0


TRITON_METRICS = """# HELP nv_inference_request_success Number of successful inference requests
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="ens",version="1"} 10
nv_inference_request_success{model="other",version="1"} 99
# TYPE nv_inference_queue_duration_us counter
nv_inference_queue_duration_us{model="ens",version="1"} 500000
# TYPE nv_inference_compute_infer_duration_us counter
nv_inference_compute_infer_duration_us{model="ens",version="1"} 2000000
nv_inference_request_duration_us{model="ens",version="1"} 2600000
nv_cpu_utilization 0.5
# HELP flannel_items_total requests answered, by HTTP status
# TYPE flannel_items_total counter
flannel_items_total{model="ens",status="200"} 9
flannel_items_total{model="ens",status="422"} 1
flannel_decode_ms_total{model="ens"} 320
flannel_preprocess_ms_total{model="ens"} 80
flannel_inference_ms_total{model="ens"} 400
# TYPE flannel_batch_requests histogram
flannel_batch_requests_bucket{model="ens",le="8"} 4
flannel_batch_requests_count{model="ens"} 4
flannel_batch_requests_sum{model="ens"} 16
"""


def test_triton_metrics_give_queue_compute_and_the_handler_split_per_request():
    before = parse_metrics(TRITON_METRICS)
    assert before[("nv_inference_request_success", "ens")] == 10.0
    assert before[("nv_inference_request_success", "other")] == 99.0
    assert before[("flannel_batch_requests_sum", "ens")] == 16.0
    assert not any(name.startswith(("nv_cpu", "flannel_items", "flannel_batch_requests_bucket"))
                   for name, _ in before)
    after = parse_metrics(TRITON_METRICS.replace("} 10\n", "} 20\n", 1)
                          .replace("} 500000", "} 700000").replace("} 2000000", "} 3000000")
                          .replace("_count{model=\"ens\"} 4", "_count{model=\"ens\"} 6")
                          .replace("} 16", "} 26").replace("} 320", "} 520")
                          .replace("} 80", "} 130").replace("} 400", "} 550"))
    expected = {"queue_ms_per_request": 20.0, "inference_ms_per_request": 100.0,
                "handler_ms_last_batch": None, "mean_batch": 5.0, "decode_ms_per_image": 20.0,
                "preprocess_ms_per_image": 5.0, "model_ms_per_image": 15.0}
    # Triton's counters hold for REST and gRPC alike
    assert server_side(before, after, "ens", "v2", "triton") == expected
    assert server_side(before, after, "ens", "v2-grpc", "triton") == expected
    idle = server_side(before, before, "ens", "v2", "triton")
    assert idle["queue_ms_per_request"] is None and idle["mean_batch"] is None
    # TorchServe's names are not Triton's: nothing of one runtime is read as the other's
    assert set(server_side(before, after, "ens", "v2").values()) == {None}


def test_frontend_share_is_its_cpu_seconds_over_all_the_server_processes():
    import os
    import subprocess
    import sys

    from flannel.benchmarks.serve import cpu_used, frontend_cpu_share, server_cpu_seconds

    frontend, worker, exited, started = 100, 101, 102, 103
    before = {frontend: 10.0, worker: 5.0, exited: 7.0}
    after = {frontend: 11.0, worker: 8.0, started: 1.0}
    assert cpu_used(before, after) == {frontend: 1.0, worker: 3.0, started: 1.0}
    assert frontend_cpu_share(before, after, frontend) == 0.2
    assert frontend_cpu_share(before, {frontend: 12.0, worker: 5.0}, frontend) == 1.0
    assert frontend_cpu_share(before, before, frontend) is None  # nothing used
    assert frontend_cpu_share(before, after, None) is None
    assert frontend_cpu_share({}, {}, frontend) is None
    # real processes: this one and its child, each its own time only
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        sample = server_cpu_seconds(os.getpid())
        assert {os.getpid(), child.pid} <= set(sample) and sample[os.getpid()] > 0
    finally:
        child.kill()
        child.wait()
    assert server_cpu_seconds(None) == {}


def test_each_runtime_is_loaded_over_the_protocols_it_answers(caplog):
    from types import SimpleNamespace

    from flannel.benchmarks.serve import protocols_for, runtime_protocols, sender

    every = ("http", "grpc", "v2", "v2-grpc")
    assert protocols_for("torchserve", every) == every
    with caplog.at_level("INFO", logger="flannel.benchmarks.serve"):
        assert protocols_for("triton", every) == ("v2", "v2-grpc")
    assert "triton: skipping http" in caplog.text and "triton: skipping grpc" in caplog.text
    assert runtime_protocols(("torchserve", "triton"), ("v2-grpc", "http")) == {
        "torchserve": ("v2-grpc", "http"), "triton": ("v2-grpc",)}
    with pytest.raises(ValueError, match="triton answers none of the protocols http, grpc"):
        runtime_protocols(("torchserve", "triton"), ("http", "grpc"))
    with pytest.raises(ValueError, match="unknown protocols"):
        protocols_for("torchserve", ("http", "rest"))
    with pytest.raises(ValueError, match="unknown runtime"):
        protocols_for("kserve", ("v2",))
    triton = SimpleNamespace(runtime="triton", inference_url="http://127.0.0.1:1",
                             grpc_inference="127.0.0.1:1")
    with pytest.raises(ValueError, match="triton does not answer 'grpc'"):
        sender("grpc", triton, "m", "key", b"png")


def test_triton_gets_the_product_archives_without_the_stock_baseline(tmp_path, monkeypatch):
    import zipfile

    from flannel.benchmarks.serve import served_store
    from flannel.handlers.trust import (TRUST_LIST_ENV, check_model_store, read_trust_list,
                                        trust_archive, trust_list_path)

    monkeypatch.delenv(TRUST_LIST_ENV, raising=False)
    store = tmp_path / "model_store"
    store.mkdir()
    for name in ("m-batch8-w1", "stock"):
        with zipfile.ZipFile(store / f"{name}.mar", "w") as zf:
            zf.writestr("MAR-INF/MANIFEST.json", f'{{"model": "{name}"}}')
        trust_archive(store / f"{name}.mar")
    triton = served_store(store, ["m-batch8-w1"], tmp_path / "triton_store")
    assert sorted(p.name for p in triton.iterdir()) == ["m-batch8-w1.mar"]
    assert [a["name"] for a in check_model_store(triton)] == ["m-batch8-w1.mar"]  # admitted
    listed = read_trust_list(trust_list_path(triton))
    assert {(a["name"], a["model_store"]) for a in listed} == {
        ("m-batch8-w1.mar", str(store.resolve())), ("stock.mar", str(store.resolve())),
        ("m-batch8-w1.mar", str(triton.resolve()))}


def test_one_table_holds_both_runtimes_with_the_frontend_share():
    from flannel.benchmarks.serve import format_summary

    def row(runtime, protocol, share, queue):
        return {"runtime": runtime, "model": "m-batch8-w1", "protocol": protocol,
                "concurrency": 4, "throughput": 20.0, "p50_ms": 100.0, "p90_ms": 120.0,
                "p95_ms": 130.0, "p99_ms": 150.0, "error_rate": 0.0,
                "frontend_cpu_share": share, "queue_ms_per_request": queue,
                "inference_ms_per_request": None, "handler_ms_last_batch": None,
                "mean_batch": 3.5, "decode_ms_per_image": 2.0, "preprocess_ms_per_image": 1.0,
                "model_ms_per_image": 10.0}
    result = {"machine": {"cpu": "cpu", "cores": 2},
              "reference": {"backend": "ort-fp32", "images_per_s": 40.0, "batch_size": 8,
                            "batch1_p50_ms": 30.0},
              "settings": {"payload": "128 px", "requests_per_level": 4, "protocols": ["v2"],
                           "runtimes": {"torchserve": ["v2"], "triton": ["v2"]}},
              "rows": [row("torchserve", "v2", 0.25, 3.0), row("triton", "v2", None, 1.5)]}
    lines = format_summary(result).splitlines()
    header = next(line for line in lines if line.startswith("| runtime |"))
    table = [line for line in lines if line.startswith("| torchserve") or
             line.startswith("| triton")]
    assert "frontend CPU" in header and len(table) == 2
    assert all(line.count("|") == header.count("|") for line in table)
    assert "| 25% | 3.0 |" in table[0] and "| 50% |" in table[0]  # share, queue; vs model
    assert "| - | 1.5 |" in table[1]
    assert "torchserve over v2; triton over v2" in format_summary(result)


def test_variants_measure_each_batch_delay_side_by_side():
    from flannel.benchmarks.serve import default_variants
    from flannel.handlers.archive import DEFAULT_MAX_BATCH_DELAY_MS

    one = default_variants(8)
    assert [v.name for v in one] == ["batch8-w1", "nobatch-w1", "batch8-w2", "nobatch-w2"]
    assert {v.max_batch_delay_ms for v in one if v.batch_size == 8} == {DEFAULT_MAX_BATCH_DELAY_MS}
    two = default_variants(8, (5, 50))
    assert [(v.name, v.max_batch_delay_ms, v.workers) for v in two if v.batch_size == 8] == [
        ("batch8-d5-w1", 5, 1), ("batch8-d50-w1", 50, 1), ("batch8-d5-w2", 5, 2),
        ("batch8-d50-w2", 50, 2)]


def test_closed_loop_sends_exactly_the_requests_asked_and_counts_errors():
    calls = []
    lock = threading.Lock()

    def send():
        with lock:
            calls.append(1)
            n = len(calls)
        time.sleep(0.002)
        return 503 if n % 4 == 0 else 200

    load = closed_loop(send, concurrency=3, total=20, time_limit=30)
    assert len(calls) == 20 and len(load["latencies"]) == 20
    row = summarize(load)
    assert row["requests"] == 20 and row["ok"] == 15 and row["error_rate"] == 0.25
    assert row["statuses"] == {"200": 15, "503": 5}
    assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p95_ms"] <= row["p99_ms"]
    bounded = closed_loop(lambda: time.sleep(0.05) or 200, concurrency=1, total=1000,
                          time_limit=0.2)
    assert 1 <= len(bounded["latencies"]) < 10  # the time bound stops the level


@pytest.mark.slow
def test_bench_model_measures_every_backend_cell_and_writes_reports(exported_run_dir, tmp_path):
    from flannel.benchmarks.cli import cmd_model
    from flannel.export.parity import run_parity
    import argparse

    run_parity(exported_run_dir)
    out = tmp_path / "bench"
    assert cmd_model(argparse.Namespace(run_dirs=[str(exported_run_dir)], batches=[1, 2],
                                        warmup=1, repeats=2, threads=1, out=str(out),
                                        preset=[], preset_dir=str(tmp_path / "u"),
                                        learners=False)) == 0
    result = json.loads((out / "model.json").read_text())
    backends = {r["backend"] for r in result["rows"]}
    assert {"eager fp32", "ort-fp32"} <= backends
    assert len(result["rows"]) == 2 * len(backends)
    for r in result["rows"]:
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["images_per_s"] > 0
        assert r["gflop_per_image"] > 0 and 0 < r["peak_fraction"] and r["peak_rss_mb"] > 0
        assert np.isclose(r["gflops"], r["gflop_per_image"] * r["images_per_s"])
    assert all(r["vs_eager_fp32"] == 1.0 for r in result["rows"] if r["backend"] == "eager fp32")
    assert result["machine"]["gemm_peak_gflops"]["fp32"] > 0 and result["machine"]["cpu"]
    cells = [(p["side"], p["kind"]) for p in result["preprocess"]]
    assert cells == [(side, kind) for side in (512, 2048)
                     for kind in ("png8", "png16", "jpeg", "dcm_mono2")]
    assert all(p["ms_per_image"] > 0 and p["decode_ms"] > 0 and p["fraction_of_model"] > 0
               for p in result["preprocess"])
    for name in ("model.md", "model.csv", "model_backends.png", "model_batch_scaling.png"):
        assert (out / name).stat().st_size > 0, name
    assert result["machine"]["cpu"] in (out / "model.md").read_text()


@pytest.mark.slow
def test_bench_train_writes_its_table(tmp_path):
    from flannel.cli import main

    out = tmp_path / "train"
    assert main(["bench", "train", "--archs", "squeezenet1_1", "--size", "64", "--batch", "4",
                 "--steps", "1", "--warmup", "1", "--out", str(out)]) == 0
    result = json.loads((out / "train.json").read_text())
    assert [r["arch"] for r in result["rows"]] == ["squeezenet1_1"] * 4
    summary = (out / "train.md").read_text()
    assert "squeezenet1_1: auto (" in summary and "the best fp32 layout" in summary


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java 17")
def test_bench_serve_loads_a_live_server_and_the_stock_baseline(exported_run_dir, tmp_path):
    from flannel.benchmarks.output import write_outputs
    from flannel.benchmarks.serve import Variant, bench_serve, format_summary, plot_latency
    from flannel.export.parity import run_parity
    from pathlib import Path

    run_parity(exported_run_dir)
    template = Path(__file__).resolve().parents[1] / "config.properties"
    result = bench_serve(exported_run_dir, template=template, levels=(1, 2),
                         requests_per_level=4, warmup=1, time_limit=60,
                         variants=[Variant("batch2-w1", 2, 20, 1)], payload_side=256)
    rows = result["rows"]
    assert {(r["model"], r["protocol"], r["concurrency"]) for r in rows} == {
        (m, p, c) for m in ("resnet18-batch2-w1", "stock") for p in ("http", "grpc")
        for c in (1, 2)}
    for r in rows:
        assert r["requests"] == 4 and r["error_rate"] == 0.0, r
        assert r["throughput"] > 0
        assert (r["inference_ms_per_request"] > 0) if r["protocol"] == "http" else \
            r["inference_ms_per_request"] is None
    assert result["reference"]["images_per_s"] > 0
    # the product handler's own split (the stock handler has none); the frontend relays the
    # worker's metrics asynchronously, so it is asked of the product rows together
    ours = [r for r in rows if r["model"] != "stock"]
    assert any(r["mean_batch"] and r["decode_ms_per_image"] > 0 and r["model_ms_per_image"] > 0
               for r in ours)
    assert all(r["mean_batch"] is None for r in rows if r["model"] == "stock")
    files = write_outputs(result, format_summary(result), tmp_path / "out", "serve",
                          (plot_latency,))
    assert {f.name for f in files} == {"serve.json", "serve.md", "serve.csv", "serve_latency.png"}



@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java 17")
def test_bench_serve_loads_torchserve_then_triton_from_the_same_archives(exported_run_dir,
                                                                         tmp_path):
    from flannel.benchmarks.output import write_outputs
    from flannel.benchmarks.serve import Variant, bench_serve, format_summary, plot_latency
    from flannel.export.parity import run_parity
    from pathlib import Path

    problem = triton_problem()
    if problem:
        pytest.skip(problem)
    run_parity(exported_run_dir)
    template = Path(__file__).resolve().parents[1] / "config.properties"
    result = bench_serve(exported_run_dir, template=template, levels=(1, 2),
                         requests_per_level=4, warmup=1, time_limit=60,
                         protocols=("grpc", "v2", "v2-grpc"),
                         variants=[Variant("batch2-w1", 2, 20, 1)], stock=False,
                         payload_side=128, runtimes=("torchserve", "triton"))
    rows = result["rows"]
    model = "resnet18-batch2-w1"
    assert [(r["runtime"], r["model"], r["protocol"], r["concurrency"]) for r in rows] == [
        (runtime, model, p, c) for runtime, protocols in (
            ("torchserve", ("grpc", "v2", "v2-grpc")), ("triton", ("v2", "v2-grpc")))
        for p in protocols for c in (1, 2)]  # Triton skips TorchServe's own gRPC API
    assert result["settings"]["runtimes"] == {"torchserve": ["grpc", "v2", "v2-grpc"],
                                              "triton": ["v2", "v2-grpc"]}
    for r in rows:
        assert r["requests"] == 4 and r["ok"] == 4 and r["error_rate"] == 0.0, r
        assert 0.0 <= r["frontend_cpu_share"] <= 1.0, r
    triton = [r for r in rows if r["runtime"] == "triton"]
    assert all(r["inference_ms_per_request"] > 0 and r["queue_ms_per_request"] >= 0
               and r["handler_ms_last_batch"] is None for r in triton), triton
    assert any(r["mean_batch"] and r["decode_ms_per_image"] > 0 and r["model_ms_per_image"] > 0
               for r in triton), triton
    summary = format_summary(result)
    assert "| triton | resnet18-batch2-w1 | v2-grpc | 2 |" in summary
    files = write_outputs(result, summary, tmp_path / "out", "serve", (plot_latency,))
    assert (tmp_path / "out" / "serve_latency.png") in files


@pytest.mark.slow
def test_preset_subject_is_written_exported_and_measured(tmp_path):
    """`flannel bench model --preset lite`: the preset's learners with random weights, fused,
    exported and parity-checked by the product's own stages, then measured like a trained run;
    a second call reuses the export."""
    from flannel.artifacts import read_manifest
    from flannel.benchmarks.model import bench_model
    from flannel.benchmarks.untrained import untrained_ensemble, untrained_learners
    from flannel.train.ensemble import PRESETS

    folder = untrained_ensemble("lite", tmp_path, per_class=4, compiled=False, crop=64)
    manifest = read_manifest(folder / "export")
    assert sorted(m["arch"] for m in manifest["members"]) == sorted(PRESETS["lite"])
    assert manifest["artifacts"]["onnx_fp32"]["gate"]["passed"]
    mtime = (folder / "export" / "manifest.json").stat().st_mtime
    assert untrained_ensemble("lite", tmp_path, compiled=False) == folder
    assert (folder / "export" / "manifest.json").stat().st_mtime == mtime
    result = bench_model([folder], batches=(1,), warmup=0, repeats=1, threads=1,
                         preprocess_repeats=1)
    assert {r["model"] for r in result["rows"]} == {"lite-untrained"}
    assert {"eager fp32", "ort-fp32"} <= {r["backend"] for r in result["rows"]}
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        untrained_ensemble("huge", tmp_path)

    learners = untrained_learners("lite", tmp_path, compiled=False)
    assert [p.name for p in learners] == list(PRESETS["lite"])
    for run in learners:
        learner = read_manifest(run / "export")
        assert learner["kind"] == "learner" and learner["artifacts"]["onnx_fp32"]["gate"]["passed"]
    assert (folder / "export" / "manifest.json").stat().st_mtime == mtime
    result = bench_model(learners[:1], batches=(1,), warmup=0, repeats=1, threads=1,
                         preprocess_repeats=1)
    assert {r["model"] for r in result["rows"]} == {learners[0].name}


def test_each_backend_is_held_to_the_peak_of_its_own_arithmetic():
    from flannel.benchmarks.model import int8_gemm_peak, peak_of

    assert [peak_of(b) for b in ("ort-int8", "torch-bf16", "eager bf16 CL", "ort-fp32",
                                 "torch-fp32")] == ["int8", "bf16", "bf16", "fp32", "fp32"]
    assert int8_gemm_peak(1, n=128, repeats=1) > 0.1  # GOP/s of a real MatMulInteger session
