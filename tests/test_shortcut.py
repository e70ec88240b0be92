"""Harmonised-image shortcut check: every file becomes the same kind of image, border marks are
gone, and a model that reads a border mark loses its accuracy."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from flannel.data.records import ManifestRow
from flannel.data.torch_dataset import XrayDataset
from flannel.decode import InputError, decode_image
from flannel.preprocess import PreprocessSpec
from flannel.train.evaluate import predict, split_metrics
from flannel.train.shortcut import (HARMONISED_SIDE, harmonise_image, harmonised_metrics,
                                    shortcut_summary)
from test_decode import dicom_bytes, ramp

CLASSES = ["COVID-19", "Normal"]  # names of the 3-class scheme, so "called Normal" is reported
SCHEME = "3class"
SPEC = PreprocessSpec.for_input_size(64)  # resize 73, centre crop 64: 4 of 73 pixels per side
SOURCE_SIDE = 200
# The mark sits between the evaluation crop (4/73 of 200 = 11 px) and the harmonising border
# (10% of 200 = 20 px): the model sees it on the original file, never after harmonising.
MARK = slice(12, 19)
# Input pixel the marker-reading model looks at: crop (2, 2) = resized (6, 6) = source ~17.
MARK_PIXEL = 2
# In the JPEG the mark fills exactly one 8x8 block, so its ringing stays inside the cropped border.
JPEG_MARK = slice(8, 16)


def _gray_with_mark(mark: bool, seed: int, where: slice = MARK) -> np.ndarray:
    """A dim left-to-right ramp (0.2 to 0.4) with a little noise, and the bright mark if asked.

    Smooth, so the spec's percentile intensity range keeps the corner dark in every image.
    """
    rng = np.random.default_rng(seed)
    ramp_ = np.tile(np.linspace(0.2, 0.4, SOURCE_SIDE), (SOURCE_SIDE, 1))
    image = ramp_ + rng.normal(0.0, 0.002, ramp_.shape)
    if mark:
        image[where, where] = 1.0
    return image


def _encode(array: np.ndarray, mode: str, fmt: str) -> bytes:
    if mode == "I;16":
        im = Image.fromarray((array * 65535).astype(np.uint16))
    else:
        im = Image.fromarray((array * 255).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def mixed_sources(tmp_path):
    """A 16-bit PNG, an RGB JPEG with a bright border mark and a small DICOM."""
    png16 = tmp_path / "a.png"
    png16.write_bytes(_encode(_gray_with_mark(False, 0), "I;16", "PNG"))
    jpeg = tmp_path / "b.jpg"
    jpeg.write_bytes(_encode(_gray_with_mark(True, 1, JPEG_MARK), "RGB", "JPEG"))
    dicom = tmp_path / "c.dcm"
    dicom.write_bytes(dicom_bytes(ramp(96)))
    return [png16, jpeg, dicom]


def test_harmonised_files_are_one_size_mode_and_format(mixed_sources):
    for path in mixed_sources:
        data = harmonise_image(path)
        with Image.open(io.BytesIO(data)) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "L", (HARMONISED_SIDE, HARMONISED_SIDE))


def test_harmonising_removes_the_border_mark(tmp_path):
    marked, unmarked = tmp_path / "marked.jpg", tmp_path / "unmarked.jpg"
    marked.write_bytes(_encode(_gray_with_mark(True, 1, JPEG_MARK), "RGB", "JPEG"))
    unmarked.write_bytes(_encode(_gray_with_mark(False, 1, JPEG_MARK), "RGB", "JPEG"))
    assert decode_image(marked.read_bytes())[JPEG_MARK, JPEG_MARK].mean() > 0.9  # it is there
    with_mark = decode_image(harmonise_image(marked))
    without = decode_image(harmonise_image(unmarked))
    np.testing.assert_array_equal(with_mark, without)
    # The radiograph itself is kept: the ramp still rises from left to right.
    assert with_mark[:, -10:].mean() - with_mark[:, :10].mean() > 0.8


def test_harmonising_names_an_unreadable_file(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(InputError, match="notes.png"):
        harmonise_image(bad)


class BorderMarkReader(nn.Module):
    """Calls an image COVID-19 when one pixel near the corner is bright, Normal otherwise."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixel = x[:, 0, MARK_PIXEL, MARK_PIXEL]  # normalised: about 2.2 marked, -1.7 unmarked
        covid = self.scale * (pixel - 0.5)
        return torch.stack([covid, -covid], dim=1)


@pytest.fixture
def marked_dataset(tmp_path):
    """COVID-19 files carry the mark, Normal files do not; 4 of each."""
    rows = []
    for i in range(8):
        label = CLASSES[i % 2]
        path = tmp_path / f"{label}-{i}.png"
        path.write_bytes(_encode(_gray_with_mark(label == "COVID-19", i), "L", "PNG"))
        rows.append(ManifestRow(str(path), label, "toy", "toy", f"p{i}", False, "test"))
    return XrayDataset(rows, CLASSES, SPEC)


def test_a_border_mark_reader_loses_its_accuracy(marked_dataset):
    model = BorderMarkReader()
    main = split_metrics(predict(model, marked_dataset), CLASSES, SCHEME)
    harmonised = harmonised_metrics(model, marked_dataset, CLASSES, SCHEME, batch_size=3)
    assert main["accuracy"] == 1.0
    assert harmonised["accuracy"] == 0.5  # everything is called Normal
    assert harmonised["called_normal"] == {"COVID-19": 4}
    summary = shortcut_summary(main, harmonised)
    assert summary["accuracy"] == {"main": 1.0, "harmonised": 0.5, "drop": 0.5}
    assert summary["macro_f1"]["drop"] > 0.6
