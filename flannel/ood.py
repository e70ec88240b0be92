"""Out-of-distribution score from a model's own features: the Mahalanobis distance of its
penultimate-layer features to the nearest training class (Lee et al., 2018).

    python -c "from flannel.ood import fit_mahalanobis; help(fit_mahalanobis)"

Fitted on the training split: one mean per class and one shared covariance, shrunk towards a
scaled identity (Ledoit-Wolf) because a few hundred radiographs cannot estimate a 1,024-dimension
covariance alone. The score is ``min_c (f - mu_c)^T S^-1 (f - mu_c) / D``: squared distance per
feature dimension, so members of different widths weigh alike when an ensemble averages them.
It is computed inside the exported graph (``MahalanobisDistance``) from buffers, so every backend
serves it and every gate compares it. The served ``ood_score`` is that distance divided by the
threshold set on the validation split (``threshold_for``): at most 1 passes as a chest radiograph
like the training ones, above 1 does not.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

# The share of in-distribution (validation) images the threshold lets pass (the issue's >= 95%).
TARGET_PASS_RATE = 0.95
# Relative room above the highest validation score when every one passes: far above fp32
# rounding (1e-7) and below anything that would change what passes.
TOP_MARGIN = 1e-3


class MahalanobisDistance(nn.Module):
    """``min_c ||(f - mu_c) W||^2 / D`` for features f (N, D); ``W W^T`` is the shared precision.

    Unfitted (all buffers zero) it returns 0 for every image. ``center`` holds ``mu W`` so one
    (N, D) x (D, D) product serves every class.
    """

    def __init__(self, num_classes: int, feature_dim: int) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.register_buffer("whitening", torch.zeros(feature_dim, feature_dim))
        self.register_buffer("center", torch.zeros(num_classes, feature_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = (features @ self.whitening)[:, None, :] - self.center[None]
        return (z * z).sum(dim=2).amin(dim=1) / self.feature_dim

    def load_fit(self, means: np.ndarray, whitening: np.ndarray) -> None:
        """Set the buffers from ``fit_mahalanobis``'s class means (C, D) and whitening (D, D)."""
        w = torch.as_tensor(whitening, dtype=torch.float64)
        self.whitening.copy_(w.float())
        self.center.copy_((torch.as_tensor(means, dtype=torch.float64) @ w).float())


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray,
                    num_classes: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Class means and the whitening of the shared, Ledoit-Wolf-shrunk covariance.

    Args:
        features: (N, D) penultimate features of the training split.
        labels: (N,) class indices.
        num_classes: C; a class without training images keeps a mean at infinity's stand-in
            (the overall mean), so it never attracts an image more than the others do.

    Returns:
        means (C, D), whitening W (D, D) with ``W W^T`` the precision, and the shrinkage used.
    """
    from sklearn.covariance import ledoit_wolf

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(y) or len(x) < 2:
        raise ValueError(f"need (N, D) features with N >= 2 and N labels; got {x.shape} and "
                         f"{y.shape}")
    overall = x.mean(axis=0)
    means = np.stack([x[y == c].mean(axis=0) if np.any(y == c) else overall
                      for c in range(num_classes)])
    centred = x - means[y]
    covariance, shrinkage = ledoit_wolf(centred, assume_centered=True)
    values, vectors = np.linalg.eigh(covariance)
    # Shrinkage keeps every eigenvalue positive; the floor only guards round-off.
    values = np.maximum(values, values.max() * 1e-12)
    return means, vectors / np.sqrt(values), float(shrinkage)


def threshold_for(scores: np.ndarray, pass_rate: float = TARGET_PASS_RATE) -> float:
    """A threshold that lets exactly the ``ceil(pass_rate * N)`` lowest ``scores`` pass (``<=``):
    midway between the last of them and the next score, so that no backend's rounding of a
    validation image's score moves it across (above the highest score: ``TOP_MARGIN`` more)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if s.size == 0:
        raise ValueError("no scores to set a threshold on")
    k = min(max(int(np.ceil(pass_rate * s.size)) - 1, 0), s.size - 1)
    upper = s[k + 1] if k + 1 < s.size else s[k] * (1.0 + 2 * TOP_MARGIN)
    return float((s[k] + upper) / 2)
