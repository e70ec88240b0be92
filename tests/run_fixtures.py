"""A tiny run folder as `flannel train` writes it, for the export and serving tests.

Random weights, 64x64 toy images, the 3-class scheme: ``best.pt``, ``config.json`` (with the
split manifest path and the scheme) and ``report.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from flannel.checkpoint import Checkpoint, save_checkpoint
from flannel.labels import get_scheme
from flannel.preprocess import PreprocessSpec
from flannel.registry import build_model
from toy_data import make_toy_dataset

TINY_SCHEME = "3class"
# 2 val images per class -> 6 in all: batch 3 is filled from real images, batch 8 has to cycle.
TINY_SPLITS = {"train": 2, "val": 2, "test": 1}


def make_tiny_run(tmp_path: Path, arch: str = "resnet18", crop: int = 64, seed: int = 0) -> Path:
    """Write a run folder with a random-weights checkpoint under ``tmp_path``.

    Args:
        tmp_path: parent folder; the run goes to ``tmp_path/run-<arch>``, images to ``data/``.
        arch: registry architecture.
        crop: model input side; the spec resizes to the usual 8:7 larger square first.
        seed: seeds the weights and the images.

    Returns:
        The run folder.
    """
    tmp_path = Path(tmp_path)
    manifest = make_toy_dataset(tmp_path / "data", scheme=TINY_SCHEME, per_class=TINY_SPLITS,
                                size=64, seed=seed)
    classes = list(get_scheme(TINY_SCHEME).classes)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model(arch, len(classes)).eval()
    run_dir = tmp_path / f"run-{arch}"
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"arch": arch, "scheme": TINY_SCHEME, "manifest": str(manifest), "seed": seed,
              "epochs": 0, "weights": None}
    ckpt = Checkpoint(arch=arch, class_names=classes,
                      preprocess=PreprocessSpec.for_input_size(crop),
                      state_dict=model.state_dict(), config=config, metrics={}, epoch=0)
    save_checkpoint(run_dir / "best.pt", ckpt)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (run_dir / "report.json").write_text(json.dumps({"arch": arch, "metrics": {}}, indent=2)
                                         + "\n")
    return run_dir
