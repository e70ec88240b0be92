"""The spec's intensity step: one scale for every format, and optional histogram equalisation.

    .venv/bin/pytest tests/test_intensity.py -q
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from flannel.data.records import ManifestRow
from flannel.data.torch_dataset import XrayDataset
from flannel.preprocess import (PreprocessSpec, equalize_histogram, harmonize_intensity,
                                load_tensor, stretch_percentiles)
from flannel.samples import real_chest_dicom
from test_decode import dicom_bytes

# A viewer's 8-bit export rounds each pixel by up to half a grey level; the percentile stretch
# widens that by 1 / (high - low percentile), about 1.2 for these images. Two levels leave room
# for the percentiles themselves moving by a level.
FORMAT_TOLERANCE = 2 / 255
# Equalised copies differ where gamma merged neighbouring 8-bit levels of one copy: a few levels.
EXPOSURE_TOLERANCE = 0.03
# Without the percentile policy the same pairs differ by tenths of the range, far above both.
VISIBLE_DIFFERENCE = 0.05


def unit_spec(crop: int = 64, **kwargs) -> PreprocessSpec:
    """A small spec with mean 0 and std 1, so tensors read in [0, 1] grey levels."""
    return PreprocessSpec.for_input_size(crop, mean=(0.0,) * 3, std=(1.0,) * 3, **kwargs)


def phantom(n: int = 128, seed: int = 0) -> np.ndarray:
    """A chest-like (n, n) image in [0, 1]: bright body, two dark lungs, ribs, a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[-1:1:n * 1j, -1:1:n * 1j]
    body = np.exp(-((xx / 0.85) ** 2 + (yy / 0.95) ** 2) ** 4)
    lungs = sum(np.exp(-(((xx - c) / 0.3) ** 2 + (yy / 0.6) ** 2) ** 2) for c in (-0.4, 0.4))
    ribs = 0.08 * np.sin(18 * yy) ** 2 * body
    return np.clip(0.15 + 0.7 * body - 0.35 * lungs + ribs + 0.01 * rng.standard_normal((n, n)),
                   0.0, 1.0)


def png_bytes(gray: np.ndarray) -> bytes:
    """``gray`` in [0, 1] saved as an 8-bit grayscale PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.round(gray * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def viewer_png(stored: np.ndarray, slope: float, intercept: float, center: float, width: float,
               monochrome1: bool) -> bytes:
    """The 8-bit PNG a DICOM viewer exports: modality LUT, linear VOI window (PS3.3 C.11.2.1.2),
    MONOCHROME1 shown inverted."""
    value = stored.astype(np.float64) * slope + intercept
    shown = np.clip((value - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    return png_bytes(1.0 - shown if monochrome1 else shown)


def max_diff(a: bytes | str, b: bytes | str, spec: PreprocessSpec) -> float:
    return float((load_tensor(a, spec) - load_tensor(b, spec)).abs().max())


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_and_its_viewer_png_give_the_same_tensor(photometric):
    # 12-bit stored values 300..3500 -> modality -424..5976; the window (-700..6300) is wider than
    # the data, as viewers' presets often are, so the PNG does not span 0..255.
    image = phantom()
    shown = 1.0 - image if photometric == "MONOCHROME1" else image
    stored = np.round(300 + 3200 * shown).astype(np.uint16)
    window = {"RescaleSlope": 2, "RescaleIntercept": -1024, "WindowCenter": 2800,
              "WindowWidth": 7000}
    dcm = dicom_bytes(stored, photometric=photometric, bits=12, **window)
    png = viewer_png(stored, 2, -1024, 2800, 7000, photometric == "MONOCHROME1")
    assert max_diff(dcm, png, unit_spec()) <= FORMAT_TOLERANCE
    assert max_diff(dcm, png, unit_spec(version=1)) > VISIBLE_DIFFERENCE


def test_real_chest_dicom_and_its_viewer_png_give_the_same_tensor():
    path = real_chest_dicom()
    if path is None:
        pytest.skip("pydicom-data (RG1_UNCR.dcm) is not installed")
    import pydicom
    ds = pydicom.dcmread(path)
    png = viewer_png(ds.pixel_array, 1, 0, float(ds.WindowCenter), float(ds.WindowWidth),
                     monochrome1=True)
    assert max_diff(path, png, unit_spec(112)) <= FORMAT_TOLERANCE
    assert max_diff(path, png, unit_spec(112, version=1)) > VISIBLE_DIFFERENCE


def test_16_bit_png_of_12_bit_data_and_its_8_bit_copy_give_the_same_tensor():
    image = phantom()
    buf = io.BytesIO()  # a 12-bit detector's values in a 16-bit PNG: dark on the bit-depth scale
    Image.fromarray(np.round(image * 4095).astype(np.uint16)).save(buf, "PNG")
    wide, narrow = buf.getvalue(), png_bytes(image)
    assert max_diff(wide, narrow, unit_spec()) <= FORMAT_TOLERANCE
    assert max_diff(wide, narrow, unit_spec(version=1)) > VISIBLE_DIFFERENCE


def test_percentile_stretch_ignores_affine_scaling_and_small_markers():
    image = phantom().astype(np.float32)
    stretched = stretch_percentiles(image)
    assert stretched.min() == 0.0 and stretched.max() == 1.0
    np.testing.assert_allclose(stretch_percentiles(0.25 + 0.5 * image), stretched, atol=1e-5)
    marked = image.copy()
    marked[:3, :3] = 1.0  # a burned-in marker on 0.05% of pixels: below the 0.5% clipped
    np.testing.assert_allclose(stretch_percentiles(marked)[3:, 3:], stretched[3:, 3:], atol=0.02)


def test_flat_images_are_left_as_they_are():
    flat = np.full((40, 40), 0.3, np.float32)
    assert np.array_equal(stretch_percentiles(flat), flat)
    assert np.array_equal(equalize_histogram(flat), flat)


def test_equalization_maps_each_level_to_its_rank():
    image = np.array([[0.1, 0.3], [0.6, 0.9]], np.float32)
    np.testing.assert_allclose(equalize_histogram(image), [[0, 1 / 3], [2 / 3, 1]], atol=1e-7)
    twice = np.array([[0.2, 0.2], [0.2, 0.7]], np.float32)
    np.testing.assert_array_equal(equalize_histogram(twice), [[0, 0], [0, 1]])


def test_equalize_makes_differently_exposed_copies_nearly_identical():
    image = phantom()
    bright, dark = png_bytes(image ** 0.6), png_bytes(image ** 1.6)
    assert max_diff(bright, dark, unit_spec(intensity="equalize")) <= EXPOSURE_TOLERANCE
    assert max_diff(bright, dark, unit_spec()) > VISIBLE_DIFFERENCE


def test_version_1_spec_leaves_decoded_pixels_unchanged():
    image = 0.2 + 0.3 * phantom().astype(np.float32)
    out = harmonize_intensity(image, unit_spec(version=1))
    assert out.dtype == torch.float32 and torch.equal(out, torch.from_numpy(image))


def test_dataset_evaluation_item_is_load_tensor_with_equalize(tmp_path):
    png_path = tmp_path / "exposed.png"
    png_path.write_bytes(png_bytes(phantom(seed=1) ** 1.4))
    dcm_path = tmp_path / "scan.dcm"
    dcm_path.write_bytes(dicom_bytes(np.round(4000 * phantom(seed=2)).astype(np.uint16)))
    rows = [ManifestRow(str(p), "Normal", "No Finding", "test", p.stem, False, "val")
            for p in (png_path, dcm_path)]
    spec = PreprocessSpec.for_input_size(64, intensity="equalize")
    ds = XrayDataset(rows, ["Normal"], spec)
    for i, path in enumerate((png_path, dcm_path)):
        assert torch.equal(ds[i][0], load_tensor(path, spec))
        # The cached image is already equalised: a flat histogram has mean one half.
        assert ds.resized(i).mean() == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize("margin", [1.0, -0.4])
def test_tail_percentiles_equal_numpys_on_every_kind_of_image(monkeypatch, margin):
    """The fast selection gives np.percentile's values: random, quantised, constant, heavy-tailed,
    a thin bright stripe, small (numpy itself); and with a margin that puts the guesses inside the
    tails, so that the selection falls back to the whole image."""
    from flannel import preprocess
    from flannel.preprocess import tail_percentiles

    monkeypatch.setattr(preprocess, "TAIL_MARGIN", margin)
    rng = np.random.default_rng(0)
    stripe = np.zeros((1000, 1000), np.float32)
    stripe[:, :3] = 1.0  # 0.3% bright pixels
    cases = [rng.random((1200, 900), dtype=np.float32),
             (np.round(rng.random((1024, 1024)) * 255) / 255).astype(np.float32),
             np.zeros((600, 600), np.float32), (rng.random((300, 500)) ** 8).astype(np.float32),
             stripe, rng.random((20, 30), dtype=np.float32)]
    cases += [(rng.normal(size=tuple(rng.integers(64, 700, 2))) * rng.random()).astype(np.float32)
              for _ in range(10)]
    for image in cases:
        want = np.percentile(image, (0.5, 99.5))
        np.testing.assert_allclose(tail_percentiles(image, 0.5, 99.5), want, rtol=0, atol=1e-12)
