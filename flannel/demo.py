"""The main job: the whole pipeline on the embedded synthetic data, ending with a served model.

    flannel demo                        # or: make demo; serves the FLANNEL ensemble
    flannel demo --model learner        # one learner (--arch) instead

synthetic data -> patient-level split and the metadata-only shortcut audit -> train the lite
preset's five learners (precision picked from the CPU; each with its report, shortcut check, pixel
baseline and Grad-CAM) -> FLANNEL's fusion of them with its baselines -> external evaluation of
the best learner on a second synthetic "hospital" -> Grad-CAM of the real chest DICOM -> the
ensemble as one ONNX graph + parity gate -> int8 and compiled (bf16 on CPUs with native bf16, else
fp32) backends, each behind its accuracy gate -> a short benchmark of every backend
(runs/demo/bench) -> external evaluation of the served ensemble on the second "hospital" (an
archive needs one) -> .mar archive of the fastest backend that passed, with its model card ->
TorchServe (config.properties) -> predictions with learner weights over HTTP and gRPC for a few
synthetic images and a real chest radiograph DICOM -> stop the server.
Outputs go under ``runs/demo/`` and ``model_store/``. A stage whose inputs are unchanged since
the previous run (data, audit, learners, fusion, export with its gates and benchmark, the served
model's external evaluation) is reused, saying so (``--fresh`` rebuilds everything); the
learners' epochs are sized by this CPU's measured training speed to fit ``--train-budget``
seconds; the time of every stage is printed at the end and written to
``runs/demo/stage_times.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flannel.demo_stages import Stages, epochs_for_budget, fingerprint, training_speed

log = logging.getLogger("flannel.demo")
MODELS = ("ensemble", "learner")
# Name of the external report (RUN_DIR/external/<name>/) on the second synthetic "hospital".
EXTERNAL_NAME = "synthetic-external"
STAGE_COUNT = 11


def _lite_preset() -> list[str]:
    from flannel.train.ensemble import PRESETS  # imported late: the CLI parser stays light

    return list(PRESETS["lite"])


@dataclass
class DemoConfig:
    """Knobs of the main job. Defaults run in a few minutes on 2 CPU cores."""

    workdir: str = "runs/demo"
    model_store: str = "model_store"
    config: str = "config.properties"
    # "ensemble": the lite preset's learners fused by FLANNEL; "learner": ``arch`` alone.
    model: str = "ensemble"
    arch: str = "resnet18"
    archs: list[str] = field(default_factory=_lite_preset)
    # The most epochs; fewer where this CPU's measured speed would overrun ``train_budget_s``.
    epochs: int = 6
    # Seconds of learner training the epochs are sized to (0: always ``epochs``).
    train_budget_s: float = 100.0
    input_size: int = 112
    n_per_class: int = 120
    image_size: int = 128
    # The external set: another seed and image size, as if from another hospital.
    external_per_class: int = 30
    external_image_size: int = 160
    seed: int = 0
    keep_serving: bool = False
    # Rebuild every stage even where the previous run's outputs could be reused.
    fresh: bool = False


def _banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def _predict_samples(manifest: Path, count: int) -> list[Path]:
    """One test-split file per class (then more) plus the real chest DICOM, if installed."""
    from flannel.data.records import read_manifest
    from flannel.samples import real_chest_dicom

    rows = read_manifest(manifest, "test")
    picked, seen = [], set()
    for row in rows:
        if row.label not in seen:
            picked.append(Path(row.path))
            seen.add(row.label)
    picked += [Path(r.path) for r in rows if Path(r.path) not in picked][:max(0, count - len(picked))]
    dicom = real_chest_dicom()
    if dicom is None:
        log.warning("pydicom-data is not installed: skipping the real chest radiograph")
    return picked + ([dicom] if dicom else [])


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage in order; returns the figures printed along the way."""
    from flannel.data.split import split_dataset
    from flannel.data.synth import SynthConfig, synthesize
    from flannel.export.cli import format_table
    from flannel.export.onnx_export import export_onnx
    from flannel.export.parity import run_parity
    from flannel.handlers.archive import build_archive
    from flannel.handlers.client import PROTOCOLS, Client
    from flannel.handlers.ts_process import start_server, stop_server
    from flannel.model_card import read_card
    from flannel.samples import real_chest_dicom
    from flannel.train.config import TrainConfig
    from flannel.train.external import evaluate_external
    from flannel.train.gradcam import explain_images
    from flannel.train.loop import train_learner

    started = time.perf_counter()
    work = Path(cfg.workdir)
    stages = Stages(work)
    if cfg.fresh:
        shutil.rmtree(work / ".stages", ignore_errors=True)
    version = _software()
    _banner(f"1/{STAGE_COUNT} synthetic chest X-rays")
    data = work / "data"
    manifest = work / "manifest.csv"
    synth_cfg = SynthConfig(n_per_class=cfg.n_per_class, size=cfg.image_size, seed=cfg.seed)
    with stages.timed("data"):
        key = fingerprint({"synth": asdict(synth_cfg), "split_seed": cfg.seed + 1, **version})
        if not stages.unchanged("data", key=key, outputs=[data, manifest]):
            synth = synthesize(data, synth_cfg, overwrite=True)
            print(f"{synth['files']} images in {data}: {synth['counts']}, formats "
                  f"{synth['formats']}")
            split = split_dataset([data], manifest, seed=cfg.seed + 1)
            print(f"split manifest {split['manifest']}: {split['counts']}")
            stages.done("data", key)
    with stages.timed("data audit"):
        _audit(data, manifest, stages, version)

    train_cfg = TrainConfig(manifest=str(manifest), out=str(work / cfg.arch), arch=cfg.arch,
                            epochs=cfg.epochs, input_size=cfg.input_size, seed=cfg.seed)
    if cfg.model == "ensemble":
        _banner(f"2/{STAGE_COUNT} train {len(cfg.archs)} learners, then FLANNEL's fusion")
        served_dir, learner_dir, figure = _train_ensemble(train_cfg, cfg, work, stages, version)
    else:
        _banner(f"2/{STAGE_COUNT} train {cfg.arch}")
        with stages.timed("learners"):
            train_cfg.epochs = _sized_epochs(cfg, [cfg.arch], manifest)
            result = train_learner(train_cfg)
        print((result.run_dir / "report.md").read_text())
        served_dir = learner_dir = result.run_dir
        figure = result.report.get("test", result.report["val"])["macro_f1"]

    _banner(f"3/{STAGE_COUNT} external evaluation of {learner_dir.name} (a second synthetic "
            "hospital)")
    external = work / "external"
    with stages.timed("external evaluation"):
        ext_cfg = SynthConfig(n_per_class=cfg.external_per_class, size=cfg.external_image_size,
                              seed=cfg.seed + 100)
        external_key = fingerprint({"synth": asdict(ext_cfg), **version})
        if not stages.unchanged("external data", key=external_key, outputs=[external]):
            synthesize(external, ext_cfg, overwrite=True)
            stages.done("external data", external_key)
        ext = evaluate_external(learner_dir, [external], name=EXTERNAL_NAME)
    print((Path(ext["out_dir"]) / "report.md").read_text())

    _banner(f"4/{STAGE_COUNT} Grad-CAM")
    dicom = real_chest_dicom()
    sample = [dicom] if dicom else _predict_samples(manifest, count=1)[:1]
    with stages.timed("Grad-CAM"):
        for path in explain_images(learner_dir, sample, learner_dir / "explain"):
            print(f"wrote {path}")

    _banner(f"5/{STAGE_COUNT} ONNX export and parity gate ({cfg.model})")
    export_key = fingerprint({"model": cfg.model, **version}, _served_inputs(served_dir))
    bench_dir = work / "bench"
    reuse = stages.unchanged("export", key=export_key,
                             outputs=[served_dir / "export" / "manifest.json",
                                      bench_dir / "model.json"]) and _export_readable(served_dir)
    with stages.timed("export and parity"):
        if not reuse:
            stages.forget("export")
            export_onnx(served_dir)
        parity = run_parity(served_dir)
    print(format_table(parity))

    _banner(f"6/{STAGE_COUNT} fast backends behind their gates (int8; compiled bf16 where it "
            "can win)")
    if reuse:
        stages.reused += ["fast backends", "benchmark"]
    with stages.timed("fast backends"):
        backends = _recorded_gates(served_dir) if reuse else fast_backends(served_dir)

    _banner(f"7/{STAGE_COUNT} short benchmark of every backend (flannel bench model)")
    with stages.timed("benchmark"):
        if reuse:
            bench = json.loads((bench_dir / "model.json").read_text())
            print((bench_dir / "model.md").read_text())
        else:
            bench = _bench(served_dir, bench_dir)
            stages.done("export", export_key)

    _banner(f"8/{STAGE_COUNT} external evaluation of the served {cfg.model} (a second "
            "synthetic hospital; the archive refuses a model without one)")
    with stages.timed("served external evaluation"):
        served_ext = _evaluate_served(served_dir, external, external_key, stages)
    print((served_dir / "external" / EXTERNAL_NAME / "report.md").read_text())

    _banner(f"9/{STAGE_COUNT} archive with its model card (backend auto: the fastest that passed "
            "its gate)")
    with stages.timed("archive"):
        mar = build_archive(served_dir, cfg.model_store)
    print(read_card(mar))
    print(f"wrote {mar} serving {_archived_backend(mar)}; its card: flannel card {mar}")

    _banner(f"10/{STAGE_COUNT} TorchServe")
    serving = time.perf_counter()
    info = start_server(cfg.config, model_store=cfg.model_store)
    print(info.describe())
    answers = {}
    try:
        _banner(f"11/{STAGE_COUNT} predictions (TorchServe's HTTP and gRPC, Open Inference "
                "Protocol v2 REST and gRPC) and one explanation")
        client = Client(info, model=mar.stem)
        files = _predict_samples(manifest, count=4)
        for protocol in PROTOCOLS:
            print(f"--- {protocol}")
            answers[protocol] = client.predict(files, protocol=protocol)
            for r in answers[protocol]:
                print(r.summary())
        print("--- explanation (/explanations, Grad-CAM on the eager graph)")
        answers["explain"] = client.explain(sample)
        for r in answers["explain"]:
            print(r.summary())
            if r.overlay_png:
                overlay = work / "explain-served" / f"{Path(r.file).name}.gradcam.png"
                overlay.parent.mkdir(parents=True, exist_ok=True)
                overlay.write_bytes(r.overlay_png)
                print(f"wrote {overlay}")
    finally:
        if cfg.keep_serving:
            print(f"\nserver left running; stop it with: flannel serve stop --config {cfg.config}")
        else:
            stop_server(cfg.config)
            print("\nserver stopped")
    stages.seconds["serve and predict"] = time.perf_counter() - serving
    from flannel.hardware import cpu_model

    print("\n" + stages.table(cpu_model()))
    (work / "stage_times.json").write_text(json.dumps(
        {"cpu": cpu_model(), "seconds": stages.seconds, "reused": stages.reused,
         "total": time.perf_counter() - started}, indent=2) + "\n")
    ok = all(r.ok for rs in answers.values() for r in rs)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; "
          f"served {cfg.model} {mar.stem}, test macro-F1 {figure:.3f}; "
          f"parity {'passed' if parity.passed else 'FAILED'}; "
          f"{sum(len(v) for v in answers.values())} answers, {'all OK' if ok else 'some failed'}")
    return {"served_dir": served_dir, "external": ext, "served_external": served_ext,
            "parity": parity, "answers": answers, "mar": mar,
            "backends": backends, "bench": bench, "stages": stages, "ok": ok}


def _audit(data: Path, manifest: Path, stages: Stages, version: dict) -> None:
    """The metadata-only shortcut audit of the demo data, written as ``audit.json`` beside the
    split manifest, where the model card reads it."""
    from flannel.data.audit import audit_dataset
    from flannel.model_card import AUDIT_NAME

    out = manifest.with_name(AUDIT_NAME)
    key = fingerprint({"audit": str(data), **version}, [manifest])
    if stages.unchanged("data audit", key=key, outputs=[out]):
        return
    report = audit_dataset([data], manifest=manifest)
    out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    print(report.format_text())
    print(f"audit written to {out}")
    stages.done("data audit", key)


def _evaluate_served(served_dir: Path, external: Path, external_key: str,
                     stages: Stages) -> dict:
    """External evaluation of the model the archive serves (``flannel evaluate``: a learner run
    or an ensemble folder), with its export's OOD score; reused while the external set and the
    export (which pins every checkpoint's sha256) are unchanged."""
    from flannel.train.external import evaluate_external

    report = served_dir / "external" / EXTERNAL_NAME / "report.json"
    key = fingerprint({"external": external_key}, [served_dir / "export" / "manifest.json"])
    if stages.unchanged("served external evaluation", key=key, outputs=[report]):
        return json.loads(report.read_text())
    result = evaluate_external(served_dir, [external], name=EXTERNAL_NAME)
    stages.done("served external evaluation", key)
    return result


def fast_backends(served_dir: Path) -> dict[str, dict]:
    """Every backend that can run on this host and can win here (``flannel.backends``:
    int8 everywhere, compiled bf16 where the CPU has native bf16, GPU engines on a GPU host),
    each through its gate; one line per backend built or left out. Returns the gate figures by
    backend."""
    from flannel.backends import worth_building
    from flannel.export.gate import format_gate

    build, skipped = worth_building()
    for line in skipped:
        print(line)
    gates = {spec.name: spec.export(served_dir) for spec in build}
    for name, gate in gates.items():
        print(format_gate(name, gate))
    return gates


def _software() -> dict:
    """Versions whose change invalidates every reused stage."""
    from importlib.metadata import version

    import torch

    return {"flannel": version("flannel-xray"), "torch": torch.__version__}


def _export_readable(served_dir: Path) -> bool:
    """Whether this code reads the export a previous run left (its graph's outputs and the
    artifacts it now requires); an export of older code is made again, saying why."""
    from flannel.artifacts import (ANSWER_POLICY, ManifestError, export_dir_of, graph_spec,
                                   read_manifest)

    try:
        manifest = read_manifest(export_dir_of(served_dir))
        graph_spec(manifest)
        if ANSWER_POLICY not in manifest["artifacts"]:
            raise ManifestError(f"no {ANSWER_POLICY} artifact")
    except (ManifestError, OSError, KeyError, ValueError) as exc:
        print(f"export: made again, the previous one is not this code's ({exc})")
        return False
    return True


def _served_inputs(served_dir: Path) -> list[Path]:
    """The checkpoints the served model is exported from (an ensemble's fusion and learners)."""
    report = served_dir / "ensemble_report.json"
    if not report.is_file():
        return sorted(served_dir.glob("best.pt"))
    runs = [Path(r["run_dir"]) for r in json.loads(report.read_text())["ranking"]]
    return [served_dir / "fusion.pt", *(r / "best.pt" for r in runs if (r / "best.pt").is_file())]


def _recorded_gates(served_dir: Path) -> dict[str, dict]:
    """The gates the reused export's backends passed or failed, by backend."""
    from flannel.artifacts import read_manifest
    from flannel.export.gate import format_gate

    gates = {e["backend"]: e["gate"] for e in read_manifest(served_dir / "export")[
        "artifacts"].values() if e.get("backend") and e.get("backend") != "ort-fp32"
        and e.get("gate")}
    for name, gate in gates.items():
        print(format_gate(name, gate))
    return gates


def _sized_epochs(cfg: DemoConfig, archs: list[str], manifest: Path) -> int:
    """``cfg.epochs``, or fewer where this CPU's measured training speed would overrun
    ``cfg.train_budget_s``; prints one line saying what was measured and chosen."""
    from flannel.data.records import read_manifest
    from flannel.hardware import cpu_model
    from flannel.train.config import TrainConfig

    if cfg.train_budget_s <= 0:
        return cfg.epochs
    train, val = (len(read_manifest(manifest, s)) for s in ("train", "val"))
    batch = TrainConfig.batch_size
    speed = training_speed(archs, cfg.input_size, batch)
    # Each epoch also recomputes BatchNorm statistics on a few training batches (forward only).
    forward = val + TrainConfig.precise_bn_batches * batch
    epochs = epochs_for_budget(speed, train, forward, cfg.train_budget_s, cfg.epochs)
    print(f"training sized to {cfg.train_budget_s:.0f} s on {cpu_model()}: "
          + ", ".join(f"{a} {ips:.0f} img/s" for a, ips in speed.items())
          + f" -> {epochs} epochs of {train} images (at most {cfg.epochs})")
    return epochs


def _bench(served_dir: Path, out: Path) -> dict:
    """Every backend of the served model at batch 1 and 8, a few calls each (the full benchmark
    is `flannel bench model`, see benchmarks/README.md)."""
    from flannel.benchmarks.model import bench_model, format_summary, plot_backends
    from flannel.benchmarks.output import write_outputs

    result = bench_model([served_dir], batches=(1, 8), warmup=1, repeats=3, preprocess_repeats=2)
    write_outputs(result, format_summary(result), out, "model", (plot_backends,))
    return result


def _archived_backend(mar: Path) -> str:
    import zipfile

    import yaml

    with zipfile.ZipFile(mar) as zf:
        return yaml.safe_load(zf.read("model-config.yaml"))["handler"]["backend"]


def _train_ensemble(train_cfg, cfg: DemoConfig, work: Path, stages: Stages,
                    version: dict) -> tuple[Path, Path, float]:
    """Train the learners (reused where the data and recipe are unchanged), fuse them; returns
    (ensemble folder, best learner, test macro-F1 of the fused model)."""
    from flannel.train.compare import compare_markdown
    from flannel.train.ensemble import EnsembleConfig, train_ensemble, train_learners
    from flannel.train.ensemble_report import report_markdown

    learners = work / "learners"
    manifest = Path(train_cfg.manifest)
    with stages.timed("learners"):
        key = fingerprint({"archs": cfg.archs, "epochs": cfg.epochs, "budget": cfg.train_budget_s,
                           "input_size": cfg.input_size, "seed": cfg.seed, **version}, [manifest])
        if stages.unchanged("learners", key=key,
                            outputs=[learners / a / "best.pt" for a in cfg.archs]):
            train_cfg.epochs = stages.recorded("learners")["epochs"]
        else:
            if learners.exists():  # another recipe or other data: nothing there may be reused
                shutil.rmtree(learners)
            train_cfg.epochs = _sized_epochs(cfg, cfg.archs, manifest)
        comparison = train_learners(cfg.archs, train_cfg, learners)
        stages.done("learners", key, epochs=train_cfg.epochs)
    print(compare_markdown(comparison))
    usable = [r for r in comparison["rows"] if not r.get("collapsed_at_epoch")]
    if len(usable) < 2:
        raise RuntimeError(f"only {len(usable)} learner(s) trained without collapsing: "
                           "no ensemble to fuse")
    ensemble_dir = work / "ensemble"
    with stages.timed("fusion"):
        runs = [learners / a for a in cfg.archs]
        key = fingerprint({"k": len(usable), "seed": cfg.seed, **version},
                          [r / "best.pt" for r in runs])
        report_path = ensemble_dir / "ensemble_report.json"
        if stages.unchanged("fusion", key=key, outputs=[report_path, ensemble_dir / "fusion.pt"]):
            report = json.loads(report_path.read_text())
        else:
            report = train_ensemble(EnsembleConfig(
                out=str(ensemble_dir), runs=[str(r) for r in runs], k=len(usable),
                seed=cfg.seed, model_name="ensemble"))
            stages.done("fusion", key)
    print(report_markdown(report))
    split = "test" if "test" in report["methods"] else "val"
    fused = next(r for r in report["methods"][split] if r["kind"] == "flannel")
    return ensemble_dir, learners / usable[0]["arch"], fused["macro_f1"]


def register(parser: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    parser.add_argument("--workdir", default=d.workdir)
    parser.add_argument("--model-store", default=d.model_store)
    parser.add_argument("--config", default=d.config, help="TorchServe config.properties")
    parser.add_argument("--model", choices=MODELS, default=d.model,
                        help="serve FLANNEL's ensemble of --archs, or the single learner --arch")
    parser.add_argument("--arch", default=d.arch, help="the learner of --model learner")
    parser.add_argument("--archs", type=lambda t: [a.strip() for a in t.split(",") if a.strip()],
                        default=d.archs, help="the ensemble's learners, comma-separated")
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--input-size", type=int, default=d.input_size)
    parser.add_argument("--n-per-class", type=int, default=d.n_per_class)
    parser.add_argument("--train-budget", type=float, default=d.train_budget_s,
                        help="seconds of learner training the epochs are sized to by this CPU's "
                             "measured speed (0: always --epochs)")
    parser.add_argument("--fresh", action="store_true",
                        help="rebuild every stage, even those whose inputs are unchanged")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--keep-serving", action="store_true",
                        help="leave TorchServe running at the end")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = DemoConfig(workdir=args.workdir, model_store=args.model_store, config=args.config,
                     model=args.model, arch=args.arch, archs=args.archs, epochs=args.epochs,
                     input_size=args.input_size,
                     n_per_class=args.n_per_class, seed=args.seed, keep_serving=args.keep_serving,
                     train_budget_s=args.train_budget, fresh=args.fresh)
    return 0 if run_demo(cfg)["ok"] else 1
