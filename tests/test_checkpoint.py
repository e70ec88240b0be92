"""Checkpoints round-trip exactly and load with weights_only=True."""
import pickle

import pytest
import torch

from flannel.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from flannel.preprocess import PreprocessSpec
from flannel.registry import build_model


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model("squeezenet1_1", 3).eval()
    spec = PreprocessSpec(resize=72, crop=64)
    ckpt = Checkpoint("squeezenet1_1", ["COVID-19", "Normal", "Pneumonia"], spec,
                      model.state_dict(), {"lr": 0.001}, {"val": {"macro_f1": 0.5}}, epoch=3)
    path = save_checkpoint(tmp_path / "c.pt", ckpt)
    back = load_checkpoint(path)
    assert (back.arch, back.class_names, back.preprocess, back.config, back.epoch) == (
        ckpt.arch, ckpt.class_names, spec, {"lr": 0.001}, 3)
    assert back.versions["torch"] == str(torch.__version__)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(back.build_model()(x), model(x))
    # The file holds only tensors and plain values: the strict loader accepts it.
    torch.load(path, weights_only=True)


def test_a_pickled_object_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "meta": Evil(), "state_dict": {}}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)


def test_a_foreign_file_is_named(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a flannel checkpoint"):
        load_checkpoint(tmp_path / "x.pt")


@pytest.mark.parametrize("arch", ["resnet18", "mnasnet1_0", "squeezenet1_1"])
def test_rebuilt_model_equals_one_built_and_loaded_the_ordinary_way(arch):
    """build_model skips the random initialisation (meta device), with the same result: every
    tensor, the output, eval mode, trainable parameters that share nothing with the checkpoint."""
    from flannel.checkpoint import state_with_metadata

    torch.manual_seed(0)
    source = build_model(arch, 3)
    ckpt = Checkpoint(arch=arch, class_names=["a", "b", "c"],
                      preprocess=PreprocessSpec(resize=73, crop=64),
                      state_dict=source.state_dict())
    rebuilt = ckpt.build_model()
    ordinary = build_model(arch, 3)
    ordinary.load_state_dict(state_with_metadata(ckpt.state_dict, ordinary))
    ordinary.eval()
    assert not rebuilt.training
    for (name, got), want in zip(rebuilt.state_dict().items(), ordinary.state_dict().values()):
        assert got.device.type == "cpu" and torch.equal(got, want), name
        assert got.data_ptr() != ckpt.state_dict[name].data_ptr(), name
    assert all(p.requires_grad for p in rebuilt.parameters())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), ordinary(x))


def test_a_checkpoint_missing_a_tensor_is_refused_as_before():
    state = build_model("resnet18", 3).state_dict()
    state.pop("fc.bias")
    ckpt = Checkpoint(arch="resnet18", class_names=["a", "b", "c"],
                      preprocess=PreprocessSpec(resize=73, crop=64), state_dict=state)
    with pytest.raises(RuntimeError, match="fc.bias"):
        ckpt.build_model()
