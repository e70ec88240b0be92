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
