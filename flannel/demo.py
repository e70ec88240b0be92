"""The main job: the whole pipeline on the embedded synthetic data, ending with a served model.

    flannel demo                        # or: make demo; serves the FLANNEL ensemble
    flannel demo --model learner        # one learner (--arch) instead

synthetic data -> patient-level split -> train the lite preset's five learners (precision picked
from the CPU; each with its report, shortcut check, pixel baseline and Grad-CAM) -> FLANNEL's
fusion of them with its baselines -> external evaluation of the best learner on a second synthetic
"hospital" -> Grad-CAM of the real chest DICOM -> the ensemble as one ONNX graph + parity gate ->
int8 and compiled (bf16 on CPUs with native bf16, else fp32) backends, each behind its accuracy
gate -> a short benchmark of every backend (runs/demo/bench) -> .mar archive of the fastest
backend that passed -> TorchServe (config.properties) -> predictions with learner weights over
HTTP and gRPC for a few synthetic images and a real chest radiograph DICOM -> stop the server.
Outputs go under ``runs/demo/`` and ``model_store/``; existing files there are overwritten (the
learners are trained again), nothing else is deleted.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("flannel.demo")
MODELS = ("ensemble", "learner")


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
    epochs: int = 6
    input_size: int = 112
    n_per_class: int = 120
    image_size: int = 128
    # The external set: another seed and image size, as if from another hospital.
    external_per_class: int = 30
    external_image_size: int = 160
    seed: int = 0
    keep_serving: bool = False


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
    from flannel.samples import real_chest_dicom
    from flannel.train.config import TrainConfig
    from flannel.train.external import evaluate_external
    from flannel.train.gradcam import explain_images
    from flannel.train.loop import train_learner

    started = time.perf_counter()
    work = Path(cfg.workdir)
    _banner("1/10 synthetic chest X-rays")
    data = work / "data"
    synth = synthesize(data, SynthConfig(n_per_class=cfg.n_per_class, size=cfg.image_size,
                                         seed=cfg.seed), overwrite=True)
    print(f"{synth['files']} images in {data}: {synth['counts']}, formats {synth['formats']}")
    split = split_dataset([data], work / "manifest.csv", seed=cfg.seed + 1)
    print(f"split manifest {split['manifest']}: {split['counts']}")

    train_cfg = TrainConfig(manifest=split["manifest"], out=str(work / cfg.arch), arch=cfg.arch,
                            epochs=cfg.epochs, input_size=cfg.input_size, seed=cfg.seed)
    if cfg.model == "ensemble":
        _banner(f"2/10 train {len(cfg.archs)} learners, then FLANNEL's fusion")
        served_dir, learner_dir, figure = _train_ensemble(train_cfg, cfg, work)
    else:
        _banner(f"2/10 train {cfg.arch}")
        result = train_learner(train_cfg)
        print((result.run_dir / "report.md").read_text())
        served_dir = learner_dir = result.run_dir
        figure = result.report.get("test", result.report["val"])["macro_f1"]

    _banner(f"3/10 external evaluation of {learner_dir.name} (a second synthetic hospital)")
    external = work / "external"
    synthesize(external, SynthConfig(n_per_class=cfg.external_per_class,
                                     size=cfg.external_image_size, seed=cfg.seed + 100),
               overwrite=True)
    ext = evaluate_external(learner_dir, [external], name="synthetic-external")
    print((Path(ext["out_dir"]) / "report.md").read_text())

    _banner("4/10 Grad-CAM")
    dicom = real_chest_dicom()
    sample = [dicom] if dicom else _predict_samples(Path(split["manifest"]), count=1)[:1]
    for path in explain_images(learner_dir, sample, learner_dir / "explain"):
        print(f"wrote {path}")

    _banner(f"5/10 ONNX export and parity gate ({cfg.model})")
    export_onnx(served_dir)
    parity = run_parity(served_dir)
    print(format_table(parity))

    _banner("6/10 fast backends behind their gates (int8; compiled bf16 or fp32)")
    backends = fast_backends(served_dir)

    _banner("7/10 short benchmark of every backend (flannel bench model)")
    bench = _bench(served_dir, work / "bench")

    _banner("8/10 archive (backend auto: the fastest that passed its gate)")
    mar = build_archive(served_dir, cfg.model_store)
    print(f"wrote {mar} serving {_archived_backend(mar)}")

    _banner("9/10 TorchServe")
    info = start_server(cfg.config, model_store=cfg.model_store)
    print(info.describe())
    answers = {}
    try:
        _banner("10/10 predictions (TorchServe's HTTP and gRPC, Open Inference Protocol v2 "
                "REST and gRPC) and one explanation")
        client = Client(info, model=mar.stem)
        files = _predict_samples(Path(split["manifest"]), count=4)
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
    ok = all(r.ok for rs in answers.values() for r in rs)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; "
          f"served {cfg.model} {mar.stem}, test macro-F1 {figure:.3f}; "
          f"parity {'passed' if parity.passed else 'FAILED'}; "
          f"{sum(len(v) for v in answers.values())} answers, {'all OK' if ok else 'some failed'}")
    return {"served_dir": served_dir, "external": ext, "parity": parity, "answers": answers,
            "backends": backends, "bench": bench, "ok": ok}


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


def _train_ensemble(train_cfg, cfg: DemoConfig, work: Path) -> tuple[Path, Path, float]:
    """Train the learners afresh, fuse them; returns (ensemble folder, best learner, test
    macro-F1 of the fused model)."""
    from flannel.train.compare import compare_markdown
    from flannel.train.ensemble import EnsembleConfig, train_ensemble, train_learners
    from flannel.train.ensemble_report import report_markdown

    learners = work / "learners"
    if learners.exists():  # the demo trains every time; compare would reuse finished runs
        shutil.rmtree(learners)
    comparison = train_learners(cfg.archs, train_cfg, learners)
    print(compare_markdown(comparison))
    usable = [r for r in comparison["rows"] if not r.get("collapsed_at_epoch")]
    if len(usable) < 2:
        raise RuntimeError(f"only {len(usable)} learner(s) trained without collapsing: "
                           "no ensemble to fuse")
    ensemble_dir = work / "ensemble"
    report = train_ensemble(EnsembleConfig(
        out=str(ensemble_dir), runs=[str(learners / a) for a in cfg.archs], k=len(usable),
        seed=cfg.seed, model_name="ensemble"))
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
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--keep-serving", action="store_true",
                        help="leave TorchServe running at the end")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = DemoConfig(workdir=args.workdir, model_store=args.model_store, config=args.config,
                     model=args.model, arch=args.arch, archs=args.archs, epochs=args.epochs,
                     input_size=args.input_size,
                     n_per_class=args.n_per_class, seed=args.seed, keep_serving=args.keep_serving)
    return 0 if run_demo(cfg)["ok"] else 1
