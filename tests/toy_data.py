"""A separable toy dataset in the split-manifest format, for training tests.

Class k has a bright square in a class-specific place; any CNN separates it in a few steps.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from flannel.data.records import ManifestRow, write_manifest
from flannel.labels import get_scheme

# Where each class draws its square, as fractions of the image side (row, col).
_SPOTS = ((0.25, 0.25), (0.5, 0.5), (0.7, 0.7), (0.25, 0.7))


def make_toy_dataset(root: Path, scheme: str = "3class", per_class: dict | None = None,
                     size: int = 64, seed: int = 0) -> Path:
    """Write PNGs and a manifest; returns the manifest path.

    Args:
        root: output folder.
        scheme: label scheme whose classes are drawn.
        per_class: split -> images per class (default 16 train, 6 val, 6 test).
        size: image side in pixels.
        seed: noise seed.
    """
    per_class = per_class or {"train": 16, "val": 6, "test": 6}
    rng = np.random.default_rng(seed)
    classes = get_scheme(scheme).classes
    rows = []
    for k, label in enumerate(classes):
        for split, n in per_class.items():
            for i in range(n):
                img = rng.normal(0.3, 0.05, (size, size))
                r, c = (int(f * size) for f in _SPOTS[k])
                img[r - size // 8:r + size // 8, c - size // 8:c + size // 8] += 0.5
                path = root / label / f"{split}_{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)
                rows.append(ManifestRow(str(path), label, "toy", "toy", f"{label}-{split}-{i}",
                                        False, split))
    return write_manifest(rows, root / "manifest.csv")
