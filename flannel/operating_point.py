"""Operating points: per-class thresholds chosen on the validation split so that targets a
clinician states ("COVID-19 sensitivity at least 0.95") hold, and patient-level bootstrap
intervals for the sensitivity and specificity that result.

    python -c "import flannel.operating_point as o; help(o.choose_operating_point)"

Targets are written ``CLASS:METRIC>=BOUND``, one per class, METRIC being ``sensitivity`` or
``specificity``: ``"COVID-19:sensitivity>=0.95"`` (miss at most 5% of COVID-19 images),
``"Normal:specificity>=0.95"`` (call at most 5% of sick images Normal).

The decision rule. Every class has a threshold; a class without a target has threshold 0.

1. Rule in for safety. The classes with a sensitivity target are checked in the order the
   targets were stated; the first whose probability is at or above its threshold is the answer.
2. Otherwise the answer is the most probable of the eligible classes: every class without a
   target, and each class with a specificity target whose probability is at or above its
   threshold (a specificity target limits when its class may be called). A class with a
   sensitivity target is not eligible here: it had its chance in step 1.
3. If no class is eligible, the answer is the most probable class, marked not cleared.

With no targets this is the most probable class, every image cleared.

How thresholds are chosen. Targets are taken in the order they were stated. For each, every
candidate threshold (the distinct probabilities of its class on the split, and 0) is tried with
the whole rule above, the thresholds already chosen, and the targets still to come left out. A
sensitivity target takes the largest threshold that meets it (fewest false calls), a specificity
target the smallest (most true calls). A later threshold can still move an earlier target (a
class with a sensitivity target is never eligible in step 2, so a specificity target stated
before it can lose), so the finished rule is checked on the split. If it misses a target, the
thresholds are chosen again with each target still to come given the role that can only lower
the figure being tried; no later choice can then undo an earlier one, at the price of refusing
some targets the first pass meets. The figures the finished rule reaches are kept in
``achieved``; targets no pass meets are refused with the reason.

Bootstrap intervals resample patients, not images: images of one patient are alike, so
resampling them one by one understates how much a figure would move on other patients.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from flannel.quoting import quote

METRICS = ("sensitivity", "specificity")
TARGET_FORM = "CLASS:METRIC>=BOUND"
TARGET_EXAMPLE = "COVID-19:sensitivity>=0.95"
# Bootstrap replicates are drawn in blocks of at most this many (replicate, patient) draws (32 MB
# of int64), so thousands of replicates of a split with many patients do not need gigabytes.
DRAW_CELLS = 4_000_000


@dataclass(frozen=True)
class Target:
    """One stated target: ``metric`` of ``class_name`` at least ``bound``."""

    class_name: str
    metric: str
    bound: float

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"target metric {quote(self.metric)}: use {' or '.join(METRICS)}")
        if not 0.0 < self.bound <= 1.0:  # also refuses nan
            raise ValueError(f"target bound must lie in (0, 1]; got {quote(self.bound)}")

    def __str__(self) -> str:
        return f"{self.class_name}:{self.metric}>={self.bound!r}"


def parse_target(text: str, class_names: Sequence[str]) -> Target:
    """One target from ``CLASS:METRIC>=BOUND``.

    Args:
        text: e.g. ``"COVID-19:sensitivity>=0.95"``; the class is everything before the last
            colon, so class names may hold colons.
        class_names: the model's classes.

    Raises:
        ValueError: bad syntax, an unknown class or metric, or a bound outside (0, 1].
    """
    name, colon, rule = str(text).rpartition(":")
    metric, ge, bound_text = rule.partition(">=")
    name, metric = name.strip(), metric.strip().lower()
    if not colon or not ge or not name:
        raise ValueError(f"target {quote(text)}: write {TARGET_FORM}, e.g. {TARGET_EXAMPLE!r}")
    if name not in class_names:
        raise ValueError(f"target {quote(text)}: unknown class {quote(name)}; "
                         f"the classes are {', '.join(class_names)}")
    if metric not in METRICS:
        raise ValueError(f"target {quote(text)}: unknown metric {quote(metric)}; "
                         f"use {' or '.join(METRICS)}")
    try:
        bound = float(bound_text)
    except ValueError:
        raise ValueError(f"target {quote(text)}: the bound {quote(bound_text.strip())} "
                         "is not a number") from None
    if not 0.0 < bound <= 1.0:  # also refuses nan
        raise ValueError(f"target {quote(text)}: the bound must lie in (0, 1]; got {bound!r}")
    return Target(name, metric, bound)


def parse_targets(texts: Sequence[str] | str, class_names: Sequence[str]) -> list[Target]:
    """Targets from ``CLASS:METRIC>=BOUND`` texts, in the order given (that order matters).

    Args:
        texts: one text or several.
        class_names: the model's classes.

    Returns:
        The targets, in the order given.

    Raises:
        ValueError: as ``parse_target``, or a class given two targets.
    """
    if isinstance(texts, str):
        texts = [texts]
    targets: list[Target] = []
    for text in texts:
        target = parse_target(text, class_names)
        if any(t.class_name == target.class_name for t in targets):
            raise ValueError(f"target {quote(text)}: class {quote(target.class_name)} already has "
                             "a target; state one per class")
        targets.append(target)
    return targets


def _decide(p: np.ndarray, thresholds: np.ndarray, sensitivity: Sequence[int],
            specificity: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The decision rule of the module docstring.

    Args:
        p: (N, C) probabilities.
        thresholds: (C,) thresholds.
        sensitivity: classes with a sensitivity target, in stated order.
        specificity: classes with a specificity target.

    Returns:
        (decisions, cleared), each (N,).
    """
    reached = p >= thresholds
    decided = np.full(len(p), -1, dtype=np.int64)
    for k in sensitivity:
        decided[(decided < 0) & reached[:, k]] = k
    role_free = np.ones(p.shape[1], dtype=bool)
    role_free[list(sensitivity) + list(specificity)] = False
    restricted = np.zeros(p.shape[1], dtype=bool)
    restricted[list(specificity)] = True
    eligible = role_free | (restricted & reached)
    best_eligible = np.where(eligible, p, -np.inf).argmax(axis=1)
    any_eligible = eligible.any(axis=1)
    decisions = np.where(decided >= 0, decided,
                         np.where(any_eligible, best_eligible, p.argmax(axis=1)))
    return decisions, (decided >= 0) | any_eligible


def _roles(targets: Sequence[Target], class_names: Sequence[str]) -> tuple[list[int], list[int]]:
    index = {name: i for i, name in enumerate(class_names)}
    return ([index[t.class_name] for t in targets if t.metric == "sensitivity"],
            [index[t.class_name] for t in targets if t.metric == "specificity"])


def _as_probabilities(probabilities: np.ndarray, classes: int) -> np.ndarray:
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != classes:
        raise ValueError(f"probabilities must be (images, {classes}); got shape {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError("probabilities must be finite")
    return p


@dataclass(frozen=True)
class OperatingPoint:
    """Per-class thresholds and the rule that turns probabilities into one decision per image.

    Attributes:
        class_names: names in index order.
        targets: the targets, in stated order.
        thresholds: {class: threshold}, 0 for a class without a target.
        achieved: {str(target): value the rule reached on the split it was chosen on}.
        images: images of that split.
    """

    class_names: tuple[str, ...]
    targets: tuple[Target, ...] = ()
    thresholds: dict[str, float] = field(default_factory=dict)
    achieved: dict[str, float] = field(default_factory=dict)
    images: int = 0

    def __post_init__(self) -> None:
        named = [t.class_name for t in self.targets]
        if len(set(named)) != len(named) or not set(named) <= set(self.class_names):
            raise ValueError(f"targets must name distinct classes of {list(self.class_names)}; "
                             f"got {[quote(n) for n in named]}")
        if not set(self.thresholds) <= set(self.class_names):
            raise ValueError(f"thresholds name classes outside {list(self.class_names)}")

    def threshold_vector(self) -> np.ndarray:
        return np.array([self.thresholds.get(name, 0.0) for name in self.class_names])

    def decide(self, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One decision per image by the rule of the module docstring.

        Args:
            probabilities: (N, C) calibrated class probabilities.

        Returns:
            (decisions, cleared): (N,) class indices, and (N,) bool, False where no class was
            eligible and the decision fell back to the most probable class.
        """
        p = _as_probabilities(probabilities, len(self.class_names))
        return _decide(p, self.threshold_vector(), *_roles(self.targets, self.class_names))

    def to_dict(self) -> dict:
        return {"class_names": list(self.class_names),
                "targets": [{"class_name": t.class_name, "metric": t.metric, "bound": t.bound}
                            for t in self.targets],
                "thresholds": dict(self.thresholds), "achieved": dict(self.achieved),
                "images": self.images}

    @classmethod
    def from_dict(cls, data: dict) -> "OperatingPoint":
        return cls(tuple(data["class_names"]),
                   tuple(Target(t["class_name"], t["metric"], float(t["bound"]))
                         for t in data.get("targets", ())),
                   {k: float(v) for k, v in data.get("thresholds", {}).items()},
                   {k: float(v) for k, v in data.get("achieved", {}).items()},
                   int(data.get("images", 0)))


def _target_values(decisions: np.ndarray, labels: np.ndarray, k: int, metric: str) -> float:
    """Sensitivity or specificity of class k."""
    mine = labels == k
    if metric == "sensitivity":
        return (decisions[mine] == k).sum() / mine.sum()
    return (decisions[~mine] != k).sum() / (~mine).sum()


def _scan(p: np.ndarray, labels: np.ndarray, base: np.ndarray, k: int, candidates: np.ndarray,
          roles: tuple[list[int], list[int]], metric: str) -> np.ndarray:
    """The target's value at each candidate threshold of class k, the others held at ``base``.

    Between candidates only whether p_k reaches its threshold changes, so each image has one
    decision when it does and one when it does not; the value at a threshold counts the good
    decisions of the images at or above it and of those below, read off cumulative sums.
    """
    counted = labels == k if metric == "sensitivity" else labels != k
    good = []
    for threshold in (-math.inf, math.inf):  # p_k always reaches it, never reaches it
        thresholds = base.copy()
        thresholds[k] = threshold
        decisions, _ = _decide(p, thresholds, *roles)
        good.append(counted & ((decisions == k) == (metric == "sensitivity")))
    order = np.argsort(p[:, k], kind="stable")
    reaching, missing = good[0][order], good[1][order]
    at_or_above = np.append(np.cumsum(reaching[::-1])[::-1], 0)  # [j]: sum of reaching[j:]
    below = np.insert(np.cumsum(missing), 0, 0)                   # [j]: sum of missing[:j]
    first = np.searchsorted(p[order, k], candidates, side="left")
    return (at_or_above[first] + below[first]) / counted.sum()


def _scan_setting(targets: Sequence[Target], i: int, chosen: dict[str, float],
                  class_names: Sequence[str], guarded: bool
                  ) -> tuple[np.ndarray, tuple[list[int], list[int]]]:
    """Thresholds and roles while target i is tried (see "How thresholds are chosen").

    Unguarded, the targets after i are left out. Guarded, they get the role that can only lower
    the figure tried. For a sensitivity target that is still leaving them out: their classes are
    then always eligible, so step 3 never runs and the class is called by step 1 alone, which no
    later target can change. For a specificity target it is a threshold no image reaches: no
    later class can then take an image from step 2 by being called in step 1 or by being
    eligible, so the class is called on every image any later thresholds could let it have.
    """
    if not guarded or targets[i].metric == "sensitivity":
        base = np.array([chosen.get(name, 0.0) for name in class_names])
        return base, _roles(targets[:i + 1], class_names)
    targeted = {t.class_name for t in targets}
    base = np.array([chosen.get(name, math.inf) if name in targeted else 0.0
                     for name in class_names])
    return base, _roles(targets, class_names)


def _check_labels(labels: np.ndarray, images: int, classes: int) -> None:
    if labels.ndim != 1 or len(labels) != images:
        raise ValueError(f"{labels.shape} labels for {images} images")
    if images < 1:
        raise ValueError("an operating point needs at least one labelled image")
    _check_indices(labels, classes, "labels")


def _check_indices(indices: np.ndarray, classes: int, what: str) -> None:
    if len(indices) and (not np.issubdtype(indices.dtype, np.integer) or indices.min() < 0
                         or indices.max() >= classes):
        raise ValueError(f"{what} must be class indices in [0, {classes})")


def _choose_threshold(p: np.ndarray, labels: np.ndarray, targets: Sequence[Target], i: int,
                      chosen: dict[str, float], class_names: Sequence[str], guarded: bool
                      ) -> float:
    target = targets[i]
    k = list(class_names).index(target.class_name)
    counted = labels == k if target.metric == "sensitivity" else labels != k
    if not counted.any():
        which = "no images" if target.metric == "sensitivity" else "only images"
        raise ValueError(f"target {target}: the split has {which} of {target.class_name}, so "
                         f"its {target.metric} is undefined there")
    candidates = np.unique(np.append(p[:, k], 0.0))
    base, roles = _scan_setting(targets, i, chosen, class_names, guarded)
    values = _scan(p, labels, base, k, candidates, roles, target.metric)
    meets = np.flatnonzero(values >= target.bound)
    if not len(meets):
        best = int(np.argmax(values))
        after = f" after the {i} target(s) stated before it" if i else ""
        raise ValueError(f"target {target} cannot be met on this split{after}: the best "
                         f"{target.metric} reachable is {values[best]:.4f} "
                         f"(threshold {candidates[best]:.6g})")
    return float(candidates[meets[-1] if target.metric == "sensitivity" else meets[0]])


def _choose_thresholds(p: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                       targets: tuple[Target, ...], guarded: bool
                       ) -> tuple[dict[str, float], dict[str, float]]:
    """One pass in stated order: (thresholds, value of each target under the finished rule)."""
    chosen: dict[str, float] = {}
    for i, target in enumerate(targets):
        chosen[target.class_name] = _choose_threshold(p, labels, targets, i, chosen,
                                                      class_names, guarded)
    thresholds = {name: chosen.get(name, 0.0) for name in class_names}
    decisions, _ = OperatingPoint(tuple(class_names), targets, thresholds).decide(p)
    index = {name: c for c, name in enumerate(class_names)}
    return thresholds, {str(t): float(_target_values(decisions, labels, index[t.class_name],
                                                     t.metric)) for t in targets}


def _missed(targets: Sequence[Target], achieved: dict[str, float]) -> list[Target]:
    return [t for t in targets if achieved[str(t)] < t.bound]


def choose_operating_point(probabilities: np.ndarray, labels: np.ndarray,
                           class_names: Sequence[str], targets: Sequence[Target]
                           ) -> OperatingPoint:
    """Choose per-class thresholds on a labelled split (validation) so every target holds there.

    Args:
        probabilities: (N, C) calibrated class probabilities of that split.
        labels: (N,) true class indices.
        class_names: names in index order.
        targets: from ``parse_targets``, in stated order (at most one per class).

    Returns:
        The operating point, with the value each target reaches on this split in ``achieved``.

    Raises:
        ValueError: bad inputs, a class without images of both kinds (its figure is undefined),
            a target no threshold meets (the message gives the best reachable value), or targets
            that the thresholds chosen after them undo in both passes.
    """
    p = _as_probabilities(probabilities, len(class_names))
    labels = np.asarray(labels)
    _check_labels(labels, len(p), len(class_names))
    targets = tuple(targets)
    OperatingPoint(tuple(class_names), targets)  # refuses targets on unknown or repeated classes
    thresholds, achieved = _choose_thresholds(p, labels, class_names, targets, guarded=False)
    missed = _missed(targets, achieved)
    if missed:
        undone = (f"{missed[0]} is met when its threshold is chosen but reaches "
                  f"{achieved[str(missed[0])]:.4f} once the later thresholds are chosen")
        try:
            thresholds, achieved = _choose_thresholds(p, labels, class_names, targets,
                                                      guarded=True)
        except ValueError as error:
            raise ValueError(f"{undone}, and choosing with room for them fails: {error}") from None
        if _missed(targets, achieved):  # the guarded pass rules this out; refuse all the same
            raise RuntimeError(f"{undone}, and the guarded pass misses a target too")
    return OperatingPoint(tuple(class_names), targets, thresholds, achieved, len(p))


def _one_vs_rest_counts(labels: np.ndarray, decisions: np.ndarray, classes: int) -> np.ndarray:
    """(N, 4, C) indicators per image: true positive, positive, true negative, negative."""
    truth = labels[:, None] == np.arange(classes)
    called = decisions[:, None] == np.arange(classes)
    return np.stack([truth & called, truth, ~truth & ~called, ~truth], axis=1)


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def class_figures(labels: np.ndarray, decisions: np.ndarray,
                  class_names: Sequence[str]) -> dict:
    """One-vs-rest sensitivity, specificity, PPV and NPV of each class.

    Args:
        labels: (N,) true class indices.
        decisions: (N,) decided class indices.
        class_names: names in index order.

    Returns:
        {class: {"sensitivity", "specificity", "ppv", "npv": value or None where undefined
        (e.g. no positives), "support": images of the class}}.
    """
    labels, decisions = np.asarray(labels), np.asarray(decisions)
    if labels.shape != decisions.shape or labels.ndim != 1:
        raise ValueError(f"{labels.shape} labels but {decisions.shape} decisions")
    _check_indices(labels, len(class_names), "labels")
    _check_indices(decisions, len(class_names), "decisions")
    tp, pos, tn, neg = _one_vs_rest_counts(labels, decisions, len(class_names)).sum(axis=0)
    fp, fn = neg - tn, pos - tp
    return {name: {"sensitivity": _ratio(tp[c], pos[c]), "specificity": _ratio(tn[c], neg[c]),
                   "ppv": _ratio(tp[c], tp[c] + fp[c]), "npv": _ratio(tn[c], tn[c] + fn[c]),
                   "support": int(pos[c])}
            for c, name in enumerate(class_names)}


def _replicate_counts(per_patient: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, K) summed counts of the patients each replicate draws (see bootstrap_intervals)."""
    patients = len(per_patient)
    rng = np.random.default_rng(seed)
    block = max(1, DRAW_CELLS // patients)
    out = []
    for start in range(0, n_boot, block):
        rows = min(block, n_boot - start)
        draws = rng.integers(0, patients, size=(rows, patients))
        # How often each replicate drew each patient: one bincount over offset rows.
        offset = draws + patients * np.arange(rows)[:, None]
        times = np.bincount(offset.ravel(), minlength=rows * patients).reshape(rows, patients)
        out.append(times @ per_patient)
    return np.concatenate(out)


def _interval(values: np.ndarray, level: float) -> tuple[float | None, float | None]:
    if not len(values):
        return None, None
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def bootstrap_intervals(labels: np.ndarray, decisions: np.ndarray, patient_ids: Sequence,
                        class_names: Sequence[str], n_boot: int = 2000, seed: int = 0,
                        level: float = 0.95) -> dict:
    """Percentile intervals of each class's sensitivity and specificity, resampling patients.

    Replicate b draws P patients with replacement, row b of
    ``np.random.default_rng(seed).integers(0, P, size=(n_boot, P))`` indexing the sorted distinct
    patient ids, and takes every image of each drawn patient (twice if drawn twice). Replicates
    where a figure is undefined (no positives, or no negatives, drawn) are left out of its
    interval, and the number kept is recorded.

    Args:
        labels: (N,) true class indices.
        decisions: (N,) decided class indices.
        patient_ids: (N,) the patient of each image (any sortable ids).
        class_names: names in index order.
        n_boot: replicates.
        seed: seed of the draws.
        level: the interval's coverage, in (0, 1).

    Returns:
        {class: {metric: {"value": on all images (as ``class_figures``), "low", "high",
        "replicates": replicates kept}}}; None where undefined.
    """
    labels, decisions = np.asarray(labels), np.asarray(decisions)
    patient_ids = np.asarray(patient_ids)
    if not labels.shape == decisions.shape == patient_ids.shape or labels.ndim != 1:
        raise ValueError(f"{labels.shape} labels, {decisions.shape} decisions and "
                         f"{patient_ids.shape} patient ids: give one of each per image")
    if len(labels) < 1 or n_boot < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"need images, n_boot >= 1 and level in (0, 1); got {len(labels)} "
                         f"images, n_boot={n_boot!r}, level={level!r}")
    point = class_figures(labels, decisions, class_names)
    classes = len(class_names)
    _, owner = np.unique(patient_ids, return_inverse=True)
    counts = _one_vs_rest_counts(labels, decisions, classes).reshape(len(labels), -1)
    per_patient = np.zeros((owner.max() + 1, counts.shape[1]))
    np.add.at(per_patient, owner, counts)
    replicates = _replicate_counts(per_patient, n_boot, seed).reshape(n_boot, 4, classes)
    out: dict = {}
    for c, name in enumerate(class_names):
        out[name] = {}
        for metric, (num, den) in (("sensitivity", (0, 1)), ("specificity", (2, 3))):
            kept = replicates[:, den, c] > 0
            low, high = _interval(replicates[kept, num, c] / replicates[kept, den, c], level)
            out[name][metric] = {"value": point[name][metric], "low": low, "high": high,
                                 "replicates": int(kept.sum())}
    return out
