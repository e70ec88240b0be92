"""The eager weights an export carries, and Grad-CAM of the served graphs (flannel/cam.py)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from flannel.artifacts import EAGER_FP32, INPUT_SPEC, artifact_path, verify_manifest
from flannel.cam import cam_layer, cam_overlay_png, graph_cam
from flannel.export.sources import load_fitted, load_source
from flannel.graphs import served_graph
from flannel.preprocess import PreprocessSpec


def rebuilt(run_dir):
    """The served graph as the handler rebuilds it: manifest members + model.eager.pt."""
    export = run_dir / "export"
    manifest = verify_manifest(export)
    side = PreprocessSpec.load(artifact_path(export, manifest, INPUT_SPEC)).resize
    state = torch.load(artifact_path(export, manifest, EAGER_FP32), weights_only=True)
    graph = served_graph(manifest["kind"], manifest["members"], len(manifest["class_names"]),
                         side, state)
    return graph, {m["name"]: m["arch"] for m in manifest["members"]}, side


@pytest.mark.slow
@pytest.mark.parametrize("which", ["learner", "ensemble"])
def test_eager_weights_rebuild_the_exported_module_exactly(which, exported_tiny_run,
                                                           tiny_ensemble):
    run = exported_tiny_run if which == "learner" else tiny_ensemble
    graph, _, side = rebuilt(run)
    loaded = load_source(run)
    load_fitted(loaded, run / "export", verify_manifest(run / "export"))
    source = loaded.module.eval()
    x = torch.rand(2, 1, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for got, want in zip(graph(x), source(x)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_learner_map_is_grad_cam_of_its_logit(exported_tiny_run):
    graph, archs, side = rebuilt(exported_tiny_run)
    x = torch.rand(1, 1, side, side, generator=torch.Generator().manual_seed(2))
    ours = graph_cam(graph, archs, x)
    assert ours.heat.shape == (side, side) and ours.heat.dtype == np.float32
    assert 0.0 <= ours.heat.min() and ours.heat.max() <= 1.0
    assert ours.target == int(ours.probabilities.argmax()) and ours.learner_weights == {}

    class Logits(torch.nn.Module):  # grad-cam wants one score tensor out
        def __init__(self, g):
            super().__init__()
            self.g = g

        def forward(self, t):
            return self.g(t)[0]

    arch = next(iter(archs.values()))
    cam = GradCAM(Logits(graph), [cam_layer(graph.model, arch)])
    try:
        theirs = cam(x, targets=[ClassifierOutputTarget(ours.target)])[0]
    finally:
        cam.activations_and_grads.release()
    # The package scales then resizes with OpenCV; this resizes then scales with torch.
    assert np.corrcoef(ours.heat.ravel(), theirs.ravel())[0, 1] > 0.95


def test_ensemble_map_weighs_each_learner_by_its_fusion_weight(tiny_ensemble):
    graph, archs, side = rebuilt(tiny_ensemble)
    x = torch.rand(1, 1, side, side, generator=torch.Generator().manual_seed(3))
    flags = [p.requires_grad for p in graph.parameters()]
    explained = graph_cam(graph, archs, x, target=1)
    assert explained.target == 1 and set(explained.learner_maps) == set(graph.names)
    assert sum(explained.learner_weights.values()) == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        probs, weights, _ = graph(x)
    np.testing.assert_allclose(explained.probabilities, probs[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(list(explained.learner_weights.values()), weights[0].numpy(),
                               atol=1e-6)
    blend = sum(explained.learner_weights[n] * m for n, m in explained.learner_maps.items())
    blend = (blend - blend.min()) / (blend.max() - blend.min())
    np.testing.assert_allclose(explained.heat, blend, atol=1e-5)
    # Left as found: flags restored, no gradient collected.
    assert [p.requires_grad for p in graph.parameters()] == flags
    assert all(p.grad is None for p in graph.parameters())

    one = graph_cam(graph, archs, x, target=1, learner=graph.names[0])
    assert set(one.learner_maps) == {graph.names[0]} and one.learner_weights == {}
    with pytest.raises(ValueError, match="unknown learner 'nope'"):
        graph_cam(graph, archs, x, learner="nope")
    with pytest.raises(ValueError, match="target class 7 outside 0..2"):
        graph_cam(graph, archs, x, target=7)


def test_overlay_is_an_rgb_png_of_the_input_size():
    gray = np.linspace(0, 1, 40 * 30, dtype=np.float32).reshape(40, 30)
    heat = np.zeros_like(gray)
    heat[10:20, 5:15] = 1.0
    png = cam_overlay_png(gray, heat)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (30, 40) and image.mode == "RGB"
    pixels = np.asarray(image).astype(int)
    # The hot square is redder than the cold background at the same gray level.
    assert pixels[15, 10, 0] - pixels[15, 10, 2] > pixels[35, 10, 0] - pixels[35, 10, 2]
