"""Datasets and the preprocessing spec of a training run, built from its config and manifest.

    python -c "from flannel.train.data_setup import build_datasets"

Every file of every split is decoded once before training starts: an unreadable file is reported
by path here, never halfway through an epoch, and the decoded, resized images stay cached.
"""
from __future__ import annotations

import dataclasses

import torch
from tqdm import tqdm

from flannel.data.records import read_manifest
from flannel.data.torch_dataset import XrayDataset, check_readable
from flannel.preprocess import PreprocessSpec, center_crop
from flannel.train.augment import get_transform
from flannel.train.config import TrainConfig

# Training images are cached compactly (see flannel.data.torch_dataset); evaluation sets in float32.
TRAIN_CACHE_DTYPE = torch.float16


def base_spec(cfg: TrainConfig) -> PreprocessSpec:
    """The run's spec before dataset statistics: input size and intensity harmonisation."""
    return PreprocessSpec.for_input_size(cfg.input_size, intensity=cfg.intensity)


def dataset_stats(dataset: XrayDataset) -> tuple[float, float]:
    """Mean and std of the centre-cropped, resized training images (grayscale, in [0, 1])."""
    total = total_sq = count = 0.0
    for i in tqdm(range(len(dataset)), desc="normalisation statistics", unit="img", leave=False,
                  disable=None):
        t = center_crop(dataset.resized(i).double(), dataset.spec.crop)
        total += float(t.sum())
        total_sq += float((t * t).sum())
        count += t.numel()
    mean = total / count
    return mean, max(1e-6, (total_sq / count - mean * mean)) ** 0.5


def build_datasets(cfg: TrainConfig, class_names: list[str]):
    """Train/val/test datasets over the manifest and the spec that normalises them.

    Returns:
        ``(train, val, test, spec)``; with ``normalization="dataset"`` the spec's mean and std are
        the training split's own (replicated over the channels), recorded in the spec.

    Raises:
        ValueError: an empty train or val split, or files that cannot be decoded (all listed).
    """
    rows = read_manifest(cfg.manifest)
    by_split = {s: [r for r in rows if r.split == s] for s in ("train", "val", "test")}
    if not by_split["train"] or not by_split["val"]:
        raise ValueError(f"{cfg.manifest}: the train and val splits must not be empty")
    spec = base_spec(cfg)
    train = XrayDataset(by_split["train"], class_names, spec, transform=get_transform(cfg.augment),
                        cache_dtype=TRAIN_CACHE_DTYPE)
    val = XrayDataset(by_split["val"], class_names, spec)
    test = XrayDataset(by_split["test"], class_names, spec)
    bad = [p for ds in (train, val, test) for p in check_readable(ds)]
    if bad:
        listing = "\n".join(f"  {path}: {reason}" for path, reason in bad)
        raise ValueError(f"{len(bad)} file(s) in {cfg.manifest} cannot be decoded:\n{listing}")
    if cfg.normalization == "dataset":
        mean, std = dataset_stats(train)
        spec = dataclasses.replace(spec, mean=(mean,) * spec.channels, std=(std,) * spec.channels)
        for ds in (train, val, test):
            ds.spec = spec  # the cache holds resized images, which do not depend on mean/std
    return train, val, test, spec


def to_device(x: torch.Tensor, device: str, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x
