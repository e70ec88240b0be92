"""One registry of architectures: name -> torchvision builder, input size, classifier head.

    python -c "from flannel.registry import ARCHITECTURES; print(sorted(ARCHITECTURES))"

Models are never copied or subclassed: every entry builds a stock torchvision model and swaps its
classifier head for one with ``num_classes`` outputs. Adding an architecture is one ``register``
line. Weights come from nowhere (random init), a local file (air-gapped sites), or torchvision's
weight enum (downloads where a network exists).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torchvision


@dataclass(frozen=True)
class ArchSpec:
    """What the project needs to know about one architecture.

    Attributes:
        name: torchvision model name (``torchvision.models.get_model`` key).
        input_size: native input side (224, or 299 for inception_v3).
        head: dotted path of the final classifier layer replaced for ``num_classes``.
        freeze_groups: dotted module prefixes from input to output; the last ones are unfrozen
            first by partial fine-tuning.
        min_size: smallest input side the network accepts (tests use tiny inputs).
        cam_layer: dotted path of the last convolutional block, the layer Grad-CAM explains.
    """

    name: str
    input_size: int
    head: str
    freeze_groups: tuple[str, ...] = field(default_factory=tuple)
    min_size: int = 32
    cam_layer: str = ""


ARCHITECTURES: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    if spec.name in ARCHITECTURES:
        raise ValueError(f"architecture {spec.name!r} registered twice")
    ARCHITECTURES[spec.name] = spec
    return spec


_RESNET_GROUPS = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc")
register(ArchSpec("resnet18", 224, "fc", _RESNET_GROUPS, cam_layer="layer4"))
register(ArchSpec("resnet50", 224, "fc", _RESNET_GROUPS, cam_layer="layer4"))
register(ArchSpec("resnet152", 224, "fc", _RESNET_GROUPS, cam_layer="layer4"))
register(ArchSpec("resnext101_32x8d", 224, "fc", _RESNET_GROUPS, cam_layer="layer4"))
register(ArchSpec("densenet121", 224, "classifier",
                  ("features.conv0", "features.denseblock1", "features.denseblock2",
                   "features.denseblock3", "features.denseblock4", "features.norm5", "classifier"),
                  cam_layer="features.denseblock4"))
register(ArchSpec("densenet161", 224, "classifier",
                  ("features.conv0", "features.denseblock1", "features.denseblock2",
                   "features.denseblock3", "features.denseblock4", "features.norm5", "classifier"),
                  cam_layer="features.denseblock4"))
register(ArchSpec("squeezenet1_1", 224, "classifier.1", ("features", "classifier"),
                  cam_layer="features"))
register(ArchSpec("mobilenet_v3_small", 224, "classifier.3", ("features", "classifier"),
                  cam_layer="features"))
register(ArchSpec("mobilenet_v3_large", 224, "classifier.3", ("features", "classifier"),
                  cam_layer="features"))
register(ArchSpec("shufflenet_v2_x1_0", 224, "fc",
                  ("conv1", "stage2", "stage3", "stage4", "conv5", "fc"), cam_layer="conv5"))
register(ArchSpec("mnasnet1_0", 224, "classifier.1", ("layers", "classifier"),
                  cam_layer="layers"))
register(ArchSpec("alexnet", 224, "classifier.6", ("features", "classifier"), min_size=64,
                  cam_layer="features"))
register(ArchSpec("vgg19", 224, "classifier.6", ("features", "classifier"),
                  cam_layer="features"))
register(ArchSpec("vgg19_bn", 224, "classifier.6", ("features", "classifier"),
                  cam_layer="features"))
# Its auxiliary classifier (used in training) needs the 17x17 Mixed_6e map of a 299 input.
register(ArchSpec("inception_v3", 299, "fc",
                  ("Conv2d_1a_3x3", "Mixed_5b", "Mixed_6a", "Mixed_7a", "fc"), min_size=299,
                  cam_layer="Mixed_7c"))


def get_arch(name: str) -> ArchSpec:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}") from None


def replace_head(model: nn.Module, spec: ArchSpec, num_classes: int) -> nn.Module:
    """Swap the classifier layer named by ``spec.head`` for a fresh one with ``num_classes``."""
    old = model.get_submodule(spec.head)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes)
    elif isinstance(old, nn.Conv2d):  # SqueezeNet classifies with a 1x1 convolution.
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size)
    else:
        raise TypeError(f"{spec.name}: head {spec.head} is {type(old).__name__}, not Linear/Conv2d")
    model.set_submodule(spec.head, new)
    return model


def build_model(name: str, num_classes: int, *, weights: str | Path | None = None,
                download: Callable | None = None) -> nn.Module:
    """Build a registered architecture with a ``num_classes`` head.

    Args:
        name: registry key.
        num_classes: outputs of the new head.
        weights: None for random init; ``"DEFAULT"`` or an enum member name (e.g.
            ``"IMAGENET1K_V1"``) for torchvision's pretrained weights (needs a network); or a path to
            a local state_dict file, either of the stock 1000-class model or of this head.
        download: hook used instead of torchvision's downloader (tests).

    Returns:
        The model, in train mode.
    """
    spec = get_arch(name)
    extra = {"aux_logits": True, "init_weights": True} if name == "inception_v3" else {}
    if weights is None:
        model = torchvision.models.get_model(name, weights=None, **extra)
        return replace_head(model, spec, num_classes)
    if isinstance(weights, Path) or Path(str(weights)).suffix in (".pt", ".pth", ".bin"):
        return _from_local_file(name, spec, num_classes, Path(weights), extra)
    enum = torchvision.models.get_model_weights(name)
    member = enum.DEFAULT if weights == "DEFAULT" else enum[str(weights)]
    if download is not None:
        state = download(member.url)
        model = torchvision.models.get_model(name, weights=None, **extra)
        model.load_state_dict(state)
    else:
        model = torchvision.models.get_model(name, weights=member, **extra)
    return replace_head(model, spec, num_classes)


def _from_local_file(name: str, spec: ArchSpec, num_classes: int, path: Path,
                     extra: dict) -> nn.Module:
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    head_weight = state.get(f"{spec.head}.weight")
    if head_weight is not None and head_weight.shape[0] == num_classes:
        model = replace_head(torchvision.models.get_model(name, weights=None, **extra), spec,
                             num_classes)
        model.load_state_dict(state)
        return model
    model = torchvision.models.get_model(name, weights=None, **extra)
    model.load_state_dict(state)
    return replace_head(model, spec, num_classes)


def freeze(model: nn.Module, spec: ArchSpec, policy: str) -> nn.Module:
    """Apply a freeze policy: ``"none"`` (full fine-tuning), ``"head"`` (only the head trains),
    or ``"last:F"`` (the last fraction F of ``spec.freeze_groups`` trains, e.g. ``last:0.25``)."""
    if policy == "none":
        trainable = [""]
    elif policy == "head":
        trainable = [spec.head]
    elif policy.startswith("last:"):
        frac = float(policy.split(":", 1)[1])
        n = max(1, round(len(spec.freeze_groups) * frac))
        trainable = list(spec.freeze_groups[-n:]) + [spec.head]
    else:
        raise ValueError(f"unknown freeze policy {policy!r}: use none, head or last:FRACTION")
    for pname, p in model.named_parameters():
        p.requires_grad = any(pname == t or pname.startswith(t + ".") or t == ""
                              for t in trainable)
    return model


def train_mode(model: nn.Module) -> nn.Module:
    """``model.train()``, except that BatchNorm layers whose parameters are all frozen stay in eval
    mode: frozen means frozen, running statistics included (otherwise ``--freeze head`` would still
    drift every backbone BatchNorm's mean and variance towards the training batches)."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
    return model


def calibrate_batchnorm(model: nn.Module, side: int, batches: int = 3) -> nn.Module:
    """Set batch-norm running statistics from random images, as training would, and return the
    model in eval mode. With the initial statistics (mean 0, variance 1) deep untrained networks
    (resnet152, inception_v3) multiply activations layer after layer and end with logits of 1e4
    and more: one-hot probabilities that no parity check or speed subject should rest on."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(4, 3, side, side))
    return model.eval()
