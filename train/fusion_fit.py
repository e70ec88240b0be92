"""Fitting FLANNEL's fusion on cached learner probabilities, and the baselines beside it.

    python -c "from flannel.train.fusion_fit import fit_fusion; help(fit_fusion)"

The neural weight module (``flannel.fusion``) is fitted full-batch with Adam on the focal loss of
its fused probabilities. ``FocalLoss`` takes logits; the log of a probability vector is a valid
logit vector whose softmax is the vector itself, so passing ``log(fused)`` applies no second
softmax (the reference code's defect). The loss is a mean over items, and the per-class alpha is
FLANNEL's inverse class frequency (normalised to mean 1). Gamma is chosen by stratified k-fold
cross-validation inside the fitting split, by macro-F1; FLANNEL's gamma = 10 is reported beside it.

Baselines on the same probabilities: the mean of the learners, their majority vote (ties go to the
class with the higher mean probability), and stacking (multinomial logistic regression on the
concatenated probabilities).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from flannel.fusion import NeuralWeightModule
from flannel.metrics import classification_metrics
from flannel.train.losses import FocalLoss, inverse_frequency

log = logging.getLogger(__name__)
FLANNEL_GAMMA = 10.0
GAMMA_GRID = (0.0, 1.0, 2.0, 5.0, FLANNEL_GAMMA)
# Full-batch Adam: a few hundred steps fit a (L*C)^2 x L linear layer on a few hundred items in
# well under a second; weight decay keeps it near the mean-of-learners start on small splits.
FIT_STEPS = 300
FIT_LR = 0.01
FIT_WEIGHT_DECAY = 1e-3
CV_FOLDS = 5
PROB_FLOOR = 1e-7  # log(0) guard for learners that are certain


@dataclass
class FusionFit:
    """A fitted fusion and how gamma was chosen."""

    module: NeuralWeightModule
    gamma: float
    alpha: list[float]
    cv_macro_f1: dict[str, float] = field(default_factory=dict)
    final_loss: float = 0.0


def fusion_loss(fused: torch.Tensor, target: torch.Tensor, gamma: float,
                alpha: torch.Tensor | None) -> torch.Tensor:
    """Mean focal loss of fused probabilities (no second softmax)."""
    return FocalLoss(gamma, alpha)(torch.log(fused.clamp_min(PROB_FLOOR)), target)


def fit_module(probs: np.ndarray, targets: np.ndarray, gamma: float, alpha: torch.Tensor,
               seed: int = 0, steps: int = FIT_STEPS) -> tuple[NeuralWeightModule, float]:
    """Fit one neural weight module on (N, L, C) probabilities."""
    torch.manual_seed(seed)
    n, learners, classes = probs.shape
    module = NeuralWeightModule(learners, classes)
    x, y = torch.from_numpy(probs).float(), torch.from_numpy(targets).long()
    optimizer = torch.optim.Adam(module.parameters(), lr=FIT_LR, weight_decay=FIT_WEIGHT_DECAY)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = fusion_loss(module(x)[0], y, gamma, alpha)
        loss.backward()
        optimizer.step()
    return module.eval(), float(loss.detach())


def stratified_folds(targets: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """A fold id per item, each class dealt round-robin after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(targets), dtype=int)
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        rng.shuffle(idx)
        fold[idx] = np.arange(len(idx)) % k
    return fold


def _macro_f1(targets: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    names = [str(i) for i in range(num_classes)]
    return classification_metrics(targets, pred, names, normal_class=None)["macro_f1"]


def cv_macro_f1(probs: np.ndarray, targets: np.ndarray, gamma: float, alpha: torch.Tensor,
                k: int = CV_FOLDS, seed: int = 0) -> float:
    """Macro-F1 of out-of-fold fusion predictions over a stratified k-fold of the fitting split."""
    folds = stratified_folds(targets, k, seed)
    pred = np.zeros(len(targets), dtype=int)
    for f in range(k):
        held = folds == f
        if not held.any() or held.all():
            continue
        module, _ = fit_module(probs[~held], targets[~held], gamma, alpha, seed)
        with torch.no_grad():
            pred[held] = module(torch.from_numpy(probs[held]).float())[0].argmax(1).numpy()
    return _macro_f1(targets, pred, probs.shape[2])


def fit_fusion(probs: np.ndarray, targets: np.ndarray, gammas: Sequence[float] | None = None,
               seed: int = 0) -> FusionFit:
    """Choose gamma by cross-validation on the fitting split, then fit on all of it.

    Args:
        probs: (N, L, C) learner probabilities of the fitting split.
        targets: (N,) class indices.
        gammas: candidate gammas (default ``GAMMA_GRID``); one value skips the cross-validation.
        seed: seeds folds and fitting.

    Returns:
        The fitted module, the chosen gamma, alpha, and the CV macro-F1 of every gamma.
    """
    if len(targets) == 0:
        raise ValueError("the fitting split is empty: the fusion has nothing to learn from")
    gammas = tuple(GAMMA_GRID if gammas is None else gammas)
    alpha = inverse_frequency(targets.tolist(), probs.shape[2])
    scores: dict[str, float] = {}
    if len(gammas) > 1:
        for g in gammas:
            scores[f"{g:g}"] = cv_macro_f1(probs, targets, g, alpha, seed=seed)
            log.info("fusion gamma %g: %d-fold CV macro-F1 %.4f", g, CV_FOLDS, scores[f"{g:g}"])
        # Best CV macro-F1; ties go to the smaller gamma (the simpler loss).
        gamma = min(gammas, key=lambda g: (-scores[f"{g:g}"], g))
    else:
        gamma = gammas[0]
    module, loss = fit_module(probs, targets, gamma, alpha, seed)
    log.info("fusion fitted with gamma %g on %d items (final loss %.4f)", gamma, len(targets), loss)
    return FusionFit(module, float(gamma), alpha.tolist(), scores, loss)


def fused_outputs(module: NeuralWeightModule, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fused probabilities (N, C), learner weights (N, L)) of cached probabilities."""
    with torch.no_grad():
        fused, weights = module(torch.from_numpy(probs).float())
    return fused.numpy(), weights.numpy()


def mean_probs(probs: np.ndarray) -> np.ndarray:
    return probs.mean(axis=1)


def majority_vote(probs: np.ndarray) -> np.ndarray:
    """One-hot-like scores: votes per class, plus the mean probability / 2 to break ties."""
    n, learners, classes = probs.shape
    votes = np.zeros((n, classes), dtype=np.float64)
    np.add.at(votes, (np.repeat(np.arange(n), learners), probs.argmax(axis=2).ravel()), 1.0)
    return votes + probs.mean(axis=1) / 2.0


class Stacking:
    """Multinomial logistic regression on the concatenated learner probabilities."""

    def __init__(self, seed: int = 0) -> None:
        from sklearn.linear_model import LogisticRegression
        self.model = LogisticRegression(max_iter=2000, random_state=seed)
        self.num_classes = 0

    def fit(self, probs: np.ndarray, targets: np.ndarray) -> "Stacking":
        self.num_classes = probs.shape[2]
        self.model.fit(probs.reshape(len(probs), -1), targets)
        return self

    def predict_proba(self, probs: np.ndarray) -> np.ndarray:
        """(N, C) probabilities; classes absent from the fitting split get 0."""
        out = np.zeros((len(probs), self.num_classes))
        if len(probs):
            out[:, self.model.classes_] = self.model.predict_proba(probs.reshape(len(probs), -1))
        return out
