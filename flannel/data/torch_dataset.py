"""PyTorch datasets over a split manifest, built on the shared preprocessing spec.

    python -c "from flannel.data.torch_dataset import XrayDataset"

Evaluation items are exactly ``flannel.preprocess.load_tensor(path, spec)``, the tensor the export
parity gate and the TorchServe handler compute for the same file. Training items add the named
augmentation preset on top of the same decode and resize.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from flannel.data.records import ManifestRow
from flannel.decode import InputError, read_image
from flannel.preprocess import PreprocessSpec, to_tensor

log = logging.getLogger(__name__)


class XrayDataset(Dataset):
    """Images of one split as (tensor, class index) pairs.

    Args:
        rows: manifest rows of one split.
        class_names: the label scheme's classes, in output order.
        spec: preprocessing spec.
        transform: None for the evaluation transform; otherwise a callable
            ``(decoded_image, spec) -> tensor`` (training augmentation).
        cache: keep decoded images in memory (small datasets; decoding dominates otherwise).
    """

    def __init__(self, rows: Sequence[ManifestRow], class_names: Sequence[str],
                 spec: PreprocessSpec, transform: Callable | None = None, cache: bool = True):
        unknown = sorted({r.label for r in rows} - set(class_names))
        if unknown:
            raise ValueError(f"manifest labels {unknown} are not classes {list(class_names)}")
        self.rows = list(rows)
        self.class_names = list(class_names)
        self.spec = spec
        self.transform = transform
        self._cache: dict[int, np.ndarray] | None = {} if cache else None
        self.targets = [self.class_names.index(r.label) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, index: int) -> np.ndarray:
        """The decoded grayscale image of item ``index``."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        image = read_image(self.rows[index].path, max_pixels=self.spec.max_pixels)
        if self._cache is not None:
            self._cache[index] = image
        return image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.image(index)
        tensor = to_tensor(image, self.spec) if self.transform is None else self.transform(image, self.spec)
        return tensor, self.targets[index]


def check_readable(dataset: XrayDataset) -> list[tuple[str, str]]:
    """Decode every item once; return (path, reason) for those that fail.

    Manifests are built from files that were listed, not decoded; a corrupt file must be reported
    by path before training starts rather than crash an epoch halfway.
    """
    problems = []
    for i, row in enumerate(dataset.rows):
        try:
            dataset.image(i)
        except InputError as exc:
            problems.append((row.path, str(exc)))
    return problems
