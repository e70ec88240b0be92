"""`flannel bench`: the benchmark code runs end to end at tiny counts and writes its reports. No
figure is asserted against a target: only that every cell is measured and consistent."""
from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest

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
