"""Training augmentation presets, applied on top of the shared decode and resize.

Each preset takes the resized (1, resize, resize) image of ``flannel.preprocess.resize_square``
(cached once per image by the dataset) and returns a (channels, crop, crop) training input.

Presets are named and recorded in the config (and so in the checkpoint):
- ``none``: the evaluation transform;
- ``base``: FLANNEL's base preprocessing: random crop instead of the centre crop, horizontal flip,
  Gaussian noise;
- ``strong``: the reports' stronger preset: adds rotation within +-30 degrees and brightness and
  contrast within +-20%.
"""
from __future__ import annotations

from typing import Callable

import torch
import torchvision.transforms.v2.functional as TF

from flannel.preprocess import PreprocessSpec, normalize

# Noise std on the [0, 1] image: about 2.5 grey levels of 8 bits, below what a radiologist sees.
NOISE_STD = 0.01
ROTATION_DEG = 30.0  # seed 000's stronger augmentation
BRIGHTNESS_CONTRAST = 0.2  # seed 000: +-20%


def _random_crop(t: torch.Tensor, size: int) -> torch.Tensor:
    h, w = t.shape[-2:]
    top = int(torch.randint(0, h - size + 1, ()).item())
    left = int(torch.randint(0, w - size + 1, ()).item())
    return t[..., top:top + size, left:left + size]


def _uniform(radius: float) -> float:
    return float(torch.empty(()).uniform_(-radius, radius))


def base_transform(resized: torch.Tensor, spec: PreprocessSpec, strong: bool = False) -> torch.Tensor:
    t = resized
    if strong:
        t = TF.rotate(t, _uniform(ROTATION_DEG), interpolation=TF.InterpolationMode.BILINEAR)
        t = TF.adjust_brightness(t, 1.0 + _uniform(BRIGHTNESS_CONTRAST))
        t = TF.adjust_contrast(t, 1.0 + _uniform(BRIGHTNESS_CONTRAST))
    t = _random_crop(t, spec.crop)
    if torch.rand(()) < 0.5:
        t = t.flip(-1)
    t = (t + NOISE_STD * torch.randn_like(t)).clamp_(0.0, 1.0)
    return normalize(t, spec).contiguous()


def strong_transform(resized: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    return base_transform(resized, spec, strong=True)


PRESETS: dict[str, Callable | None] = {"none": None, "base": base_transform,
                                       "strong": strong_transform}


def get_transform(name: str) -> Callable | None:
    """The training transform for a preset; None means the evaluation transform."""
    if name not in PRESETS:
        raise ValueError(f"unknown augmentation preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]

