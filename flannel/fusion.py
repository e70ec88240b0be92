"""FLANNEL's neural weight module: learner probabilities in, one weight per learner, fused out.

    python -c "from flannel.fusion import NeuralWeightModule; print(NeuralWeightModule(5, 3))"

As in FLANNEL (Qi et al. 2020): the L learners' class probabilities (N, L, C) are concatenated to
(N, L*C); their outer product (N, (L*C)^2) goes through one linear layer and a softmax over the
learners, giving weights w (N, L) that sum to 1; the answer is sum_l w_l * p_l, a convex mix of
the learners' probabilities, so it is itself a probability vector and needs no further softmax.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class NeuralWeightModule(nn.Module):
    """Learner probabilities (N, L, C) -> (fused probabilities (N, C), learner weights (N, L)).

    Args:
        num_learners: L.
        num_classes: C.
    """

    def __init__(self, num_learners: int, num_classes: int) -> None:
        super().__init__()
        if num_learners < 1 or num_classes < 2:
            raise ValueError(f"need at least 1 learner and 2 classes, got {num_learners}, "
                             f"{num_classes}")
        self.num_learners, self.num_classes = int(num_learners), int(num_classes)
        width = num_learners * num_classes
        self.linear = nn.Linear(width * width, num_learners)
        # Start from the plain mean of the learners: zero weights give equal softmax weights.
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, learners, classes = probs.shape
        if (learners, classes) != (self.num_learners, self.num_classes):
            raise ValueError(f"expected (N, {self.num_learners}, {self.num_classes}) learner "
                             f"probabilities, got {tuple(probs.shape)}")
        flat = probs.reshape(n, learners * classes)
        outer = (flat.unsqueeze(2) * flat.unsqueeze(1)).reshape(n, -1)
        weights = torch.softmax(self.linear(outer), dim=1)
        fused = (weights.unsqueeze(2) * probs).sum(dim=1)
        return fused, weights
