"""The preprocessing spec: the one source of truth for turning an image file into a model tensor.

    python -c "from flannel.preprocess import PreprocessSpec; print(PreprocessSpec().to_json())"

Training evaluation, export calibration and parity, and the TorchServe handler all call
``load_tensor`` / ``preprocess_batch`` with the spec stored in the checkpoint or the archive, so
they produce bit-identical tensors for the same file. The spec is plain JSON; it is never retyped.

Pipeline: decode to grayscale [0, 1] -> square resize (``resize`` pixels, antialiased) -> centre
crop ``crop`` (removes border marks, as FLANNEL did) -> replicate to ``channels`` -> normalise.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from flannel.decode import DEFAULT_MAX_PIXELS, decode_image, read_image

SPEC_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERPOLATIONS = ("bilinear", "bicubic", "area", "nearest")


@dataclass(frozen=True)
class PreprocessSpec:
    """How a decoded grayscale image becomes a (channels, crop, crop) float tensor.

    Attributes:
        resize: side of the square the image is resized to before cropping.
        crop: side of the centre crop; this is the model's input size.
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel std divided by.
        channels: grayscale is replicated to this many channels (3 for ImageNet backbones).
        interpolation: torch interpolate mode used for the resize (antialiased where supported).
        max_pixels: decoder refuses larger images before decoding them.
        version: spec format version.
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3
    interpolation: str = "bilinear"
    max_pixels: int = DEFAULT_MAX_PIXELS
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.crop > self.resize:
            raise ValueError(f"crop {self.crop} is larger than resize {self.resize}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean/std need {self.channels} values, got {self.mean} / {self.std}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}")
        if self.version != SPEC_VERSION:
            raise ValueError(f"preprocessing spec version {self.version} is not {SPEC_VERSION}")

    @classmethod
    def for_input_size(cls, crop: int, **kwargs) -> "PreprocessSpec":
        """Spec with the usual 8:7 resize-to-crop ratio (256 -> 224) for a given input size."""
        return cls(resize=int(round(crop * 256 / 224)), crop=crop, **kwargs)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown preprocessing spec keys: {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PreprocessSpec":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "PreprocessSpec":
        return cls.from_json(Path(path).read_text())


def resize_square(image: np.ndarray | torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """Resize a (H, W) grayscale image in [0, 1] to (1, resize, resize) float32."""
    t = torch.as_tensor(image, dtype=torch.float32)
    if t.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {tuple(t.shape)}")
    antialias = spec.interpolation in ("bilinear", "bicubic")
    align = False if spec.interpolation in ("bilinear", "bicubic") else None
    out = F.interpolate(t[None, None], size=(spec.resize, spec.resize), mode=spec.interpolation,
                        align_corners=align, antialias=antialias)
    return out[0].clamp_(0.0, 1.0)


def center_crop(t: torch.Tensor, size: int) -> torch.Tensor:
    """Centre crop the last two dims of ``t`` to ``size`` x ``size``."""
    h, w = t.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return t[..., top:top + size, left:left + size]


def normalize(t: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """Replicate a (1, H, W) or (N, 1, H, W) image to ``spec.channels`` and normalise."""
    t = t.expand(*t.shape[:-3], spec.channels, *t.shape[-2:])
    shape = (spec.channels, 1, 1)
    mean = torch.tensor(spec.mean, dtype=t.dtype).view(shape)
    std = torch.tensor(spec.std, dtype=t.dtype).view(shape)
    return (t - mean) / std


def crop_and_normalize(resized: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """Second half of the evaluation transform: (1, resize, resize) -> (channels, crop, crop)."""
    return normalize(center_crop(resized, spec.crop), spec).contiguous()


def to_tensor(image: np.ndarray, spec: PreprocessSpec) -> torch.Tensor:
    """Evaluation transform: decoded (H, W) image -> (channels, crop, crop) model input."""
    return crop_and_normalize(resize_square(image, spec), spec)


def load_tensor(source: str | Path | bytes, spec: PreprocessSpec) -> torch.Tensor:
    """Decode a file path or raw bytes and apply the evaluation transform."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        image = decode_image(bytes(source), max_pixels=spec.max_pixels)
    else:
        image = read_image(source, max_pixels=spec.max_pixels)
    return to_tensor(image, spec)


def preprocess_batch(images: Sequence[np.ndarray], spec: PreprocessSpec) -> torch.Tensor:
    """Stack evaluation tensors of decoded images into one (N, channels, crop, crop) batch."""
    if not images:
        return torch.empty(0, spec.channels, spec.crop, spec.crop)
    return torch.stack([to_tensor(img, spec) for img in images])
