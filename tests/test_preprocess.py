"""The preprocessing spec: JSON round trip, exact transform values, one path for bytes and files."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from flannel.preprocess import PreprocessSpec, center_crop, load_tensor, preprocess_batch, to_tensor


def test_spec_round_trips_through_json(tmp_path):
    spec = PreprocessSpec(resize=80, crop=64, mean=(0.5,) * 3, std=(0.25,) * 3)
    spec.save(tmp_path / "p.json")
    assert PreprocessSpec.load(tmp_path / "p.json") == spec
    assert PreprocessSpec.from_json(spec.to_json()).to_dict() == spec.to_dict()


def test_spec_rejects_inconsistent_values():
    with pytest.raises(ValueError, match="larger than resize"):
        PreprocessSpec(resize=64, crop=80)
    with pytest.raises(ValueError, match="unknown preprocessing spec keys"):
        PreprocessSpec.from_dict({"resize": 64, "crop": 64, "colour": "rgb"})


def test_for_input_size_keeps_the_256_to_224_ratio():
    assert PreprocessSpec.for_input_size(224).resize == 256
    assert PreprocessSpec.for_input_size(112).resize == 128


def test_constant_image_normalises_to_known_value():
    spec = PreprocessSpec(resize=40, crop=32, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    t = to_tensor(np.full((50, 70), 0.75, np.float32), spec)
    assert t.shape == (3, 32, 32)
    assert torch.allclose(t[0], torch.full((32, 32), 0.5))
    assert torch.allclose(t[1], torch.full((32, 32), 2.0))
    assert torch.allclose(t[2], torch.full((32, 32), 0.75))


def test_center_crop_takes_the_middle():
    t = torch.arange(36.0).view(1, 6, 6)
    assert center_crop(t, 2).flatten().tolist() == [14.0, 15.0, 20.0, 21.0]


def test_bytes_and_path_give_identical_tensors(tmp_path):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (90, 70), dtype=np.uint8))
    path = tmp_path / "x.png"
    img.save(path)
    spec = PreprocessSpec(resize=72, crop=64)
    from_path = load_tensor(path, spec)
    from_bytes = load_tensor(path.read_bytes(), spec)
    assert torch.equal(from_path, from_bytes)
    from flannel.decode import decode_image
    batch = preprocess_batch([decode_image(path.read_bytes())] * 2, spec)
    assert torch.equal(batch[1], from_path)


def test_grayscale_and_rgb_copies_of_an_image_match(tmp_path):
    rng = np.random.default_rng(1)
    gray = Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8))
    buf_l, buf_rgb = io.BytesIO(), io.BytesIO()
    gray.save(buf_l, "PNG")
    gray.convert("RGB").save(buf_rgb, "PNG")
    spec = PreprocessSpec(resize=64, crop=64)
    assert torch.equal(load_tensor(buf_l.getvalue(), spec), load_tensor(buf_rgb.getvalue(), spec))


# A spec exactly as version-1 code wrote it into checkpoints and archives.
VERSION_1_JSON = {"resize": 72, "crop": 64, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                  "channels": 3, "interpolation": "bilinear", "max_pixels": 36000000, "version": 1}


def low_contrast_png() -> bytes:
    """An 8-bit PNG using only grey levels 100..150."""
    rng = np.random.default_rng(2)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(100, 151, (80, 80), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_new_specs_default_to_the_percentile_policy_without_equalisation():
    spec = PreprocessSpec.for_input_size(112, mean=(0.5,) * 3, std=(0.25,) * 3,
                                         intensity="equalize")
    assert (spec.version, spec.resize, spec.mean) == (2, 128, (0.5,) * 3)
    assert spec.intensity == "equalize" and spec.intensity_range == "percentile"
    default = PreprocessSpec()
    assert (default.intensity_range, default.intensity) == ("percentile", "none")
    assert PreprocessSpec.from_json(spec.to_json()) == spec


def test_version_1_spec_loads_with_its_old_behaviour():
    spec = PreprocessSpec.from_dict(VERSION_1_JSON)
    assert (spec.version, spec.intensity_range, spec.intensity) == (1, "as_decoded", "none")
    assert spec.to_dict() == VERSION_1_JSON  # re-saved exactly as version-1 code wrote it
    data = low_contrast_png()
    stored = np.asarray(Image.open(io.BytesIO(data)), np.float32) / 255
    resized = torch.nn.functional.interpolate(torch.from_numpy(stored)[None, None], size=(72, 72),
                                              mode="bilinear", antialias=True)[0, 0]
    old_tensor = load_tensor(data, spec)  # version 1: stored levels / 255, resized, normalised
    assert torch.allclose(old_tensor[0], (center_crop(resized, 64) - 0.5) / 0.25, atol=1e-5)
    assert old_tensor.max() < (150 / 255 - 0.5) / 0.25 + 1e-4  # no stretch to the full range
    new_tensor = load_tensor(data, PreprocessSpec.from_dict({**VERSION_1_JSON, "version": 2}))
    assert new_tensor.max() > (0.9 - 0.5) / 0.25  # version 2 stretches levels 100..150


def test_version_1_spec_refuses_the_new_options_and_unknown_versions_are_refused():
    with pytest.raises(ValueError, match="version-1 specs have no intensity option"):
        PreprocessSpec.from_dict({**VERSION_1_JSON, "intensity": "equalize"})
    with pytest.raises(ValueError, match="version-1 specs have no intensity_range option"):
        PreprocessSpec(version=1, intensity_range="percentile")
    with pytest.raises(ValueError, match="version 3"):
        PreprocessSpec(version=3)
    with pytest.raises(ValueError, match="intensity must be one of"):
        PreprocessSpec(intensity="clahe")
