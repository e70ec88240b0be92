"""Checkpoints: a state_dict plus plain metadata, loadable with ``weights_only=True``.

    python -c "from flannel.checkpoint import load_checkpoint; print(load_checkpoint('runs/x/best.pt').arch)"

Contract (see the design notes): architecture name, class names, the preprocessing spec, the
resolved config, metrics and library versions travel with the weights. Nothing but tensors and
JSON-like values is stored, so loading never unpickles arbitrary objects.
"""
from __future__ import annotations

import platform
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from flannel.preprocess import PreprocessSpec
from flannel.registry import build_model

CHECKPOINT_FORMAT = 1


def library_versions() -> dict[str, str]:
    import numpy
    import torchvision
    # str(): torch.__version__ is a TorchVersion object, which weights_only loading refuses.
    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "numpy": str(numpy.__version__), "python": platform.python_version()}


@dataclass
class Checkpoint:
    """The metadata and weights of one trained learner."""

    arch: str
    class_names: list[str]
    preprocess: PreprocessSpec
    state_dict: dict[str, torch.Tensor]
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    versions: dict = field(default_factory=library_versions)
    epoch: int = 0
    # How it was trained: resolved precision, memory layout, device, CPU, world size.
    training: dict = field(default_factory=dict)
    # Optimiser, scheduler, RNG and early-stopping state for `--resume` (last.pt only).
    train_state: dict | None = None

    def build_model(self) -> nn.Module:
        """Rebuild the architecture and load the weights, in eval mode.

        The architecture is built on the meta device (no memory, no random initialisation) and
        then takes copies of the checkpoint's tensors: drawing vgg19_bn's 143 M random weights
        only to overwrite them took seconds. Should the checkpoint lack a tensor the model has,
        or hold one in another dtype, the model is built and loaded the ordinary way instead.
        """
        with torch.device("meta"):
            model = build_model(self.arch, len(self.class_names))
        dtypes = {k: v.dtype for k, v in model.state_dict().items()}
        state = state_with_metadata(self.state_dict, model)
        if all(k in state and state[k].dtype == dtype for k, dtype in dtypes.items()):
            copies = OrderedDict((k, v.detach().clone()) for k, v in state.items())
            copies._metadata = state._metadata
            model.load_state_dict(copies, assign=True)
            if not any(t.is_meta for t in (*model.parameters(), *model.buffers())):
                return model.eval()
        model = build_model(self.arch, len(self.class_names))
        model.load_state_dict(state_with_metadata(self.state_dict, model))
        return model.eval()


def state_with_metadata(state_dict: dict, model: nn.Module) -> OrderedDict:
    """``state_dict`` carrying per-module versions, which some modules check when loading (mnasnet
    refuses a state without one); checkpoints that lack them get the freshly built model's."""
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is None:
        metadata = model.state_dict()._metadata
    out = OrderedDict(state_dict)
    out._metadata = metadata
    return out


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` atomically (temp file, then rename) so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in ckpt.state_dict.items()},
        # Module versions (``state_dict()._metadata``), which the plain dict above drops.
        "state_dict_metadata": {k: dict(v) for k, v in
                                getattr(ckpt.state_dict, "_metadata", {}).items()},
        "meta": {"arch": ckpt.arch, "class_names": list(ckpt.class_names),
                 "preprocess": ckpt.preprocess.to_dict(), "config": ckpt.config,
                 "metrics": ckpt.metrics, "versions": ckpt.versions, "epoch": ckpt.epoch,
                 "training": ckpt.training},
    }
    if ckpt.train_state is not None:
        payload["train_state"] = ckpt.train_state
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def _state_dict(payload: dict) -> OrderedDict:
    state = OrderedDict(payload["state_dict"])
    if payload.get("state_dict_metadata"):
        state._metadata = OrderedDict(payload["state_dict_metadata"])
    return state


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint`` (CPU, ``weights_only=True``)."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a flannel checkpoint (format {CHECKPOINT_FORMAT})")
    meta = payload["meta"]
    return Checkpoint(arch=meta["arch"], class_names=list(meta["class_names"]),
                      preprocess=PreprocessSpec.from_dict(meta["preprocess"]),
                      state_dict=_state_dict(payload), config=meta.get("config", {}),
                      metrics=meta.get("metrics", {}), versions=meta.get("versions", {}),
                      epoch=int(meta.get("epoch", 0)), training=meta.get("training", {}),
                      train_state=payload.get("train_state"))
