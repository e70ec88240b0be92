"""Training augmentation presets, applied on top of the shared decode and resize.

    python -c "from flannel.train.augment import PRESETS; print(sorted(PRESETS))"

Each preset takes the resized (1, resize, resize) image of ``flannel.preprocess.resize_square``
(cached once per image by the dataset) and returns a (channels, crop, crop) training input.

Presets are named and recorded in the config (and so in the checkpoint):
- ``none``: the evaluation transform;
- ``base``: FLANNEL's base preprocessing: random crop instead of the centre crop, horizontal flip,
  Gaussian noise;
- ``strong``: the reports' stronger preset: adds rotation within +-30 degrees and brightness and
  contrast within +-20%;
- ``robust``: destroys source cues before ``base``: random gamma and contrast, border crop,
  letterboxing, down- and up-scaling and JPEG re-encoding, each with its own probability and the
  same for every class. Each class of the shared datasets comes from its own archive, and a model
  that can read the archive (compression, resolution, borders, exposure) learns it instead of the
  disease; see "Measured on real data" in the design notes.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

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


def _crop_flip_noise(t: torch.Tensor, size: int) -> torch.Tensor:
    t = _random_crop(t, size)
    if torch.rand(()) < 0.5:
        t = t.flip(-1)
    return (t + NOISE_STD * torch.randn_like(t)).clamp_(0.0, 1.0)


def base_transform(resized: torch.Tensor, spec: PreprocessSpec, strong: bool = False) -> torch.Tensor:
    t = resized
    if strong:
        t = TF.rotate(t, _uniform(ROTATION_DEG), interpolation=TF.InterpolationMode.BILINEAR)
        t = TF.adjust_brightness(t, 1.0 + _uniform(BRIGHTNESS_CONTRAST))
        t = TF.adjust_contrast(t, 1.0 + _uniform(BRIGHTNESS_CONTRAST))
    return normalize(_crop_flip_noise(t, spec.crop), spec).contiguous()


def strong_transform(resized: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    return base_transform(resized, spec, strong=True)


# --- robust preset ------------------------------------------------------------------------------
# Mid-grey 0.5 lands between 0.35 and 0.63 (gamma 1/1.5 .. 1.5, log-uniform): the spread between a
# flat and a strongly curved display LUT, with no class-specific direction.
GAMMA_MAX = 1.5
ROBUST_CONTRAST = 0.3  # +-30% around the image mean, wider than the strong preset's +-20%
# Up to 10% of the side off each edge: FLANNEL's 224-of-256 centre crop takes 6%; burned-in
# markers, text and collimator edges sit in the outer tenth.
BORDER_CROP_MAX = 0.10
# Black bar on each of two opposite sides, 3-15% of the side: letterboxed figures and screenshots.
LETTERBOX_RANGE = (0.03, 0.15)
# Down-scaling to 35-90% of the side and back: at 256 px, from a 90 px figure cut from a paper to
# an almost full-resolution archive copy.
RESCALE_RANGE = (0.35, 0.90)
# From heavily compressed web figures (30) to near-lossless archive JPEGs (95).
JPEG_QUALITY_RANGE = (30, 95)
# Probability of each step, in the order applied: exposure is set at acquisition and windowing,
# borders when a copy is prepared, resampling and compression when it is saved. About half the
# draws keep each trait of the source, so evaluation images stay inside the training distribution.
ROBUST_PROBABILITIES = {"gamma": 0.5, "contrast": 0.5, "border_crop": 0.3, "letterbox": 0.25,
                        "rescale": 0.5, "jpeg": 0.5}


def _resize(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    out = F.interpolate(t[None], size=(height, width), mode="bilinear", align_corners=False,
                        antialias=True)
    return out[0].clamp_(0.0, 1.0)


def _uniform_between(low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high))


def adjust_gamma(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """``t ** gamma`` on a [0, 1] image: gamma > 1 darkens mid-greys, < 1 brightens them."""
    return t.clamp(0.0, 1.0).pow(gamma)


def adjust_contrast(t: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale deviations from the image mean by ``factor``, clipped to [0, 1]."""
    return (t.mean() + factor * (t - t.mean())).clamp_(0.0, 1.0)


def crop_border(t: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Cut the given pixels off each edge of (1, H, W) and resize back to (H, W)."""
    h, w = t.shape[-2:]
    return _resize(t[..., top:h - bottom, left:w - right], h, w)


def letterbox(t: torch.Tensor, before: int, after: int, axis: int) -> torch.Tensor:
    """Squeeze (1, H, W) along ``axis`` (-1 width, -2 height) and fill with black bars.

    Args:
        t: (1, H, W) image.
        before: bar width (pixels) on the top or left.
        after: bar width on the bottom or right.
        axis: -1 for bars left and right, -2 for bars top and bottom.

    Returns:
        (1, H, W): the whole image, squeezed, between bars that are exactly 0.
    """
    h, w = t.shape[-2:]
    if axis == -1:
        return F.pad(_resize(t, h, w - before - after), (before, after, 0, 0))
    return F.pad(_resize(t, h - before - after, w), (0, 0, before, after))


def rescale_down_up(t: torch.Tensor, factor: float) -> torch.Tensor:
    """Resample (1, H, W) to ``factor`` of its size (antialiased) and back: the lost detail of a
    low-resolution source."""
    h, w = t.shape[-2:]
    small = _resize(t, max(1, round(h * factor)), max(1, round(w * factor)))
    return _resize(small, h, w)


def jpeg_reencode(t: torch.Tensor, quality: int) -> torch.Tensor:
    """Round (1, H, W) in [0, 1] to 8 bits, JPEG-encode at ``quality`` and decode again."""
    pixels = (t.clamp(0.0, 1.0) * 255.0).round_().to(torch.uint8)
    decoded = decode_jpeg(encode_jpeg(pixels, quality=quality), mode=ImageReadMode.GRAY)
    return decoded.to(torch.float32).div_(255.0)


def _random_gamma(t: torch.Tensor) -> torch.Tensor:
    log_max = math.log(GAMMA_MAX)
    return adjust_gamma(t, math.exp(_uniform_between(-log_max, log_max)))


def _random_contrast(t: torch.Tensor) -> torch.Tensor:
    return adjust_contrast(t, 1.0 + _uniform(ROBUST_CONTRAST))


def _random_border_crop(t: torch.Tensor) -> torch.Tensor:
    h, w = t.shape[-2:]
    top, bottom = (int(v) for v in torch.randint(0, int(h * BORDER_CROP_MAX) + 1, (2,)))
    left, right = (int(v) for v in torch.randint(0, int(w * BORDER_CROP_MAX) + 1, (2,)))
    return crop_border(t, top, bottom, left, right)


def _random_letterbox(t: torch.Tensor) -> torch.Tensor:
    axis = -1 if torch.rand(()) < 0.5 else -2
    side = t.shape[axis]
    low, high = (max(1, int(side * f)) for f in LETTERBOX_RANGE)
    before, after = (int(v) for v in torch.randint(low, high + 1, (2,)))
    return letterbox(t, before, after, axis)


def _random_rescale(t: torch.Tensor) -> torch.Tensor:
    return rescale_down_up(t, _uniform_between(*RESCALE_RANGE))


def _random_jpeg(t: torch.Tensor) -> torch.Tensor:
    low, high = JPEG_QUALITY_RANGE
    return jpeg_reencode(t, int(torch.randint(low, high + 1, ())))


ROBUST_STEPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gamma": _random_gamma, "contrast": _random_contrast, "border_crop": _random_border_crop,
    "letterbox": _random_letterbox, "rescale": _random_rescale, "jpeg": _random_jpeg}


def draw_robust_steps(probabilities: dict[str, float] = ROBUST_PROBABILITIES) -> list[str]:
    """Names of the robust steps that fire this draw, in the order they are applied.

    Args:
        probabilities: step name -> probability; the dict's order is the order applied.

    Returns:
        The names whose uniform draw fell below their probability.
    """
    draws = torch.rand(len(probabilities))
    return [name for (name, p), u in zip(probabilities.items(), draws) if u < p]


def robust_image(resized: torch.Tensor,
                 probabilities: dict[str, float] = ROBUST_PROBABILITIES) -> torch.Tensor:
    """The source-cue-destroying steps of the ``robust`` preset, before crop and normalisation.

    Args:
        resized: (1, R, R) cached image in [0, 1]; left untouched.
        probabilities: step name -> probability (see ``ROBUST_PROBABILITIES``).

    Returns:
        (1, R, R) float32 in [0, 1], still grayscale and not normalised.
    """
    t = resized
    for name in draw_robust_steps(probabilities):
        t = ROBUST_STEPS[name](t)
    return t


def robust_transform(resized: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """The ``robust`` preset: ``robust_image``, then base's random crop, flip and noise."""
    return normalize(_crop_flip_noise(robust_image(resized), spec.crop), spec).contiguous()


PRESETS: dict[str, Callable | None] = {"none": None, "base": base_transform,
                                       "strong": strong_transform, "robust": robust_transform}


def get_transform(name: str) -> Callable | None:
    """The training transform for a preset; None means the evaluation transform."""
    if name not in PRESETS:
        raise ValueError(f"unknown augmentation preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]
