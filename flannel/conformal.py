"""Split conformal prediction sets: for each image, the set of classes that holds the true class
with a stated probability (the coverage), fitted on the calibrated validation split.

    python -c "from flannel.conformal import fit_conformal; help(fit_conformal)"

Each validation image gets a nonconformity score (how badly its probabilities fit its label),
and ``qhat`` is the finite-sample quantile of those scores: the ``ceil((n + 1) * coverage)``-th
smallest of the n scores. A new image's set is every class whose score would be at most ``qhat``.
When the validation images and the new ones are exchangeable (drawn from the same population),
the set holds the true class for at least ``coverage`` of new images, whatever the model; when
``ceil((n + 1) * coverage) > n`` no finite ``qhat`` can promise that, so ``qhat`` is infinite and
every set holds every class (``Conformal.every_class``).

Two scores (``SCORES``):

* ``"lac"`` (least ambiguous set-valued classifier, Sadinle et al. 2019): ``1 - p_true``. The set
  is ``{c : p_c >= 1 - qhat}``: the smallest sets on average, but a set may be empty when no class
  is probable enough, and hard images get sets as small as easy ones.
* ``"aps"`` (adaptive prediction sets, Romano et al. 2020, without randomisation): the mass of
  the classes the model ranks above the true class. The set takes classes, most probable first,
  until their mass exceeds ``qhat`` (a class is in when the mass strictly before it is at most
  ``qhat``): never empty, and larger on images the model is unsure of.

  Romano's score is ``mass above + U * p_true`` with U uniform on [0, 1]; this is U = 0. At
  U = 1 (the mass through the true class) the exactly calibrated set, ``{c : mass through c <=
  qhat}``, is empty whenever the top class alone is above ``qhat``, and the prefix that reaches
  ``qhat`` holds the true class far more often than promised; at U = 0 the never-empty prefix is
  itself the calibrated set. When the top class is right for more than ``coverage`` of images,
  ``qhat`` is 0 and every set is the top class alone: coverage is then the accuracy, and no
  never-empty set can hold less.

Both read probabilities, so they assume the calibrated ones (``flannel.calibration``); the
guarantee holds for any model, but sets from calibrated probabilities are smaller.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from flannel.quoting import quote

SCORES = ("lac", "aps")
# (n + 1) * coverage is often a whole number that binary floating point writes a hair above it
# (100 * 0.56 is 56.00000000000001): a rank within this of a whole number is that whole number,
# so ceil does not ask for one more image than the definition does.
RANK_SLACK = 1e-9


@dataclass(frozen=True)
class Conformal:
    """A fitted conformal predictor.

    Attributes:
        score: "lac" or "aps".
        coverage: the promised share of sets that hold the true class.
        qhat: the score quantile; ``inf`` when too few images were fitted on for the coverage.
        n: images it was fitted on.
    """

    score: str
    coverage: float
    qhat: float
    n: int

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"conformal score {quote(self.score)}: use one of {SCORES}")
        if not 0.0 < self.coverage < 1.0 or math.isnan(self.qhat) or self.n < 1:
            raise ValueError(f"a conformal predictor needs coverage in (0, 1), a qhat and n >= 1; "
                             f"got {quote(self.coverage)}, {quote(self.qhat)}, {quote(self.n)}")

    @property
    def every_class(self) -> bool:
        """True when ``n`` is too small for ``coverage``: every set holds every class."""
        return math.isinf(self.qhat)

    def sets(self, probabilities: np.ndarray) -> np.ndarray:
        """The prediction set of each image.

        Args:
            probabilities: (N, C) calibrated class probabilities.

        Returns:
            (N, C) bool: ``sets[i, c]`` is True when class c is in image i's set.
        """
        p = _as_probabilities(probabilities)
        if self.every_class:
            return np.ones(p.shape, dtype=bool)
        if self.score == "lac":
            # The score itself compared, not p >= 1 - qhat: the same arithmetic as the fit, so an
            # image whose score equals qhat is in its own set.
            return 1.0 - p <= self.qhat
        order, before = _mass_before(p)
        # A class's APS score is the mass before it, so these are exactly the classes whose score
        # is at most qhat; the most probable class (score 0) is always in.
        inside = before <= self.qhat
        sets = np.empty_like(inside)
        np.put_along_axis(sets, order, inside, axis=1)
        return sets

    def to_dict(self) -> dict:
        """JSON-safe: an infinite ``qhat`` is written as None."""
        return {"score": self.score, "coverage": self.coverage,
                "qhat": None if self.every_class else self.qhat, "n": self.n,
                "every_class": self.every_class}

    @classmethod
    def from_dict(cls, data: dict) -> "Conformal":
        qhat = data["qhat"]
        return cls(str(data["score"]), float(data["coverage"]),
                   math.inf if qhat is None else float(qhat), int(data["n"]))


def _as_probabilities(probabilities: np.ndarray) -> np.ndarray:
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 1:
        raise ValueError(f"probabilities must be (images, classes); got shape {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("probabilities must be finite and within [0, 1]")
    return p


def _mass_before(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Classes by falling probability (ties by index), and the mass strictly before each.

    Returns:
        (order, before), each (N, C) in sorted position: ``order[i, j]`` is the class at position
        j and ``before[i, j]`` the mass of positions 0..j-1 (0 for the top class).
    """
    order = np.argsort(-p, axis=1, kind="stable")
    through = np.cumsum(np.take_along_axis(p, order, axis=1), axis=1)
    before = np.concatenate([np.zeros((len(p), 1)), through[:, :-1]], axis=1)
    return order, before


def conformity_scores(probabilities: np.ndarray, labels: np.ndarray, score: str) -> np.ndarray:
    """The nonconformity score of each image's true class (higher: fits its label worse).

    Args:
        probabilities: (N, C) calibrated class probabilities.
        labels: (N,) true class indices.
        score: "lac" (``1 - p_true``) or "aps" (mass of the classes ranked above the true one).

    Returns:
        (N,) float scores.
    """
    p = _as_probabilities(probabilities)
    labels = np.asarray(labels)
    if score == "lac":
        return 1.0 - p[np.arange(len(p)), labels]
    order, before = _mass_before(p)
    position = np.argmax(order == labels[:, None], axis=1)
    return before[np.arange(len(p)), position]


def conformal_rank(n: int, coverage: float) -> int:
    """The 1-based rank ``ceil((n + 1) * coverage)`` of the score that is ``qhat``.

    Args:
        n: images fitted on.
        coverage: in (0, 1).

    Returns:
        The rank; above ``n`` when no finite quantile gives the coverage.
    """
    rank = (n + 1) * coverage
    nearest = round(rank)
    return int(nearest) if abs(rank - nearest) < RANK_SLACK else math.ceil(rank)


def _check_fit_inputs(p: np.ndarray, labels: np.ndarray, coverage: float, score: str) -> None:
    if score not in SCORES:
        raise ValueError(f"conformal score {quote(score)}: use one of {SCORES}")
    if not 0.0 < coverage < 1.0:
        raise ValueError(f"coverage must be strictly between 0 and 1; got {quote(coverage)}")
    if labels.ndim != 1 or len(labels) != len(p):
        raise ValueError(f"{labels.shape} labels for {p.shape[0]} images of probabilities")
    if len(labels) < 1:
        raise ValueError("conformal prediction needs at least one labelled image to fit on")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be class indices (integers); got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= p.shape[1]:
        raise ValueError(f"labels must lie in [0, {p.shape[1]}) for {p.shape[1]} classes; "
                         f"got {int(labels.min())}..{int(labels.max())}")


def fit_conformal(probabilities: np.ndarray, labels: np.ndarray, coverage: float = 0.9,
                  score: str = "lac") -> Conformal:
    """Fit split conformal prediction sets on a labelled split (validation, never test).

    Args:
        probabilities: (N, C) calibrated class probabilities of that split.
        labels: (N,) true class indices.
        coverage: the share of sets that must hold the true class, in (0, 1).
        score: "lac" or "aps" (see the module docstring).

    Returns:
        The fitted ``Conformal``; its ``qhat`` is ``inf`` when ``ceil((N + 1) * coverage) > N``.

    Raises:
        ValueError: an unknown score, a coverage outside (0, 1), labels that do not match the
            probabilities in number or lie outside the classes, or no images.
    """
    p = _as_probabilities(probabilities)
    labels = np.asarray(labels)
    _check_fit_inputs(p, labels, coverage, score)
    n = len(labels)
    rank = conformal_rank(n, coverage)
    if rank > n:
        return Conformal(score, float(coverage), math.inf, n)
    scores = np.sort(conformity_scores(p, labels, score))
    return Conformal(score, float(coverage), float(scores[rank - 1]), n)


def set_figures(sets: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict:
    """How the prediction sets of a labelled split behave.

    Args:
        sets: (N, C) bool, from ``Conformal.sets``.
        labels: (N,) true class indices.
        class_names: names in index order.

    Returns:
        A JSON-serialisable dict: ``coverage`` (share of sets holding the true class),
        ``mean_size``, ``empty_rate``, ``multi_class_rate`` (sets of two classes or more),
        ``size_histogram`` {size: images} for every size 0..C, ``images``, and ``per_class``
        {name: {"coverage": share or None where the class has no images, "images": n}}.
    """
    sets = np.asarray(sets, dtype=bool)
    labels = np.asarray(labels)
    if sets.ndim != 2 or sets.shape != (len(labels), len(class_names)):
        raise ValueError(f"sets of shape {sets.shape} for {len(labels)} labels and "
                         f"{len(class_names)} classes")
    n = len(labels)
    covered = sets[np.arange(n), labels]
    sizes = sets.sum(axis=1)
    histogram = np.bincount(sizes, minlength=sets.shape[1] + 1)
    per_class = {}
    for c, name in enumerate(class_names):
        mine = labels == c
        per_class[name] = {"coverage": float(covered[mine].mean()) if mine.any() else None,
                           "images": int(mine.sum())}
    return {"coverage": float(covered.mean()) if n else None,
            "mean_size": float(sizes.mean()) if n else None,
            "empty_rate": float((sizes == 0).mean()) if n else None,
            "multi_class_rate": float((sizes > 1).mean()) if n else None,
            "size_histogram": {size: int(count) for size, count in enumerate(histogram)},
            "images": n, "per_class": per_class}
