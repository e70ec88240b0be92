"""Speed subjects that need no training: an ensemble preset with seeded random weights.

Training the paper ensemble (densenet161, inception_v3, resnet152, resnext101_32x8d, vgg19_bn)
takes hours on a small CPU, yet its cost per image depends on its shapes, not its weights. This
module writes what training would (one run folder per learner, a fitted fusion over them, on a
small synthetic split), then exports it the usual way, so `flannel bench model` measures it with
the same code as a trained one:

    flannel bench model --preset paper --batches 1,8 --repeats 3

Accuracy figures of such a subject mean nothing and its gates judge random weights: only its
times, memory and FLOPs are figures.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from flannel.checkpoint import Checkpoint, save_checkpoint
from flannel.labels import get_scheme
from flannel.preprocess import PreprocessSpec
from flannel.registry import build_model, calibrate_batchnorm, get_arch

log = logging.getLogger(__name__)
SCHEME = "3class"


def write_untrained_run(run_dir: str | Path, arch: str, manifest: str | Path, *,
                        scheme: str = SCHEME, crop: int | None = None, seed: int = 0,
                        val_macro_f1: float | None = None) -> Path:
    """A run folder as `flannel train` writes it (``best.pt``, ``config.json``,
    ``report.json``), with seeded random weights whose batch-norm statistics are set from random
    images (with the initial ones deep networks give one-hot answers).

    Args:
        run_dir: the folder to write.
        arch: registry architecture.
        manifest: the split manifest the run names (export's parity images come from it).
        scheme: label scheme.
        crop: model input side (default: the architecture's own).
        seed: seeds the weights.
        val_macro_f1: validation macro-F1 to record, as training would (ensemble selection
            reads it).
    """
    run_dir = Path(run_dir)
    crop = crop or get_arch(arch).input_size
    classes = list(get_scheme(scheme).classes)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model(arch, len(classes))
        calibrate_batchnorm(model, crop)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"arch": arch, "scheme": scheme, "manifest": str(manifest), "seed": seed,
              "epochs": 0, "weights": None}
    metrics = {} if val_macro_f1 is None else {"val": {
        "macro_f1": val_macro_f1, "accuracy": val_macro_f1, "loss": 1.0, "n": 0}}
    save_checkpoint(run_dir / "best.pt", Checkpoint(
        arch=arch, class_names=classes, preprocess=PreprocessSpec.for_input_size(crop),
        state_dict=model.state_dict(), config=config, epoch=0, metrics=metrics))
    (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (run_dir / "report.json").write_text(json.dumps({"arch": arch, "metrics": {}}, indent=2)
                                         + "\n")
    return run_dir


def untrained_ensemble(preset: str, out: str | Path, *, per_class: int = 5, seed: int = 0,
                       compiled: bool = True, crop: int | None = None) -> Path:
    """The ``preset`` ensemble with random weights under ``out/<preset>-untrained``, exported to
    ONNX (with its parity gate) and, when ``compiled``, to the compiled PyTorch package (bf16
    where the CPU has native bf16). An existing export there is reused. ``crop``: every
    learner's input side (at least its architecture's minimum; default: its native side).

    Returns:
        The ensemble folder, ready for `flannel bench model`.
    """
    from flannel.data.split import split_dataset
    from flannel.data.synth import SynthConfig, synthesize
    from flannel.train.ensemble import PRESETS, EnsembleConfig, train_ensemble

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    root = Path(out) / f"{preset}-untrained"
    folder = root / "ensemble"
    if not _has_export(folder):
        log.info("writing the %s ensemble with random weights under %s", preset, root)
        synthesize(root / "data", SynthConfig(n_per_class=per_class, size=384, seed=seed),
                   overwrite=True)
        split = split_dataset([root / "data"], root / "manifest.csv", fractions=(0.4, 0.4, 0.2),
                              seed=seed + 1)
        runs = [write_untrained_run(root / arch, arch, split["manifest"], seed=seed + i,
                                    crop=crop and max(crop, get_arch(arch).min_size),
                                    val_macro_f1=0.5)
                for i, arch in enumerate(PRESETS[preset])]
        train_ensemble(EnsembleConfig(out=str(folder), runs=[str(r) for r in runs],
                                      k=len(runs), gammas=[2.0], batch_size=2,
                                      model_name=f"{preset}-untrained"))
    return _exported(folder, compiled)


def untrained_learners(preset: str, out: str | Path, *, compiled: bool = True) -> list[Path]:
    """Each learner of ``untrained_ensemble(preset, out)`` exported on its own (ONNX with its
    parity gate, and the compiled package), so each is a `flannel bench model` subject."""
    from flannel.train.ensemble import PRESETS

    untrained_ensemble(preset, out, compiled=compiled)
    return [_exported(Path(out) / f"{preset}-untrained" / arch, compiled)
            for arch in PRESETS[preset]]


def _has_export(run_dir: Path) -> bool:
    from flannel.artifacts import ManifestError, export_dir_of, read_manifest

    try:
        read_manifest(export_dir_of(run_dir))
    except ManifestError:
        return False
    return True


def _exported(run_dir: Path, compiled: bool) -> Path:
    """``run_dir`` exported to ONNX with its parity gate and, when ``compiled``, to the compiled
    PyTorch package (bf16 where the CPU has native bf16); what the export holds is reused."""
    from flannel import hardware
    from flannel.artifacts import export_dir_of, read_manifest
    from flannel.export.compiled import TARGETS, export_compiled
    from flannel.export.onnx_export import export_onnx
    from flannel.export.parity import run_parity

    if not _has_export(run_dir):
        log.info("exporting %s to ONNX", run_dir)
        export_onnx(run_dir)
        run_parity(run_dir)
    precision = "bf16" if hardware.bf16_problem() is None else "fp32"
    if compiled and TARGETS[precision].artifact not in read_manifest(
            export_dir_of(run_dir))["artifacts"]:
        log.info("compiling %s (%s)", run_dir, precision)
        export_compiled(run_dir, precision)
    return run_dir
