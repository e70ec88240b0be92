"""Grad-CAM: every architecture names its explained layer, maps are meaningful and leave the model
as it was, and overlays are written for good files while bad ones are named."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from flannel.checkpoint import Checkpoint, save_checkpoint
from flannel.cli import main as flannel_main
from flannel.data.records import read_manifest
from flannel.decode import InputError
from flannel.labels import get_scheme
from flannel.preprocess import PreprocessSpec, load_tensor
from flannel.registry import ARCHITECTURES, build_model, freeze, get_arch
from flannel.cam import cam_layer
from flannel.train.gradcam import (displayed_image, explain_images, gradcam_and_probabilities,
                                   gradcam_map, pick_report_rows, report_overlays)
from toy_data import make_toy_dataset

SMALL = ["resnet18", "densenet121", "squeezenet1_1", "mobilenet_v3_small", "shufflenet_v2_x1_0",
         "mnasnet1_0"]
LARGE = sorted(set(ARCHITECTURES) - set(SMALL))
CLASSES = list(get_scheme("3class").classes)
SIDE = 64


def _conv_sizes_and_cam_shape(name: str) -> tuple[list[int], torch.Size]:
    """Spatial areas of every Conv2d output and the cam layer's output shape, at the native size.

    Runs on the meta device: shapes only, no weights, no arithmetic.
    """
    spec = get_arch(name)
    with torch.device("meta"):
        model = build_model(name, len(CLASSES)).eval()
    areas, cam_shapes = [], []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda m, i, o: areas.append(o.shape[-2] * o.shape[-1]))
    cam_layer(model, name).register_forward_hook(lambda m, i, o: cam_shapes.append(o.shape))
    with torch.no_grad():
        model(torch.empty(1, 3, spec.input_size, spec.input_size, device="meta"))
    return areas, cam_shapes[0]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_cam_layer_is_the_deepest_spatial_map(name):
    areas, cam_shape = _conv_sizes_and_cam_shape(name)
    assert len(cam_shape) == 4, f"{name}: cam layer output {tuple(cam_shape)} is not a feature map"
    # 1x1 outputs are squeeze-excitation convolutions on pooled vectors, not spatial maps.
    spatial = [a for a in areas if a > 1]
    assert cam_shape[-2] * cam_shape[-1] <= min(spatial), (
        f"{name}: {get_arch(name).cam_layer} is {tuple(cam_shape[-2:])}, but a later convolution "
        f"works on a smaller map")


def _map_of_random_model(name: str) -> None:
    torch.manual_seed(0)
    side = max(SIDE, get_arch(name).min_size)
    model = build_model(name, len(CLASSES)).eval()  # inception_v3: eval mode has no aux output
    heat = gradcam_map(model, name, torch.randn(3, side, side))
    assert heat.shape == (side, side) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and 0.0 <= heat.min() and heat.max() <= 1.0


@pytest.mark.parametrize("name", SMALL)
def test_small_architectures_give_a_map(name):
    _map_of_random_model(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", LARGE)
def test_large_architectures_give_a_map(name):
    _map_of_random_model(name)


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return build_model("resnet18", len(CLASSES)).eval()


def test_map_has_the_input_size_and_depends_on_the_target(resnet18):
    torch.manual_seed(1)
    x = torch.randn(3, SIDE, SIDE)
    maps = [gradcam_map(resnet18, "resnet18", x, target=k) for k in range(len(CLASSES))]
    for heat in maps:
        assert heat.shape == (SIDE, SIDE)
        assert heat.max() - heat.min() > 0.5, "the map is (nearly) constant"
    assert any(not np.allclose(maps[0], m, atol=1e-3) for m in maps[1:])
    with torch.no_grad():
        expected_probs = torch.softmax(resnet18(x[None]), dim=1)[0].numpy()
    heat, probs = gradcam_and_probabilities(resnet18, "resnet18", x)
    np.testing.assert_allclose(probs, expected_probs, atol=1e-6)
    np.testing.assert_array_equal(heat, maps[int(expected_probs.argmax())])


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_map_is_the_grad_cam_packages(name):
    """The trainer's maps (``flannel.cam.learner_cam``, shared with the server) against the
    grad-cam package's GradCAM on the same layer and class."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(2)
    model = build_model(name, len(CLASSES)).eval()
    x = torch.randn(1, 3, 2 * SIDE, 2 * SIDE)
    compared = 0
    for target in range(len(CLASSES)):
        ours = gradcam_map(model, name, x, target=target)
        cam = GradCAM(model, [cam_layer(model, name)])
        try:
            theirs = cam(x, targets=[ClassifierOutputTarget(target)])[0]
        finally:
            cam.activations_and_grads.release()
        if np.ptp(theirs) == 0:  # no positive evidence for this class: both maps are flat
            assert np.ptp(ours) == 0, target
            continue
        # The package scales then resizes with OpenCV; flannel.cam resizes then scales.
        assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.95, target
        compared += 1
    assert compared >= 1


def test_map_leaves_no_hooks_grads_or_flag_changes_behind():
    torch.manual_seed(0)
    model = freeze(build_model("resnet18", len(CLASSES)), get_arch("resnet18"), "head").train()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    heat = gradcam_map(model, "resnet18", torch.randn(3, SIDE, SIDE))
    assert heat.max() > 0, "a frozen backbone still gets gradients at the explained layer"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    for module in model.modules():
        assert not module._forward_hooks and not module._backward_hooks


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random-weights resnet18 checkpoint at 64 px and its toy manifest."""
    root = tmp_path_factory.mktemp("gradcam")
    manifest = make_toy_dataset(root / "data", per_class={"train": 1, "test": 3}, size=SIDE)
    torch.manual_seed(0)
    model = build_model("resnet18", len(CLASSES)).eval()
    ckpt = Checkpoint(arch="resnet18", class_names=CLASSES,
                      preprocess=PreprocessSpec.for_input_size(SIDE),
                      state_dict=model.state_dict(), config={"manifest": str(manifest)})
    run_dir = root / "run"
    save_checkpoint(run_dir / "best.pt", ckpt)
    return run_dir, ckpt, read_manifest(manifest)


def _assert_colour_png(path, size=None):
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=int)
    assert size is None or im.size == size
    # A heat map is drawn over the gray radiograph: some pixels are not gray.
    assert np.abs(rgb[..., 0] - rgb[..., 2]).max() > 50


def test_explain_images_writes_one_overlay_per_image(tiny_checkpoint, tmp_path):
    run_dir, _, rows = tiny_checkpoint
    same_name = [r.path for r in rows if Path(r.path).name == "train_0.png"]  # one per class
    written = explain_images(run_dir, same_name[:2], tmp_path / "out", target="Normal")
    assert [p.name for p in written] == ["train_0.png", "train_0-2.png"]
    for path in written:
        _assert_colour_png(path)


def test_explain_images_names_bad_files_after_writing_the_good_ones(tiny_checkpoint, tmp_path):
    run_dir, _, rows = tiny_checkpoint
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(InputError, match="notes.png"):
        explain_images(run_dir / "best.pt", [bad, rows[0].path], tmp_path / "out")
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


def test_explain_rejects_an_unknown_target(tiny_checkpoint, tmp_path):
    run_dir, _, rows = tiny_checkpoint
    with pytest.raises(ValueError, match="Normal"):
        explain_images(run_dir, [rows[0].path], tmp_path, target="Healthy")


def test_overlay_shows_the_serving_tensor(tiny_checkpoint):
    run_dir, ckpt, rows = tiny_checkpoint
    tensor = load_tensor(rows[0].path, ckpt.preprocess)
    gray = displayed_image(tensor, ckpt.preprocess)
    assert gray.shape == (SIDE, SIDE)
    restored = (torch.from_numpy(gray) - ckpt.preprocess.mean[1]) / ckpt.preprocess.std[1]
    torch.testing.assert_close(restored, tensor[1], atol=1e-5, rtol=0)


def test_report_rows_are_test_images_per_class_chosen_reproducibly(tiny_checkpoint):
    _, _, rows = tiny_checkpoint
    picked = pick_report_rows(rows, CLASSES, per_class=2)
    assert [r.label for r in picked] == [c for c in CLASSES for _ in range(2)]
    assert all(r.split == "test" for r in picked)
    assert pick_report_rows(list(reversed(rows)), CLASSES, per_class=2) == picked
    assert pick_report_rows(rows, CLASSES, per_class=2, seed=1) != picked  # the seed chooses


def test_report_overlays_land_in_the_run_folder(tiny_checkpoint, tmp_path):
    _, ckpt, rows = tiny_checkpoint
    written = report_overlays(tmp_path, ckpt, rows, per_class=1)
    expected = [f"{r.label}-{Path(r.path).stem}.png"
                for r in pick_report_rows(rows, CLASSES, per_class=1)]
    assert [p.name for p in written] == expected
    assert all(p.parent == tmp_path / "gradcam" and p.is_file() for p in written)


def test_explain_cli_writes_overlays(tiny_checkpoint, tmp_path, capsys):
    run_dir, _, rows = tiny_checkpoint
    code = flannel_main(["explain", str(run_dir), rows[0].path, "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 1 and printed[0].endswith(".png")
    _assert_colour_png(printed[0])
