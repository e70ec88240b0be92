"""Harmonised-image shortcut check: does a model still work once source cues are removed?

    python -c "from flannel.train.shortcut import harmonise_image; open('h.png','wb').write(harmonise_image('x.dcm'))"

Every file is re-encoded the same way (border cropped, one size, stretched to the full 8-bit
grayscale range, PNG), so file format, size, colour mode, bit depth and burnt-in border marks no
longer differ between classes.
The harmonised image then goes through the normal evaluation transform. A model that learned the
radiograph keeps its accuracy; one that learned the source archive of each class (the shared
3-class set's metadata alone predicts its class at 85%) loses it.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from flannel.data.torch_dataset import XrayDataset
from flannel.decode import read_image
from flannel.preprocess import load_tensor
from flannel.train.evaluate import predict, split_metrics

# The default spec's resize side (256 -> crop 224): its evaluation transform never upsamples it.
HARMONISED_SIDE = 256
# Cropped from every side. The evaluation centre crop removes 1/16 per side (224 of 256); burnt-in
# markers (L/R letters, hospital tags, rulers) sit further in, within the outer tenth.
BORDER_FRACTION = 0.10


def crop_border(image: np.ndarray, border: float) -> np.ndarray:
    """Remove ``border`` of the height from top and bottom and of the width from left and right."""
    if not 0.0 <= border < 0.5:
        raise ValueError(f"border fraction must be in [0, 0.5), got {border}")
    h, w = image.shape
    dy, dx = int(round(h * border)), int(round(w * border))
    return image[dy:h - dy, dx:w - dx]


def stretch_to_unit_range(image: torch.Tensor) -> torch.Tensor:
    """Min-max stretch to [0, 1], so 12-bit data in a 16-bit container keeps 256 grey levels."""
    lo, hi = image.min(), image.max()
    return (image - lo) / (hi - lo) if hi > lo else torch.zeros_like(image)


def harmonise_image(path: str | Path, side: int = HARMONISED_SIDE,
                    border: float = BORDER_FRACTION) -> bytes:
    """One file as a border-cropped, ``side`` x ``side``, contrast-stretched 8-bit grayscale PNG.

    Args:
        path: PNG, JPEG or DICOM file.
        side: output side in pixels.
        border: fraction cropped from each side before resizing.

    Returns:
        The PNG bytes.

    Raises:
        InputError: the file cannot be decoded (the message names it).
    """
    cropped = torch.from_numpy(crop_border(read_image(path), border).copy())
    resized = F.interpolate(cropped[None, None], size=(side, side), mode="bilinear",
                            align_corners=False, antialias=True)[0, 0].clamp(0.0, 1.0)
    pixels = (stretch_to_unit_range(resized).numpy() * 255.0).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")  # uint8 (H, W) is mode "L"
    return buf.getvalue()


class HarmonisedDataset(Dataset):
    """An ``XrayDataset``'s items, each file harmonised before the evaluation transform."""

    def __init__(self, dataset: XrayDataset):
        self.dataset = dataset
        self.class_names = dataset.class_names

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        png = harmonise_image(self.dataset.rows[index].path)
        return load_tensor(png, self.dataset.spec), self.dataset.targets[index]


def harmonised_metrics(model: nn.Module, dataset: XrayDataset, class_names: list[str],
                       scheme: str, batch_size: int = 32) -> dict:
    """Metrics of ``model`` on the harmonised files of ``dataset``.

    Args:
        model: the trained model (evaluated in eval mode).
        dataset: one split; its rows give the files, its spec the evaluation transform.
        class_names: classes in output order.
        scheme: label scheme name.
        batch_size: evaluation batch size.

    Returns:
        ``flannel.train.evaluate.split_metrics`` of the harmonised split.
    """
    pred = predict(model, HarmonisedDataset(dataset), batch_size)
    return split_metrics(pred, class_names, scheme)


def shortcut_summary(main: dict, harmonised: dict) -> dict:
    """Accuracy and macro-F1 on the original and the harmonised files, and how much each drops.

    Args:
        main: split metrics on the original files.
        harmonised: split metrics on the harmonised files.

    Returns:
        ``{metric: {"main", "harmonised", "drop"}}`` for accuracy and macro_f1; a positive drop
        means the model did worse without the source cues.
    """
    return {key: {"main": main[key], "harmonised": harmonised[key],
                  "drop": main[key] - harmonised[key]}
            for key in ("accuracy", "macro_f1")}
