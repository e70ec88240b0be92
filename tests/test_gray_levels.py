"""Decoded images as grey levels and a table of their values, and the intensity policy computed
once per level: the same float image and the same model input, bit for bit, as the per-pixel path.

    .venv/bin/pytest tests/test_gray_levels.py -q
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from bad_inputs import corpus
from flannel.decode import GrayImage, count_levels, decode_gray, dicom_unit_values
from flannel.preprocess import (PreprocessSpec, counted_percentiles, harmonize_intensity,
                                tail_percentiles, to_tensor)
from flannel.samples import real_chest_dicom
from test_decode import dicom_bytes, ramp

SPECS = {"version 1": PreprocessSpec(version=1),
         "percentile": PreprocessSpec(),
         "percentile + equalize": PreprocessSpec(intensity="equalize")}


def per_pixel_decode(data: bytes) -> np.ndarray:
    """Each format's float image computed over every pixel, as the decoder once did."""
    import pydicom

    if data[128:132] == b"DICM":
        ds = pydicom.dcmread(io.BytesIO(data))
        return dicom_unit_values(ds.pixel_array, ds)
    im = Image.open(io.BytesIO(data))
    if im.mode.startswith("I;16"):
        return np.asarray(im, dtype=np.float32) / 65535.0
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im.convert("RGBA"))
    return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def answered_files() -> dict[str, bytes]:
    files = {c.name: c.body for c in corpus(real_chest_dicom()) if c.status == 200}
    stored = np.round(300 + 3200 * ramp(96, 4095) / 4095).astype(np.uint16)
    files["dicom rescale + window"] = dicom_bytes(stored, RescaleSlope=2, RescaleIntercept=-1024,
                                                  WindowCenter=2800, WindowWidth=7000)
    files["dicom monochrome1"] = dicom_bytes(stored, photometric="MONOCHROME1")
    files["dicom wide window"] = dicom_bytes(stored, WindowCenter=40, WindowWidth=400)
    return files


FILES = answered_files()


def signed_dicom() -> bytes:
    """A signed 16-bit DICOM whose values span negative and positive numbers."""
    import pydicom

    values = (ramp(64, 4000).astype(np.int32) - 2000).astype(np.int16)
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(ramp(64))))
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 1, 16, 15
    ds.PixelData = values.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


@pytest.mark.parametrize("name", [*FILES, "dicom signed"])
def test_levels_give_the_per_pixel_image_and_model_input(name):
    data = signed_dicom() if name == "dicom signed" else FILES[name]
    gray, _ = decode_gray(data)
    reference = per_pixel_decode(data)
    assert gray.levels is not None, "integer images are held as levels"
    assert np.array_equal(gray.to_array(), reference)
    for spec in SPECS.values():
        assert torch.equal(harmonize_intensity(gray, spec), harmonize_intensity(reference, spec))
        assert torch.equal(to_tensor(gray, spec), to_tensor(reference, spec))


def test_signed_dicom_keeps_its_order():
    image = decode_gray(signed_dicom())[0].to_array()
    assert image[0, 0] == 0.0 and image[0, -1] == 1.0
    assert np.all(np.diff(image[0]) >= 0)


@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("seed", range(6))
def test_random_level_images_match_the_per_pixel_policy(spec_name, seed):
    # Few, many, tied and absent levels; small images (np.percentile's path) and large ones.
    rng = np.random.default_rng(seed)
    side = [32, 40, 300, 257, 512, 96][seed]
    dtype = np.uint8 if seed % 2 else np.uint16
    top = int(rng.choice([1, 3, 255, 4095, 65535] if dtype == np.uint16 else [1, 3, 255]))
    levels = rng.integers(0, top + 1, size=(side, side)).astype(dtype)
    if seed == 4:  # one dark border level holding most pixels, as a collimated radiograph has
        levels[:, : side // 2] = 0
    table = np.sort(rng.random(max(top + 1, 2)).astype(np.float32))
    if seed == 5:  # a decreasing table (MONOCHROME1) with repeated values
        table = np.round(table[::-1] * 8) / 8
    gray = GrayImage(levels, table)
    reference = np.take(table, levels)
    assert np.array_equal(gray.to_array(), reference)
    spec = SPECS[spec_name]
    assert torch.equal(harmonize_intensity(gray, spec), harmonize_intensity(reference, spec))


def test_counted_percentiles_are_numpys():
    rng = np.random.default_rng(1)
    for n_levels in (1, 2, 7, 300):
        values = rng.random(n_levels).astype(np.float32)
        for total in (1024, 5000):
            counts = rng.multinomial(total, np.ones(n_levels) / n_levels)
            pixels = np.repeat(values, counts)
            got = counted_percentiles(values, counts, 0.5, 99.5)
            assert got == tail_percentiles(pixels, 0.5, 99.5)
            assert np.allclose(got, np.percentile(pixels, (0.5, 99.5)), rtol=0, atol=1e-7)


def test_counts_are_exact_beyond_float32_counting():
    # OpenCV counts in float32, exact only below 2**24 per bin; 5000 x 4000 pixels of one level
    # are 20M, counted in slices.
    levels = np.full((5000, 4000), 7, dtype=np.uint8)
    levels[0, 0] = 3
    counts = count_levels(levels, 256)
    assert counts[7] == 5000 * 4000 - 1 and counts[3] == 1 and counts.sum() == levels.size


def test_float_images_keep_the_array_path():
    arr = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    gray = GrayImage.of_array(arr)
    assert gray.levels is None and gray.to_array() is gray.table
    with pytest.raises(ValueError, match="no level counts"):
        _ = gray.counts
    assert torch.equal(harmonize_intensity(gray, SPECS["percentile"]),
                       harmonize_intensity(arr, SPECS["percentile"]))


def test_levels_must_be_small_unsigned_integers():
    with pytest.raises(ValueError, match="uint8 or uint16"):
        GrayImage(np.zeros((4, 4), dtype=np.int32), np.zeros(1, dtype=np.float32))
