"""`flannel gpu-check` and `make gpu-check`: one line and exit status 2 without a GPU; the
report's page from faked figures; the step runner's budget."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from flannel import hardware
from flannel.benchmarks.gpu_check import Steps, fastest_gpu_backend, junit_cases
from flannel.benchmarks.gpu_report import report_markdown, write_report

REPO = Path(__file__).resolve().parents[1]
NO_GPU = hardware.cuda_problem()


@pytest.mark.skipif(NO_GPU is None, reason="this host has a GPU: the check would run")
def test_without_a_gpu_the_check_stops_at_once_in_one_line(tmp_path, capsys):
    from flannel.cli import main

    start = time.monotonic()
    assert main(["gpu-check", "--out", str(tmp_path / "report")]) == 2
    assert time.monotonic() - start < 30
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no NVIDIA GPU"), captured
    assert captured.out == "" and not (tmp_path / "report").exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_gpu_check_stops_in_one_line_before_installing_anything():
    # NVIDIA_GPUS= stands for a host where neither the driver nor nvidia-smi sees a GPU.
    done = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "gpu-check",
                           "NVIDIA_GPUS=", "GPU_VENV=/nonexistent/venv"],
                          capture_output=True, text=True, timeout=60)
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, lines
    assert "gpu-check: no NVIDIA GPU here" in lines[0]
    assert not Path("/nonexistent/venv").exists()


GATE = {"name": "tensorrt-fp16", "passed": True, "argmax_agreement": 1.0,
        "min_argmax_agreement": 0.99, "macro_f1_reference": 0.8125, "macro_f1_candidate": 0.8125,
        "max_abs_diff": 0.0041, "images": 24, "failures": []}


def _fake_report(tmp_path: Path) -> dict:
    host = {"gpu": "NVIDIA H200", "gpus": 1, "compute_capability": "9.0", "gpu_memory_gb": 139.8,
            "driver": "580.95.05", "cuda": "13.2", "cpu": "Intel(R) Xeon(R) Platinum 8480C",
            "cores": 16, "torch": "2.15.0", "torchvision": "0.29.2",
            "onnxruntime": "1.31.1", "onnxruntime_providers": ["CUDAExecutionProvider",
                                                                "CPUExecutionProvider"],
            "tensorrt": "11.4.0.106"}
    steps = [{"step": s, "status": "passed", "seconds": 12.5, "why": ""}
             for s in ("host", "gpu tests", "subject", "gate ort-cuda", "gate tensorrt-fp16",
                       "jpeg decode", "bench model")]
    steps += [{"step": "gate tensorrt-fp32", "status": "failed", "seconds": 30.0,
               "why": "max abs diff 2e-3 above 1e-4"},
              {"step": "bench serve", "status": "skipped", "seconds": 0.0,
               "why": "20 s of the budget left, it needs about 90 s"}]
    decode = {"device": "cuda:0", "repeats": 10, "favours": "nvjpeg",
              "reason": "same levels, 3.10x faster: 4.0 ms against 12.4 ms for all 2 JPEGs",
              "rows": [{"file": "cxr2048.jpg", "bytes": 812345, "on_gpu": True,
                        "identical": True, "pixels_differing": 0, "max_abs_diff": 0,
                        "cpu_ms": 11.2, "nvjpeg_ms": 3.5}]}
    return {"budget_s": 480.0, "seconds": 471.0, "within_budget": True, "passed": False,
            "host": host, "steps": steps,
            "tests": {"passed": True, "exit_status": 0, "log": "runs/gpu-check/gpu_tests.log",
                      "counts": {"passed": 4, "failed": 0, "skipped": 0},
                      "cases": [{"name": "tests.test_tensorrt::test_engine[fp16]",
                                 "outcome": "passed", "message": ""}]},
            "subject": {"run_dir": "runs/demo/ensemble", "source": "the demo's ensemble, reused",
                        "model": "ensemble", "kind": "ensemble", "input": 128,
                        "members": ["resnet18", "densenet121"]},
            "gates": {"ort-cuda": {**GATE, "name": "ort-cuda"}, "tensorrt-fp16": GATE,
                      "tensorrt-fp32": None},
            "decode": decode,
            "bench_model": {"markdown": "# Model benchmark on Intel Xeon\n\n| model | backend |\n"
                                        "| --- | --- |\n| ensemble | tensorrt-fp16 |",
                            "files": [str(tmp_path / "bench-model" / "model.json")]},
            "bench_serve": None}


def test_the_report_page_holds_every_figure_and_says_what_did_not_pass(tmp_path):
    report = _fake_report(tmp_path)
    json_path, md_path = write_report(report, tmp_path / "out")
    assert json.loads(json_path.read_text()) == report
    page = md_path.read_text()
    assert page == report_markdown(report)
    assert page.startswith("# GPU check on NVIDIA H200 (CPU: Intel(R) Xeon(R) Platinum 8480C)")
    assert "Not passed: gate tensorrt-fp32, bench serve did not pass." in page
    assert "| NVIDIA H200 (x1) | 9.0 | 139.8 GB | 580.95.05 | 13.2 |" in page
    assert "4 passed, 0 failed, 0 skipped" in page
    assert ("- tensorrt-fp16 gate (tensorrt-fp16) passed: argmax agreement 1.0000 (>= 0.99), "
            "macro-F1 0.8125 -> 0.8125, max abs diff 0.0041, 24 validation images") in page
    assert "- tensorrt-fp32: not gated (see the steps)" in page
    assert "| cxr2048.jpg | 812,345 | 11.20 | 3.50 | 3.20x | yes | yes |" in page
    assert "**The numbers favour nvjpeg**: same levels, 3.10x faster" in page
    assert "### Model benchmark on Intel Xeon" in page and "| ensemble | tensorrt-fp16 |" in page
    assert page.rstrip().endswith("## bench serve\n\nNot run (see the steps).")
    over = {**report, "seconds": 500.0, "within_budget": False,
            "steps": [{**s, "status": "passed"} for s in report["steps"]]}
    assert "Not passed: the check took 500 s, over its 480 s budget." in report_markdown(over)


def test_steps_record_failures_and_skip_what_the_budget_no_longer_covers():
    steps = Steps(budget_s=100)
    assert steps.run("ok", lambda: {"figure": 1}) == {"figure": 1}
    assert steps.run("gate", lambda: {"passed": False, "why": "argmax 0.9"}) is not None
    assert steps.run("boom", lambda: 1 / 0) is None
    assert steps.run("long", lambda: {}, needs_s=1000) is None
    assert [(r["step"], r["status"]) for r in steps.records] == [
        ("ok", "passed"), ("gate", "failed"), ("boom", "failed"), ("long", "skipped")]
    assert steps.records[1]["why"] == "argmax 0.9"
    assert steps.records[2]["why"] == "ZeroDivisionError: division by zero"
    assert "it needs about 1000 s" in steps.records[3]["why"]


def test_the_gpu_tests_run_by_marker_in_a_subprocess(tmp_path, monkeypatch):
    from flannel.benchmarks import gpu_check

    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    (repo / "pyproject.toml").write_text('[tool.pytest.ini_options]\nmarkers = ["gpu: a GPU"]\n'
                                         'addopts = "--strict-markers"\n')
    (repo / "tests" / "test_some.py").write_text(
        "import pytest\n\n@pytest.mark.gpu\ndef test_on_the_gpu():\n    pass\n\n"
        "@pytest.mark.gpu\n@pytest.mark.skip(reason='no engine')\ndef test_skipped():\n"
        "    pass\n\ndef test_not_marked():\n    raise AssertionError\n")
    monkeypatch.setattr(gpu_check, "repository_root", lambda: repo)
    result = gpu_check.run_gpu_tests(tmp_path, timeout_s=120)
    assert result["passed"] and result["counts"] == {"passed": 1, "failed": 0, "skipped": 1}
    assert [c["name"] for c in result["cases"]] == ["tests.test_some::test_on_the_gpu",
                                                    "tests.test_some::test_skipped"]
    assert Path(result["log"]).read_text()


def test_junit_cases_and_the_served_gpu_backend(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite name="pytest">'
                   '<testcase classname="tests.test_a" name="test_ok"/>'
                   '<testcase classname="tests.test_a" name="test_bad">'
                   '<failure message="assert 1 == 2&#10;more">trace</failure></testcase>'
                   '<testcase classname="tests.test_b" name="test_gpu">'
                   '<skipped message="no GPU"/></testcase></testsuite></testsuites>')
    assert junit_cases(xml) == [
        {"name": "tests.test_a::test_ok", "outcome": "passed", "message": ""},
        {"name": "tests.test_a::test_bad", "outcome": "failed", "message": "assert 1 == 2"},
        {"name": "tests.test_b::test_gpu", "outcome": "skipped", "message": "no GPU"}]
    rows = [{"backend": b, "batch": n, "images_per_s": s, "note": note}
            for b, n, s, note in (("tensorrt-fp16", 8, 900.0, "gate passed"),
                                  ("tensorrt-fp32", 8, 950.0, "gate FAILED"),
                                  ("ort-cuda", 8, 400.0, "gate passed"),
                                  ("ort-fp32", 8, 5000.0, "gate passed"),
                                  ("tensorrt-fp16", 1, 9000.0, "gate passed"))]
    assert fastest_gpu_backend(rows) == "tensorrt-fp16"
    assert fastest_gpu_backend([r for r in rows if r["backend"] == "ort-fp32"]) is None


def test_the_check_runs_its_steps_in_order_and_writes_one_report(tmp_path, monkeypatch):
    """Every step faked (they need a GPU): the order, the subject reaching the gates and the
    benchmarks, the served backend taken from bench model, and the report on disk."""
    from flannel.benchmarks import gpu_check

    seen, figures = [], _fake_report(tmp_path)
    fake = {
        "host_problem": lambda: None,
        "host_facts": lambda: figures["host"],
        "run_gpu_tests": lambda out, timeout_s: figures["tests"],
        "choose_subject": lambda cfg: {**figures["subject"], "run_dir": str(tmp_path / "ens")},
        "gate_backend": lambda run_dir, name: seen.append((run_dir.name, name)) or dict(GATE),
        "compare_jpeg_decoders": lambda: figures["decode"],
        "bench_model_step": lambda run_dir, out: {"markdown": "", "files": [], "rows": [
            {"backend": "ort-cuda", "batch": 8, "images_per_s": 10.0, "note": "gate passed"}]},
        "bench_serve_step": lambda run_dir, backend, out, limit: seen.append(backend) or {},
    }
    for name, value in fake.items():
        monkeypatch.setattr(gpu_check, name, value)
    report = gpu_check.run_gpu_check(gpu_check.GpuCheckConfig(out=str(tmp_path / "out")))
    assert [s["step"] for s in report["steps"]] == [
        "host", "gpu tests", "subject", "gate ort-cuda", "gate tensorrt-fp16",
        "gate tensorrt-fp32", "jpeg decode", "bench model", "bench serve"]
    assert report["passed"] and seen == [("ens", "ort-cuda"), ("ens", "tensorrt-fp16"),
                                         ("ens", "tensorrt-fp32"), "ort-cuda"]
    assert [Path(f).name for f in report["files"]] == ["gpu_check.json", "gpu_check.md"]
    monkeypatch.setattr(gpu_check, "choose_subject",
                        lambda cfg: {"passed": False, "why": "parity failed"})
    report = gpu_check.run_gpu_check(gpu_check.GpuCheckConfig(out=str(tmp_path / "out2")))
    assert not report["passed"]
    assert {s["step"]: s["status"] for s in report["steps"]}["bench serve"] == "skipped"
