"""The preprocessing spec: the one source of truth for turning an image file into a model tensor.

    python -c "from flannel.preprocess import PreprocessSpec; print(PreprocessSpec().to_json())"

Training evaluation, export calibration and parity, and the TorchServe handler all call
``load_tensor`` / ``preprocess_batch`` with the spec stored in the checkpoint or the archive, so
they produce bit-identical tensors for the same file. The spec is plain JSON; it is never retyped.

Pipeline: decode to grayscale [0, 1] -> ``harmonize_intensity`` (the intensity policy) -> square
resize (``resize`` pixels, antialiased) -> centre crop ``crop`` (removes border marks, as FLANNEL
did) -> replicate to ``channels`` -> normalise.

Intensity policy (spec version 2). The decoder leaves each format on its own scale: PNG and JPEG
by bit depth, DICOM by the range of its modality-LUT and VOI output, MONOCHROME1 inverted. So the
same radiograph exported as an 8-bit PNG, a 16-bit PNG or kept as DICOM gives three contrasts, and
the format (that is, the source archive) becomes visible to the model. ``intensity_range:
"percentile"`` maps every decoded image, whatever its format, to [0, 1] by its own low and high
percentiles. Percentiles commute with any increasing affine map, so the DICOM decoder's min/max
scaling and a PNG's bit depth both drop out, and what remains is the radiograph's own histogram.
``intensity: "equalize"`` then optionally equalises that histogram (deterministic, global; not
CLAHE, which cost accuracy in the 4-class study). Version-1 specs (older checkpoints and archives)
keep their behaviour: pixels as decoded, no equalisation.
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

from flannel.decode import DEFAULT_MAX_PIXELS, GrayImage, decode_gray, read_gray

SPEC_VERSION = 2
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERPOLATIONS = ("bilinear", "bicubic", "area", "nearest")
# "as_decoded": the decoder's own [0, 1] scale (version 1); "percentile": see the module docstring.
INTENSITY_RANGES = ("as_decoded", "percentile")
INTENSITIES = ("none", "equalize")
# What a spec of each version means where it names no intensity fields. Version 1 predates them.
VERSION_DEFAULTS = {1: {"intensity_range": "as_decoded", "intensity": "none"},
                    2: {"intensity_range": "percentile", "intensity": "none"}}
# Fields that version-1 JSON never held; left out of a version-1 spec's JSON so it stays as written.
_V2_FIELDS = ("intensity_range", "intensity")
# Clip 0.5% of pixels at each end: burned-in labels, markers and collimator edges are small very
# bright or dark areas that would otherwise set the range. nnU-Net clips CT at the same 0.5 / 99.5
# percentiles. Changing them changes every tensor, so it needs a new spec version.
PERCENTILE_LOW = 0.5
PERCENTILE_HIGH = 99.5
# Grey levels histogram equalisation distinguishes (12 bits): every level of an 8-bit or 12-bit
# image keeps its own bin, so equalisation is exactly rank based; deeper images merge only levels
# less than 1/4096 of the range apart, far below a visible step.
EQUALIZE_BINS = 4096


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
        intensity_range: ``INTENSITY_RANGES``; None takes the version's default ("percentile" in
            version 2, "as_decoded" in version 1).
        intensity: ``INTENSITIES``; None takes the version's default ("none").
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3
    interpolation: str = "bilinear"
    max_pixels: int = DEFAULT_MAX_PIXELS
    version: int = SPEC_VERSION
    intensity_range: str | None = None
    intensity: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.crop > self.resize:
            raise ValueError(f"crop {self.crop} is larger than resize {self.resize}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean/std need {self.channels} values, got {self.mean} / {self.std}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}")
        self._resolve_intensity_fields()

    def _resolve_intensity_fields(self) -> None:
        if self.version not in VERSION_DEFAULTS:
            raise ValueError(f"preprocessing spec version {self.version} is not one of "
                             f"{sorted(VERSION_DEFAULTS)}")
        defaults = VERSION_DEFAULTS[self.version]
        for name, allowed in (("intensity_range", INTENSITY_RANGES), ("intensity", INTENSITIES)):
            value = defaults[name] if getattr(self, name) is None else getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
            if self.version == 1 and value != defaults[name]:
                raise ValueError(f"version-1 specs have no {name} option; use version "
                                 f"{SPEC_VERSION} for {name}={value!r}")
            object.__setattr__(self, name, value)

    @classmethod
    def for_input_size(cls, crop: int, **kwargs) -> "PreprocessSpec":
        """Spec with the usual 8:7 resize-to-crop ratio (256 -> 224) for a given input size."""
        return cls(resize=int(round(crop * 256 / 224)), crop=crop, **kwargs)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if self.version == 1:
            for name in _V2_FIELDS:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        """Spec from its JSON dict; version-1 dicts (no intensity fields) keep version-1 meaning."""
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


# Tail percentiles select among the pixels beyond a threshold guessed from every TAIL_STRIDE-th
# pixel, widened by TAIL_MARGIN percentage points; 16 keeps the guess's sample at 16K pixels for a
# 512 x 512 image and 260K for a 2048 x 2048 radiograph.
TAIL_STRIDE = 16
TAIL_MARGIN = 1.0


def _order_statistic_pair(flat: np.ndarray, index: int, upper: bool, guess: float) -> tuple:
    """The ``index``-th and ``index+1``-th smallest values of ``flat`` (0-based, clamped), found
    among the pixels on the near side of ``guess`` when they include both and are a small part
    of the image; else None (the caller partitions the whole image once instead)."""
    n = flat.size
    pair = (index, min(index + 1, n - 1))
    mask = flat >= guess if upper else flat <= guess
    count = int(np.count_nonzero(mask))
    if upper:
        offset = n - count
        if count == 0 or pair[0] < offset:
            return None
        ranks = tuple(k - offset for k in pair)
    else:
        if count <= pair[1]:
            return None
        ranks = pair
    if count > n // 4:  # a flat image: copying its "tail" would copy the image
        return None
    tail = flat[mask]
    del mask
    tail.partition(ranks)  # in place: the selection is already a copy
    return tail[ranks[0]], tail[ranks[1]]


def _whole_image_pair(flat: np.ndarray, index: int) -> tuple:
    pair = (index, min(index + 1, flat.size - 1))
    part = np.partition(flat, pair)
    return part[pair[0]], part[pair[1]]


def tail_percentiles(image: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """``np.percentile(image, (low, high))`` (its default linear method), for percentiles near
    the ends of the range, without partitioning the whole image.

    Each order statistic the linear method needs is selected among the pixels beyond a threshold
    read from a strided sample (a pixel below the k-th smallest value is below any threshold at
    or above it, so the statistic is exact whenever the tail holds it); when the guess falls
    short, the whole image is partitioned as numpy does. On a 2048 x 2048 radiograph this takes a
    few ms instead of tens.
    """
    flat = np.ascontiguousarray(image).ravel()
    n = flat.size
    if n < 4 * TAIL_STRIDE ** 2:
        return tuple(float(v) for v in np.percentile(flat, (low, high)))
    sample = flat[::TAIL_STRIDE]
    guesses = np.percentile(sample, (min(low + TAIL_MARGIN, 100.0),
                                     max(high - TAIL_MARGIN, 0.0)))
    out = []
    for q, guess, upper in ((low, guesses[0], False), (high, guesses[1], True)):
        virtual = (n - 1) * q / 100.0
        index = int(np.floor(virtual))
        pair = _order_statistic_pair(flat, index, upper, guess)
        if pair is None:
            pair = _whole_image_pair(flat, index)
        out.append(_lerp(*pair, virtual - index))
    return out[0], out[1]


def _lerp(a, b, fraction: float) -> float:
    """numpy's _lerp between two order statistics: from the nearer end, so the result is exact
    at both ends."""
    a, b = float(a), float(b)
    return b - (b - a) * (1 - fraction) if fraction >= 0.5 else a + (b - a) * fraction


def counted_percentiles(values: np.ndarray, counts: np.ndarray, low: float,
                        high: float) -> tuple[float, float]:
    """``tail_percentiles`` of an image given as distinct values and how many pixels hold each:
    the same two numbers, from the cumulative counts instead of the pixels.

    Args:
        values: float32 value of each level.
        counts: pixels at each level (same length; zero for absent levels).
    """
    n = int(counts.sum())
    if n < 4 * TAIL_STRIDE ** 2:  # tail_percentiles hands small images to np.percentile
        return tail_percentiles(np.repeat(values, counts), low, high)
    present = counts > 0
    order = np.argsort(values[present], kind="stable")
    sorted_values, cumulative = values[present][order], np.cumsum(counts[present][order])
    out = []
    for q in (low, high):
        virtual = (n - 1) * q / 100.0
        index = int(np.floor(virtual))
        # the k-th smallest pixel (0-based) holds the first value whose cumulative count
        # exceeds k
        a, b = (sorted_values[np.searchsorted(cumulative, k, side="right")]
                for k in (index, min(index + 1, n - 1)))
        out.append(_lerp(a, b, virtual - index))
    return out[0], out[1]


def stretch_percentiles(image: np.ndarray) -> np.ndarray:
    """Map ``image`` linearly so its PERCENTILE_LOW / _HIGH percentiles become 0 / 1, clipped.

    Args:
        image: (H, W) float32 grayscale.

    Returns:
        (H, W) float32 in [0, 1]. Where the percentiles coincide (a nearly uniform image) the
        min and max are used; a constant image is returned unchanged, it has no range to map.
    """
    return _stretch(image, *tail_percentiles(image, PERCENTILE_LOW, PERCENTILE_HIGH), image)


def _stretch(values: np.ndarray, lo: float, hi: float, seen: np.ndarray) -> np.ndarray:
    """``values`` mapped so ``lo`` / ``hi`` become 0 / 1, clipped; by the min and max of the
    values ``seen`` in the image where ``lo`` and ``hi`` coincide."""
    if hi <= lo:
        lo, hi = float(seen.min()), float(seen.max())
    if hi <= lo:
        return values
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def equalize_histogram(image: np.ndarray) -> np.ndarray:
    """Global histogram equalisation of a [0, 1] image over ``EQUALIZE_BINS`` grey levels.

    Each level maps to the fraction of pixels at or below it, rescaled so the darkest occupied
    level becomes 0 and the brightest 1. Only ranks matter, so any increasing change of exposure
    (gamma, window) gives the same output up to merged levels.

    Args:
        image: (H, W) float32 in [0, 1].

    Returns:
        (H, W) float32 in [0, 1]; a constant image is returned unchanged.
    """
    return _equalize(image, None)


def _equalize(values: np.ndarray, counts: np.ndarray | None) -> np.ndarray:
    """``equalize_histogram`` of the pixels ``values``, or of an image given as level values
    and the pixel count of each level (``counts``)."""
    levels = np.clip((values * EQUALIZE_BINS).astype(np.int64), 0, EQUALIZE_BINS - 1)
    if counts is None:
        histogram, occupied = np.bincount(levels.ravel(), minlength=EQUALIZE_BINS), levels
    else:
        present = counts > 0
        occupied = levels[present]
        histogram = np.bincount(occupied, weights=counts[present],
                                minlength=EQUALIZE_BINS).astype(np.int64)
    cdf = np.cumsum(histogram)
    darkest, total = cdf[occupied.min()], cdf[-1]
    if total == darkest:
        return values
    return ((cdf[levels] - darkest) / (total - darkest)).astype(np.float32)


def harmonize_table(gray: GrayImage, spec: PreprocessSpec) -> GrayImage:
    """The intensity step on a level image: computed once per level from the levels' histogram,
    the same values ``harmonize_intensity`` gives the full float image."""
    table = gray.table
    if spec.intensity_range == "percentile" or spec.intensity == "equalize":
        counts = gray.counts
    if spec.intensity_range == "percentile":
        lo, hi = counted_percentiles(table, counts, PERCENTILE_LOW, PERCENTILE_HIGH)
        table = _stretch(table, lo, hi, table[counts > 0])
    if spec.intensity == "equalize":
        table = _equalize(table, counts)
    return gray if table is gray.table else gray.with_table(table)


def harmonize_intensity(image: GrayImage | np.ndarray | torch.Tensor,
                        spec: PreprocessSpec) -> torch.Tensor:
    """The spec's intensity step on a decoded image: ``intensity_range``, then ``intensity``.

    Every path from a decoded image to a model input (``to_tensor``, and the training dataset's
    cached resize) goes through this one function. A ``GrayImage`` of levels is mapped through
    one table computed per level (``harmonize_table``); the result is the same.

    Args:
        image: (H, W) grayscale in [0, 1] from ``flannel.decode``.
        spec: preprocessing spec.

    Returns:
        (H, W) float32 tensor in [0, 1]; the input values unchanged for a version-1 spec.
    """
    if isinstance(image, GrayImage):
        if image.levels is not None:
            return torch.from_numpy(harmonize_table(image, spec).to_array())
        image = image.table
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {arr.shape}")
    if spec.intensity_range == "percentile":
        arr = stretch_percentiles(arr)
    if spec.intensity == "equalize":
        arr = equalize_histogram(arr)
    return torch.from_numpy(np.ascontiguousarray(arr))


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


def to_tensor(image: GrayImage | np.ndarray, spec: PreprocessSpec) -> torch.Tensor:
    """Evaluation transform: decoded (H, W) image -> (channels, crop, crop) model input."""
    return crop_and_normalize(resize_square(harmonize_intensity(image, spec), spec), spec)


def load_tensor(source: str | Path | bytes, spec: PreprocessSpec) -> torch.Tensor:
    """Decode a file path or raw bytes and apply the evaluation transform."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        image = decode_gray(bytes(source), max_pixels=spec.max_pixels)[0]
    else:
        image = read_gray(source, max_pixels=spec.max_pixels)
    return to_tensor(image, spec)


def preprocess_batch(images: Sequence[GrayImage | np.ndarray],
                     spec: PreprocessSpec) -> torch.Tensor:
    """Stack evaluation tensors of decoded images into one (N, channels, crop, crop) batch."""
    if not images:
        return torch.empty(0, spec.channels, spec.crop, spec.crop)
    return torch.stack([to_tensor(img, spec) for img in images])


# Fields every member of one served model must share: they run on the host, once per image, before
# the common input tensor exists.
HOST_FIELDS = ("version", "intensity_range", "intensity", "interpolation")


def input_spec_for(specs: Sequence[PreprocessSpec]) -> PreprocessSpec:
    """The host half of preprocessing shared by one or more learners: the served input.

    Every model kind takes the same input: decode -> the intensity policy -> a square resize to R,
    as one channel in [0, 1] (no crop, no normalisation). R is the largest ``resize`` of the
    learners, so no learner upsamples what another sees sharper. ``GraphPreprocess`` does the rest
    inside the graph, per learner.

    Args:
        specs: each learner's preprocessing spec.

    Returns:
        A spec with ``resize == crop == R``, one channel, mean 0 and std 1.

    Raises:
        ValueError: the learners disagree on a host step (``HOST_FIELDS``), naming it.
    """
    if not specs:
        raise ValueError("input_spec_for needs at least one preprocessing spec")
    for name in HOST_FIELDS:
        values = sorted({str(getattr(s, name)) for s in specs})
        if len(values) > 1:
            raise ValueError(f"the learners disagree on the host preprocessing step {name!r} "
                             f"({', '.join(values)}): one served input cannot feed them all")
    first, side = specs[0], max(s.resize for s in specs)
    return PreprocessSpec(resize=side, crop=side, mean=(0.0,), std=(1.0,), channels=1,
                          interpolation=first.interpolation,
                          max_pixels=min(s.max_pixels for s in specs), version=first.version,
                          intensity_range=first.intensity_range, intensity=first.intensity)


class GraphPreprocess(torch.nn.Module):
    """One learner's preprocessing inside the graph: the served input -> that learner's input.

    (N, 1, R, R) in [0, 1] -> resize to the learner's ``resize`` when it differs from R ->
    centre crop -> replicate channels -> normalise: the second half of ``to_tensor``, with the
    same operations, so a learner whose ``resize`` is R sees exactly its training-time tensor.
    """

    def __init__(self, spec: PreprocessSpec, input_side: int) -> None:
        super().__init__()
        if input_side < spec.resize:
            raise ValueError(f"input side {input_side} is smaller than the learner's resize "
                             f"{spec.resize}")
        self.spec, self.input_side = spec, int(input_side)
        shape = (1, spec.channels, 1, 1)
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(shape),
                             persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(shape),
                             persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec.resize != self.input_side:
            antialias = spec.interpolation in ("bilinear", "bicubic")
            align = False if antialias else None
            image = F.interpolate(image, size=(spec.resize, spec.resize), mode=spec.interpolation,
                                  align_corners=align, antialias=antialias).clamp(0.0, 1.0)
        image = center_crop(image, spec.crop)
        image = image.expand(-1, spec.channels, -1, -1)
        return (image - self.mean) / self.std
