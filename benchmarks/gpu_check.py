"""`flannel gpu-check`: one command that checks a GPU host end to end and writes one report.

    make gpu-check                        # installs the GPU set into .venv-gpu, then runs this
    flannel gpu-check [--run-dir DIR] [--out runs/gpu-check] [--budget 480]

In order, against one time budget (8 minutes by default):

1. the host: the GPU, its driver and CUDA, the CPU's ``lscpu`` model name, the GPU set's versions;
2. every ``gpu``-marked test, by pytest in a subprocess;
3. the subject: a small trained ensemble, ``runs/demo/ensemble`` when its export is verified and
   gated, else a tiny one trained here (three small learners, two epochs, 64 px);
4. its ``ort-cuda``, ``tensorrt-fp16`` and ``tensorrt-fp32`` artifacts, each built and gated by
   its backend's exporter (``flannel.backends``);
5. CPU against nvJPEG decoding of the same JPEGs (``flannel.nvjpeg.compare_decoders``);
6. ``flannel bench model`` of the subject, then a short ``flannel bench serve`` of its fastest
   gated GPU backend (one batching variant, HTTP, concurrency 1 and 8).

A step that fails is reported with its reason and the next ones still run; a step the budget no
longer covers is skipped and says so. The report (``gpu_check.json``, ``gpu_check.md``:
``flannel.benchmarks.gpu_report``) lands in ``--out`` beside the benchmarks' own files. Without an
NVIDIA GPU, or without the GPU set, nothing runs: one line says why.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from flannel.quoting import clip

log = logging.getLogger(__name__)

DEFAULT_OUT = "runs/gpu-check"
# The bound for the whole check on one GPU host.
DEFAULT_BUDGET_S = 480.0
DEMO_ENSEMBLE = "runs/demo/ensemble"
GPU_BACKENDS = ("ort-cuda", "tensorrt-fp16", "tensorrt-fp32")
# The longest the gpu-marked tests may take, so that the budget keeps about five minutes for the
# steps after them (their two engine builds and the CUDA gate take one to two minutes on an H200
# class GPU, most of it exporting the test's own tiny run).
TESTS_TIMEOUT_S = 180.0
# Rough seconds each later step needs; a step is skipped when less of the budget is left.
NEEDS_S = {"subject": 60.0, "gate": 40.0, "decode": 15.0, "bench model": 40.0,
           "bench serve": 90.0}
# The tiny subject: small learners of the registry at the tests' side, trained briefly on
# synthetic radiographs.
TINY_LEARNERS = ("resnet18", "squeezenet1_1", "mobilenet_v3_small")
TINY_SIDE = 64
TINY_PER_CLASS = 24
TINY_EPOCHS = 2
BENCH_BATCHES = (1, 8)
SERVE_LEVELS = (1, 8)
SERVE_REQUESTS = 32


class GpuCheckError(RuntimeError):
    """This host cannot run the check (no NVIDIA GPU, or the CPU set installed)."""


@dataclass(frozen=True)
class GpuCheckConfig:
    """What ``run_gpu_check`` checks and where it writes.

    Attributes:
        out: folder of the report and the benchmarks' files.
        run_dir: an exported, gated learner run or ensemble folder (None: ``DEMO_ENSEMBLE``
            when it is one, else a tiny ensemble trained under ``out/subject``).
        budget_s: seconds the whole check may take.
    """

    out: str = DEFAULT_OUT
    run_dir: str | None = None
    budget_s: float = DEFAULT_BUDGET_S


def host_problem() -> str | None:
    """Why this host cannot run the check, in one line (None: it can)."""
    from flannel.backends import BACKENDS

    return BACKENDS["ort-cuda"].host_problem() or BACKENDS["tensorrt-fp16"].host_problem()


class Steps:
    """The check's steps, run in order against one deadline; each one's outcome is recorded."""

    def __init__(self, budget_s: float) -> None:
        self.started = time.monotonic()
        self.budget_s = float(budget_s)
        self.records: list[dict] = []

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def skip(self, name: str, why: str) -> None:
        self.records.append({"step": name, "status": "skipped", "seconds": 0.0, "why": why})

    def run(self, name: str, fn: Callable[[], dict], needs_s: float = 0.0) -> dict | None:
        """``fn()``'s figures, or None when it failed (the reason is recorded) or the budget no
        longer covers ``needs_s``. A result whose ``passed`` is False counts as failed."""
        if self.left() < needs_s:
            self.skip(name, f"{max(0.0, self.left()):.0f} s of the budget left, it needs about "
                            f"{needs_s:.0f} s")
            return None
        start = time.monotonic()
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - a failed step is reported; the others run
            log.exception("gpu-check step %s failed", name)
            self.records.append({"step": name, "status": "failed",
                                 "seconds": time.monotonic() - start,
                                 "why": clip(f"{type(exc).__name__}: {exc}", 300)})
            return None
        ok = result.get("passed", True) is not False
        self.records.append({"step": name, "status": "passed" if ok else "failed",
                             "seconds": time.monotonic() - start,
                             "why": "" if ok else clip(result.get("why", ""), 300)})
        return result


def lscpu_model_name() -> str:
    """The CPU's model name as ``lscpu`` prints it (``flannel.hardware.cpu_model`` where lscpu
    is missing)."""
    from flannel import hardware

    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10,
                              env={**os.environ, "LC_ALL": "C"}).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name" and value.strip():
            return value.strip()
    return hardware.cpu_model()


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.splitlines()[0].strip() if out.strip() else "unknown"


def host_facts() -> dict:
    """The GPU (name, compute capability, memory, driver), CUDA as torch sees it, the CPU and
    the versions of the GPU set."""
    import onnxruntime
    import tensorrt
    import torch
    import torchvision

    from flannel.cpus import usable_cores

    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}",
            "gpu_memory_gb": round(props.total_memory / 2**30, 1),
            "gpus": torch.cuda.device_count(), "driver": _driver_version(),
            "cuda": torch.version.cuda, "cpu": lscpu_model_name(),
            "cores": usable_cores(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "onnxruntime": onnxruntime.__version__,
            "onnxruntime_providers": onnxruntime.get_available_providers(),
            "tensorrt": tensorrt.__version__}


def repository_root() -> Path:
    """The checkout this package is installed from (editable), which holds ``tests/``."""
    return Path(__file__).resolve().parents[1]


def run_gpu_tests(out: Path, timeout_s: float) -> dict:
    """Every ``gpu``-marked test, by pytest in a subprocess (its log and JUnit XML in ``out``):
    counts, and each test's outcome."""
    root = repository_root()
    if not (root / "tests").is_dir():
        return {"passed": False, "why": f"no tests/ beside the package ({root}): install the "
                                        f"checkout editable (make setup GPU=1)"}
    xml, log_file = out / "gpu_tests.xml", out / "gpu_tests.log"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
           f"--junitxml={xml}"]
    try:
        done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        log_file.write_text(str(exc.stdout or "") + str(exc.stderr or ""))
        return {"passed": False, "why": f"the gpu tests took more than {timeout_s:.0f} s"}
    log_file.write_text(done.stdout + done.stderr)
    cases = junit_cases(xml) if xml.is_file() else []
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "skipped")}
    ok = done.returncode == 0 and counts["passed"] > 0
    why = "" if ok else (f"pytest exit status {done.returncode}: {counts['failed']} failed, "
                         f"{counts['passed']} passed")
    return {"passed": ok, "why": why, "exit_status": done.returncode, "counts": counts,
            "cases": cases, "log": str(log_file)}


def junit_cases(path: Path) -> list[dict]:
    """Each test case of a JUnit XML report: name, outcome and the first line of its message."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind, name in (("failure", "failed"), ("error", "failed"), ("skipped", "skipped")):
            found = case.find(kind)
            if found is not None:
                outcome, message = name, (found.get("message") or "").splitlines()[:1]
                message = message[0] if message else ""
                break
        cases.append({"name": f"{case.get('classname')}::{case.get('name')}",
                      "outcome": outcome, "message": clip(message, 200)})
    return cases


def tiny_trained_ensemble(root: Path, seed: int = 0) -> Path:
    """A small ensemble trained here in about a minute: synthetic radiographs, ``TINY_LEARNERS``
    trained ``TINY_EPOCHS`` epochs at ``TINY_SIDE`` px, FLANNEL's fusion, exported with its
    parity gate. An ensemble already exported there is reused."""
    from flannel.data.split import split_dataset
    from flannel.data.synth import SynthConfig, synthesize
    from flannel.export.onnx_export import export_onnx
    from flannel.export.parity import run_parity
    from flannel.train.config import TrainConfig
    from flannel.train.ensemble import EnsembleConfig, train_ensemble, train_learners

    folder = root / "ensemble"
    if gated_export_problem(folder) is None:
        return folder
    synthesize(root / "data", SynthConfig(n_per_class=TINY_PER_CLASS, size=96, seed=seed),
               overwrite=True)
    split = split_dataset([root / "data"], root / "manifest.csv", seed=seed + 1, progress=False)
    train_cfg = TrainConfig(manifest=split["manifest"], out=str(root / "learners"),
                            epochs=TINY_EPOCHS, input_size=TINY_SIDE, batch_size=16, seed=seed)
    train_learners(TINY_LEARNERS, train_cfg, root / "learners")
    train_ensemble(EnsembleConfig(out=str(folder), k=len(TINY_LEARNERS), gammas=[2.0],
                                  runs=[str(root / "learners" / a) for a in TINY_LEARNERS],
                                  batch_size=16, seed=seed, model_name="gpu-check-ensemble"))
    export_onnx(folder)
    run_parity(folder)
    return folder


def gated_export_problem(run_dir: Path) -> str | None:
    """Why ``run_dir`` has no verified, parity-passed export (None: it has one)."""
    from flannel.artifacts import export_dir_of
    from flannel.handlers.archive import ArchiveError, check_export

    try:
        check_export(export_dir_of(run_dir))
    except ArchiveError as exc:
        return str(exc)
    return None


def choose_subject(cfg: GpuCheckConfig) -> dict:
    """The run the gates and benchmarks use (``GpuCheckConfig.run_dir``)."""
    from flannel.artifacts import export_dir_of, read_manifest

    if cfg.run_dir:
        run_dir, source = Path(cfg.run_dir), "given"
        problem = gated_export_problem(run_dir)
        if problem:
            return {"passed": False, "why": problem, "run_dir": str(run_dir)}
    elif gated_export_problem(Path(DEMO_ENSEMBLE)) is None:
        run_dir, source = Path(DEMO_ENSEMBLE), "the demo's ensemble, reused"
    else:
        run_dir = tiny_trained_ensemble(Path(cfg.out) / "subject")
        source = f"a tiny ensemble trained here ({TINY_EPOCHS} epochs at {TINY_SIDE} px)"
    manifest = read_manifest(export_dir_of(run_dir))
    return {"run_dir": str(run_dir), "source": source, "model": manifest["model_name"],
            "kind": manifest["kind"], "input": manifest["input"]["spec"]["resize"],
            "members": [m["name"] for m in manifest.get("members", [])]}


def gate_backend(run_dir: Path, name: str) -> dict:
    """Build and gate ``name``'s artifact of ``run_dir``; its gate figures."""
    from flannel.backends import BACKENDS

    gate = BACKENDS[name].export(run_dir)
    return {**gate, "why": "; ".join(gate.get("failures", []))}


def compare_jpeg_decoders() -> dict:
    """CPU against nvJPEG on radiograph-sized JPEGs (``flannel.nvjpeg``)."""
    from flannel.nvjpeg import NvJpegLevels, compare_decoders, radiograph_jpegs

    return compare_decoders(radiograph_jpegs(), NvJpegLevels(0))


def bench_model_step(run_dir: Path, out: Path) -> dict:
    """``flannel bench model`` of the subject at ``BENCH_BATCHES``, written under ``out``."""
    from flannel.benchmarks.model import bench_model, format_summary, plot_backends
    from flannel.benchmarks.output import write_outputs

    result = bench_model([run_dir], batches=BENCH_BATCHES, warmup=2, repeats=10,
                         preprocess_repeats=2)
    summary = format_summary(result)
    files = write_outputs(result, summary, out, "model", (plot_backends,))
    return {"markdown": summary, "files": [str(f) for f in files], "rows": result["rows"]}


def fastest_gpu_backend(rows: list[dict]) -> str | None:
    """The gated GPU backend with the most images/s at the largest batch ``bench model``
    measured, from its rows."""
    top = max((r["batch"] for r in rows), default=None)
    ranked = [r for r in rows if r["batch"] == top and r["backend"] in GPU_BACKENDS
              and r["note"] == "gate passed"]
    return max(ranked, key=lambda r: r["images_per_s"])["backend"] if ranked else None


def bench_serve_step(run_dir: Path, backend: str, out: Path, time_limit_s: float) -> dict:
    """A short ``flannel bench serve``: ``backend`` behind one batching variant, over HTTP, at
    ``SERVE_LEVELS`` concurrent clients, without the stock baseline."""
    from flannel.benchmarks.output import write_outputs
    from flannel.benchmarks.serve import Variant, bench_serve, format_summary, plot_latency
    from flannel.handlers.archive import DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_DELAY_MS

    variant = Variant(f"batch{DEFAULT_BATCH_SIZE}-w1", DEFAULT_BATCH_SIZE,
                      DEFAULT_MAX_BATCH_DELAY_MS, 1)
    result = bench_serve(run_dir, backend=backend, levels=SERVE_LEVELS,
                         requests_per_level=SERVE_REQUESTS, warmup=4, time_limit=time_limit_s,
                         protocols=("http",), variants=[variant], stock=False,
                         start_timeout=120)
    summary = format_summary(result)
    files = write_outputs(result, summary, out, "serve", (plot_latency,))
    errors = sum(r["error_rate"] for r in result["rows"])
    return {"passed": errors == 0, "why": "some requests failed" if errors else "",
            "backend": backend, "markdown": summary, "files": [str(f) for f in files]}


def _benchmarks(steps: Steps, run_dir: Path, out: Path, report: dict) -> None:
    """``bench model``, then ``bench serve`` of the fastest gated GPU backend it found."""
    model = steps.run("bench model", lambda: bench_model_step(run_dir, out / "bench-model"),
                      NEEDS_S["bench model"])
    report["bench_model"] = model and {k: v for k, v in model.items() if k != "rows"}
    backend = (model and fastest_gpu_backend(model["rows"])) or "auto"
    per_level_s = min(30.0, max(5.0, (steps.left() - 60) / (2 * len(SERVE_LEVELS))))
    report["bench_serve"] = steps.run("bench serve", lambda: bench_serve_step(
        run_dir, backend, out / "bench-serve", per_level_s), NEEDS_S["bench serve"])


def run_gpu_check(cfg: GpuCheckConfig = GpuCheckConfig()) -> dict:
    """Run every step (see the module doc) and write the report.

    Returns:
        The report (``flannel.benchmarks.gpu_report``), with ``files`` it was written to.

    Raises:
        GpuCheckError: in one line, before anything runs or is written, when this host has no
            usable NVIDIA GPU or lacks the GPU set.
    """
    from flannel.benchmarks.gpu_report import write_report

    problem = host_problem()
    if problem:
        raise GpuCheckError(problem)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = Steps(cfg.budget_s)
    report: dict = {"budget_s": cfg.budget_s, "gates": {}}
    report["host"] = steps.run("host", host_facts)
    report["tests"] = steps.run("gpu tests", lambda: run_gpu_tests(
        out, min(TESTS_TIMEOUT_S, max(1.0, steps.left() - 300))))
    report["subject"] = subject = steps.run("subject", lambda: choose_subject(cfg),
                                            NEEDS_S["subject"])
    run_dir = Path(subject["run_dir"]) if subject and subject.get("passed", True) else None
    if run_dir is None:
        for name in [*(f"gate {n}" for n in GPU_BACKENDS), "bench model", "bench serve"]:
            steps.skip(name, "no subject: see the subject step")
    for name in GPU_BACKENDS if run_dir else ():
        report["gates"][name] = steps.run(f"gate {name}", lambda n=name: gate_backend(run_dir, n),
                                          NEEDS_S["gate"])
    report["decode"] = steps.run("jpeg decode", compare_jpeg_decoders, NEEDS_S["decode"])
    if run_dir:
        _benchmarks(steps, run_dir, out, report)
    report["steps"] = steps.records
    report["seconds"] = time.monotonic() - steps.started
    report["within_budget"] = report["seconds"] <= cfg.budget_s
    report["passed"] = report["within_budget"] and all(
        r["status"] == "passed" for r in steps.records)
    report["files"] = [str(p) for p in write_report(report, out)]
    return report
