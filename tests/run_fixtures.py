"""A tiny run folder as `flannel train` writes it, for the export and serving tests.

Random weights, 64x64 toy images, the 3-class scheme: ``best.pt``, ``config.json`` (with the
split manifest path and the scheme) and ``report.json``; ``add_tiny_external_evaluation`` gives
a run (or an ensemble folder) the external evaluation `flannel archive` requires.
"""
from __future__ import annotations

from pathlib import Path

from flannel.benchmarks.untrained import write_untrained_run
from toy_data import make_toy_dataset

TINY_SCHEME = "3class"
# 2 val images per class -> 6 in all: batch 3 is filled from real images, batch 8 has to cycle.
TINY_SPLITS = {"train": 2, "val": 2, "test": 1}


def make_tiny_run(tmp_path: Path, arch: str = "resnet18", crop: int = 64, seed: int = 0,
                  val_macro_f1: float | None = None) -> Path:
    """Write a run folder with a random-weights checkpoint under ``tmp_path``.

    Args:
        tmp_path: parent folder; the run goes to ``tmp_path/run-<arch>``, images to ``data/``.
        arch: registry architecture.
        crop: model input side; the spec resizes to the usual 8:7 larger square first.
        seed: seeds the weights and the images.
        val_macro_f1: validation macro-F1 recorded in the checkpoint, as training records it.

    Returns:
        The run folder.
    """
    tmp_path = Path(tmp_path)
    manifest = make_toy_dataset(tmp_path / "data", scheme=TINY_SCHEME, per_class=TINY_SPLITS,
                                size=64, seed=seed)
    return write_untrained_run(tmp_path / f"run-{arch}", arch, manifest, scheme=TINY_SCHEME,
                               crop=crop, seed=seed, val_macro_f1=val_macro_f1)


# The external evaluation of the tiny runs: 2 synthetic radiographs per class from another seed.
TINY_EXTERNAL = "toy-external"
TINY_EXTERNAL_PER_CLASS = 2
TINY_EXTERNAL_SEED = 100


def add_tiny_external_evaluation(run_dir: Path, name: str = TINY_EXTERNAL) -> dict:
    """Evaluate ``run_dir`` (a learner run or an ensemble folder) on a few synthetic images
    written beside it, as `flannel evaluate` does; the report lands in ``run_dir/external/name``.

    Returns:
        The external report.
    """
    from flannel.data.synth import SynthConfig, synthesize
    from flannel.train.external import evaluate_external

    data = Path(run_dir).parent / f"external-{Path(run_dir).name}"
    synthesize(data, SynthConfig(n_per_class=TINY_EXTERNAL_PER_CLASS, size=64,
                                 seed=TINY_EXTERNAL_SEED), overwrite=True)
    return evaluate_external(run_dir, [data], name=name)


# Three small learners on one toy split; the last crops 48 from 55 px, so the common input is the
# others' 73 px and its in-graph preprocessing must resize too.
TINY_ENSEMBLE = (("resnet18", 64, 0.70), ("squeezenet1_1", 64, 0.60), ("mobilenet_v3_small", 48, 0.65))


def make_tiny_ensemble(tmp_path: Path, members=TINY_ENSEMBLE, k: int = 3) -> Path:
    """Learner runs with recorded validation macro-F1 and a fitted ensemble folder over them."""
    from flannel.train.ensemble import EnsembleConfig, train_ensemble

    tmp_path = Path(tmp_path)
    runs = [make_tiny_run(tmp_path, arch=arch, crop=crop, seed=0, val_macro_f1=f1)
            for arch, crop, f1 in members]
    out = tmp_path / "ensemble"
    train_ensemble(EnsembleConfig(out=str(out), runs=[str(r) for r in runs], k=k,
                                  gammas=[0.0, 2.0], batch_size=4))
    return out


def make_archivable_run(root: Path, arch: str = "resnet18", crop: int = 64) -> Path:
    """A tiny run exported, parity-checked and externally evaluated: what `flannel archive`
    takes."""
    from flannel.export.onnx_export import export_onnx
    from flannel.export.parity import run_parity

    run = make_tiny_run(root, arch=arch, crop=crop)
    export_onnx(run)
    run_parity(run)
    add_tiny_external_evaluation(run)
    return run
