"""Training losses: cross-entropy and focal loss, with per-class weights and label smoothing.

    python -c "from flannel.train.losses import FocalLoss; print(FocalLoss(gamma=2.0))"

Focal loss (Lin et al. 2017) as FLANNEL uses it, with its reference code's defects fixed: it takes
logits (no second softmax over probabilities) and averages over the batch instead of summing.
For one item with true class t and predicted probability p_t:

    FL = -alpha_t * (1 - p_t) ** gamma * log(p_t)

With gamma = 0 and alpha = 1 it is cross-entropy. With label smoothing the target is the smoothed
distribution q and FL = -sum_c alpha_c * q_c * (1 - p_c) ** gamma * log(p_c).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def inverse_frequency(targets: Sequence[int], num_classes: int) -> torch.Tensor:
    """Per-class weights proportional to 1 / count, normalised to mean 1 over present classes.

    A class absent from ``targets`` gets weight 0: there is nothing to weight.
    """
    counts = np.bincount(np.asarray(targets, dtype=int), minlength=num_classes).astype(float)
    w = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
    present = max(1, int((counts > 0).sum()))
    return torch.tensor(w * present / w.sum(), dtype=torch.float32)


class FocalLoss(nn.Module):
    """Mean focal loss over a batch of logits.

    Args:
        gamma: focusing parameter (0 gives cross-entropy).
        alpha: per-class weights (None = 1 for every class).
        label_smoothing: as in ``torch.nn.CrossEntropyLoss``.
    """

    def __init__(self, gamma: float = 2.0, alpha: torch.Tensor | Sequence[float] | None = None,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)
        alpha_t = None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32)
        self.register_buffer("alpha", alpha_t)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # the (1 - p) ** gamma term underflows in bf16/fp16
        num_classes = logits.shape[1]
        log_p = F.log_softmax(logits, dim=1)
        q = F.one_hot(target, num_classes).to(log_p.dtype)
        if self.label_smoothing:
            q = q * (1 - self.label_smoothing) + self.label_smoothing / num_classes
        per_class = -q * (1 - log_p.exp()).pow(self.gamma) * log_p
        if self.alpha is not None:
            per_class = per_class * self.alpha.to(log_p.dtype)
        return per_class.sum(dim=1).mean()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, label_smoothing={self.label_smoothing}"


def build_loss(kind: str, class_weights: torch.Tensor | None, gamma: float = 2.0,
               label_smoothing: float = 0.0) -> nn.Module:
    """The training loss of a config.

    Args:
        kind: "ce" or "focal".
        class_weights: per-class weights (cross-entropy ``weight``, focal ``alpha``), or None.
        gamma: focal loss gamma.
        label_smoothing: label smoothing for either loss.
    """
    if kind == "ce":
        return nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)
    if kind == "focal":
        return FocalLoss(gamma, class_weights, label_smoothing)
    raise ValueError(f"unknown loss {kind!r}; use ce or focal")
