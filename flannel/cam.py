"""Grad-CAM of the served graphs (a learner or the fused ensemble) on the common input, and of a
registry model on its own input (the trainer's report overlays, ``learner_cam``): one computation.

    python -c "from flannel.cam import graph_cam; help(graph_cam)"

The server explains exactly the tensor it predicted on: the (1, 1, R, R) common input that host
preprocessing made, run through the eager fp32 copy of the served graph
(``flannel.graphs.served_graph``). Each learner is explained at its registry ``cam_layer``. For a
learner the map is plain Grad-CAM of its logit; for the ensemble every learner's map is taken from
the gradient of the fused log-probability (so it is what the learner contributes to the ensemble's
decision), scaled to [0, 1], and the maps are averaged with the learner weights the fusion gave
this image. ``cam_overlay_png`` draws the map over the grayscale input.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from flannel.quoting import quote
from flannel.registry import get_arch

# Weight of the radiograph in the overlay; the rest is the heat map (grad-cam's own default).
IMAGE_WEIGHT = 0.5


def cam_layer(model: nn.Module, arch: str) -> nn.Module:
    """The module Grad-CAM explains for ``arch`` (``ArchSpec.cam_layer``).

    Args:
        model: a model built by ``flannel.registry.build_model(arch, ...)``.
        arch: registry name.

    Returns:
        The submodule.
    """
    path = get_arch(arch).cam_layer
    if not path:
        raise ValueError(f"{arch}: the registry names no cam_layer")
    return model.get_submodule(path)


def resolve_target(target: int | str | None, class_names: Sequence[str]) -> int | None:
    """A class given by name or index, as an index; None stays None."""
    if target is None:
        return None
    if isinstance(target, str) and target in class_names:
        return list(class_names).index(target)
    if isinstance(target, int) and not isinstance(target, bool) and 0 <= target < len(class_names):
        return target
    raise ValueError(f"unknown target class {quote(target)}; classes: {list(class_names)}")


@contextlib.contextmanager
def model_left_untouched(model: nn.Module) -> Iterator[None]:
    """Freeze every parameter for the duration, then restore flags, gradients and mode.

    Gradients flow to the input instead, so the explained layer gets its gradient even when the
    whole backbone is frozen, and no parameter collects a ``.grad``.
    """
    params = list(model.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    was_training = model.training
    try:
        for p in params:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, (flag, grad) in zip(params, saved):
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)


@dataclass
class GraphCam:
    """One explanation.

    Attributes:
        heat: (R, R) float32 map in [0, 1] at the input's size.
        target: the explained class index.
        probabilities: the eager graph's class probabilities for the image.
        learner_maps: per explained learner, its own (R, R) map (an ensemble has several).
        learner_weights: the fusion's weight of each learner for this image (ensemble only).
    """

    heat: np.ndarray
    target: int
    probabilities: np.ndarray
    learner_maps: dict[str, np.ndarray]
    learner_weights: dict[str, float]


def _scaled(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """ReLU, resize to the input's (H, W), then min-max to [0, 1] (a flat map stays 0)."""
    cam = F.interpolate(cam.clamp(min=0)[None, None], size=size, mode="bilinear",
                        align_corners=False)[0, 0]
    span = cam.max() - cam.min()
    return (cam - cam.min()) / span if span > 0 else torch.zeros_like(cam)


@contextlib.contextmanager
def _recording(layers: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Each named layer's output of the next forward pass, kept with its gradient."""
    activations: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_module, _inputs, output):
            activations[name] = output
            output.retain_grad()
        return hook

    hooks = [layer.register_forward_hook(keep(name)) for name, layer in layers.items()]
    try:
        yield activations
    finally:
        for h in hooks:
            h.remove()


def _grad_cam(activation: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Grad-CAM from a recorded activation after the backward pass: channels weighted by their
    mean gradient, summed, then ``_scaled``."""
    act, grad = activation.detach()[0], activation.grad[0]
    return _scaled((grad.mean(dim=(1, 2), keepdim=True) * act).sum(dim=0), size)


def _class_index(target: int | None, probs: torch.Tensor) -> int:
    index = int(probs[0].argmax()) if target is None else int(target)
    if not 0 <= index < probs.shape[1]:
        raise ValueError(f"target class {index} outside 0..{probs.shape[1] - 1}")
    return index


def learner_cam(model: nn.Module, arch: str, tensor: torch.Tensor,
                target: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM of a registry model's logit for one of its own inputs, as ``graph_cam`` computes
    it for a learner.

    Args:
        model: a registry model, fp32; left with its mode, flags and gradients as they were.
        arch: its registry name (picks ``cam_layer``).
        tensor: one model input, (C, H, W) or (1, C, H, W), on the model's device.
        target: class index to explain; None explains the predicted class.

    Returns:
        The float32 (H, W) map in [0, 1] and the (num_classes,) softmax of the same pass.
    """
    x = (tensor if tensor.ndim == 4 else tensor[None]).detach().float().clone()
    x.requires_grad_(True)
    with _recording({arch: cam_layer(model, arch)}) as activations, \
            model_left_untouched(model), torch.enable_grad(), \
            torch.autocast(x.device.type, enabled=False):
        logits = model(x)
        probs = torch.softmax(logits.detach(), dim=1)
        logits[0, _class_index(target, probs)].backward()
    heat = _grad_cam(activations[arch], tuple(x.shape[-2:]))
    return heat.cpu().numpy().astype(np.float32), probs[0].cpu().numpy()


def _is_ensemble(graph: nn.Module) -> bool:
    return hasattr(graph, "fusion")


def _learners(graph: nn.Module, archs: dict[str, str]) -> list[tuple[str, nn.Module]]:
    """(name, LearnerGraph) of a served graph: itself for a learner, its members for an ensemble."""
    if _is_ensemble(graph):
        return list(zip(graph.names, graph.learners))
    return [(next(iter(archs)), graph)]


def graph_cam(graph: nn.Module, archs: dict[str, str], image: torch.Tensor,
              target: int | None = None, learner: str | None = None) -> GraphCam:
    """Grad-CAM of a served graph for one common-input image.

    Args:
        graph: a ``LearnerGraph`` or ``FusedEnsemble`` (``flannel.graphs``), fp32; left with its
            mode, flags and gradients as they were.
        archs: learner name -> registry architecture (picks each learner's ``cam_layer``).
        image: (1, R, R) or (1, 1, R, R) common input in [0, 1].
        target: class index to explain; None explains the graph's predicted class.
        learner: for an ensemble, explain this one learner's own logit instead of the fusion.

    Returns:
        The map, the explained class and the probabilities of the explained graph.
    """
    x = (image if image.ndim == 4 else image[None]).detach().float().clone().requires_grad_(True)
    side = x.shape[-1]
    members = _learners(graph, archs)
    if learner is not None:
        found = dict(members)
        if learner not in found:
            raise ValueError(f"unknown learner {learner!r}; this model has {sorted(found)}")
        members, graph = [(learner, found[learner])], found[learner]
    layers = {name: cam_layer(lg.model, archs[name]) for name, lg in members}
    with _recording(layers) as activations, model_left_untouched(graph), torch.enable_grad(), \
            torch.autocast(x.device.type, enabled=False):
        outputs = graph(x)
        if _is_ensemble(graph):  # (probabilities, learner_weights, ...): explain the log-prob
            probs, weights = outputs[0], outputs[1]
            score = torch.log(probs.clamp_min(1e-12))
        else:  # (logits, probabilities, ...): explain the logit
            score, probs, weights = outputs[0], outputs[1], None
        index = _class_index(target, probs)
        score[0, index].backward()
    maps = {name: _grad_cam(activations[name], (side, side)) for name, _ in members}
    learner_weights = ({} if weights is None else
                       {n: float(w) for n, w in zip(graph.names, weights[0].detach())})
    if learner_weights:
        heat = sum(learner_weights[n] * maps[n] for n in maps)
        heat = _scaled(heat, (side, side)) if float(heat.max()) > 0 else heat
    else:
        heat = next(iter(maps.values()))
    return GraphCam(heat.numpy().astype(np.float32), index, probs[0].detach().numpy(),
                    {n: m.numpy().astype(np.float32) for n, m in maps.items()}, learner_weights)


def cam_overlay(gray: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The heat map over the grayscale image: (H, W, 3) uint8 RGB.

    Args:
        gray: (H, W) image in [0, 1].
        heat: (H, W) map in [0, 1].
    """
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.repeat(np.clip(gray, 0.0, 1.0)[..., None], 3, axis=2).astype(np.float32)
    return show_cam_on_image(rgb, np.clip(heat, 0.0, 1.0), use_rgb=True,
                             image_weight=IMAGE_WEIGHT)


def cam_overlay_png(gray: np.ndarray, heat: np.ndarray) -> bytes:
    """``cam_overlay`` as PNG bytes (RGB, the image's size)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(cam_overlay(gray, heat)).save(buffer, format="PNG")
    return buffer.getvalue()
