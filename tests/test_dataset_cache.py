"""A training set's compact cache halves its memory and stays within float16 rounding of the
float32 images that evaluation sets keep exactly."""
import torch

from flannel.data.records import read_manifest
from flannel.data.torch_dataset import XrayDataset
from flannel.preprocess import PreprocessSpec, load_tensor
from toy_data import make_toy_dataset


def test_float16_cache_is_compact_and_close_to_float32(tmp_path):
    rows = read_manifest(make_toy_dataset(tmp_path, per_class={"train": 2}), "train")
    spec = PreprocessSpec.for_input_size(64)
    names = ["COVID-19", "Normal", "Pneumonia"]
    exact = XrayDataset(rows, names, spec)
    compact = XrayDataset(rows, names, spec, cache_dtype=torch.float16)
    for i in range(len(rows)):
        a, b = exact.resized(i), compact.resized(i)
        assert b.dtype == torch.float32 and torch.allclose(a, b, atol=2 ** -11)
        assert compact._cache[i].dtype == torch.float16
        assert compact._cache[i].nbytes * 2 == exact._cache[i].nbytes
        assert torch.equal(exact[i][0], load_tensor(rows[i].path, spec))  # evaluation stays exact
