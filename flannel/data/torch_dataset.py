"""PyTorch datasets over a split manifest, built on the shared preprocessing spec.

    python -c "from flannel.data.torch_dataset import XrayDataset"

Evaluation items are exactly ``flannel.preprocess.load_tensor(path, spec)``, the tensor the export
parity gate and the TorchServe handler compute for the same file. Training items add the named
augmentation preset on top of the same decode and resize. The cache holds each image after the
deterministic intensity step and resize: it is computed once, not every epoch, and a 512 px
radiograph shrinks from 1 MB of float32 to the spec's resize (256 KB at 256 px). Training sets may
cache in float16 (half that again, per DDP rank; its 11-bit mantissa is finer than 8-bit pixels,
and augmentation noise dwarfs the rounding); evaluation sets keep float32 so that their items stay
bit-identical to the served tensor.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from flannel.data.records import ManifestRow
from flannel.decode import InputError, read_gray
from flannel.preprocess import (PreprocessSpec, crop_and_normalize, harmonize_intensity,
                                resize_square)

log = logging.getLogger(__name__)


class XrayDataset(Dataset):
    """Images of one split as (tensor, class index) pairs.

    Args:
        rows: manifest rows of one split.
        class_names: the label scheme's classes, in output order.
        spec: preprocessing spec.
        transform: None for the evaluation transform; otherwise a callable
            ``(resized_image, spec) -> tensor`` (training augmentation, see
            ``flannel.train.augment``).
        cache: keep resized images in memory (decoding and resizing dominate otherwise).
        cache_dtype: dtype of the cached images (float16 halves a training set's memory).
    """

    def __init__(self, rows: Sequence[ManifestRow], class_names: Sequence[str],
                 spec: PreprocessSpec, transform: Callable | None = None, cache: bool = True,
                 cache_dtype: torch.dtype = torch.float32):
        unknown = sorted({r.label for r in rows} - set(class_names))
        if unknown:
            raise ValueError(f"manifest labels {unknown} are not classes {list(class_names)}")
        self.rows = list(rows)
        self.class_names = list(class_names)
        self.spec = spec
        self.transform = transform
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None
        self.cache_dtype = cache_dtype
        self.targets = [self.class_names.index(r.label) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def resized(self, index: int) -> torch.Tensor:
        """Item ``index`` decoded and resized: (1, resize, resize) in [0, 1]."""
        if self._cache is not None and index in self._cache:
            return self._cache[index].float()
        image = read_gray(self.rows[index].path, max_pixels=self.spec.max_pixels)
        resized = resize_square(harmonize_intensity(image, self.spec), self.spec)
        if self._cache is not None:
            self._cache[index] = resized.to(self.cache_dtype)
            return self._cache[index].float()
        return resized

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        resized = self.resized(index)
        if self.transform is None:
            return crop_and_normalize(resized, self.spec), self.targets[index]
        return self.transform(resized, self.spec), self.targets[index]


def check_readable(dataset: XrayDataset) -> list[tuple[str, str]]:
    """Decode every item once; return (path, reason) for those that fail.

    Manifests are built from files that were listed, not decoded; a corrupt file must be reported
    by path before training starts rather than crash an epoch halfway.
    """
    problems = []
    for i, row in enumerate(dataset.rows):
        try:
            dataset.resized(i)
        except InputError as exc:
            problems.append((row.path, str(exc)))
    return problems
