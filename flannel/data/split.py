"""Patient-level, label-stratified, seeded train/val/test split and the manifest that records it.

    flannel data split data/raw/COVID-19 --out data/manifest.csv --scheme 3class --seed 1
    flannel data split data/raw/COVID-19 --out data/manifest.csv --folds 5
    flannel data split data/raw/COVID-19 ../shared/datasets/external-cxr/hannover-covid19 \
        --out data/manifest.csv --holdout-source hannover

No patient sits in two splits (FLANNEL's reference code split per image, so one patient could be in
train and test). Exact and near-duplicate images are first merged into one patient
(``flannel.data.dedup``), so copies of one radiograph under different names stay together. Patients
are grouped by their most frequent class and each group is dealt out so every split gets close to
its fraction of that class's images. Sources without patient ids make each image its own patient;
the summary says so, because images of one person can then still cross splits.

``--folds K`` also deals patients into K stratified cross-validation folds (the ``fold`` column);
``fold_manifest`` turns one fold into the test split. ``--holdout-source`` puts every image of the
named reader sources in test (leave-one-source-out) and splits the rest into train and val.
"""
from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Sequence

from flannel import labels as L
from flannel.data.dedup import DuplicateReport, merge_duplicate_patients
from flannel.data.readers import DatasetRead, read_dataset
from flannel.data.records import SPLITS, ManifestRow, Sample, write_manifest

# Seed 004 split 80/10/10 with seed 1.
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
DEFAULT_SEED = 1
SUMMARY_NAME = "split_summary.json"
# Fewer than 3 folds leaves no training fold once one is test and another validation.
MIN_FOLDS = 3
# The fold dealing draws from its own generator, so adding --folds leaves the train/val/test split
# of a seed unchanged.
_FOLD_SEED_OFFSET = 7919


def _check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != len(SPLITS) or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be {len(SPLITS)} non-negative numbers summing to 1, "
                         f"got {fractions}")
    return fractions


def _patient_groups(samples: Iterable[Sample], labels: Iterable[str], classes: Sequence[str]):
    """patient id -> list of (sample, label), and the stratum (most frequent class) per patient."""
    by_patient: dict[str, list] = defaultdict(list)
    for sample, label in zip(samples, labels):
        by_patient[sample.patient_id].append((sample, label))
    stratum = {}
    for pid, items in by_patient.items():
        counts = Counter(label for _, label in items)
        # Ties go to the class listed first in the scheme, so the choice is stable.
        stratum[pid] = max(classes, key=lambda c: (counts.get(c, 0), -classes.index(c)))
    return by_patient, stratum


def _deal(patients: list[str], sizes: dict[str, int], fractions: Sequence[float],
          rng: random.Random, names: Sequence = SPLITS) -> dict:
    """Assign shuffled patients one by one to the bin (split or fold) furthest below its target.

    Bins with a zero fraction get nobody, however far the others overshoot.
    """
    rng.shuffle(patients)
    # Large patients first (stable for equal sizes after the shuffle): small ones then fill gaps.
    patients.sort(key=lambda p: -sizes[p])
    total = sum(sizes.values())
    targets = [f * total for f in fractions]
    filled = [0] * len(names)
    open_bins = [i for i, f in enumerate(fractions) if f > 0]
    out = {}
    for pid in patients:
        best = max(open_bins, key=lambda i: (targets[i] - filled[i], -i))
        out[pid] = names[best]
        filled[best] += sizes[pid]
    return out


def _deal_by_stratum(by_patient: dict, stratum: dict, classes: Sequence[str],
                     fractions: Sequence[float], rng: random.Random, names: Sequence) -> dict:
    """patient -> bin, each class's patients dealt separately so every bin gets its share."""
    assignment = {}
    for cls in classes:
        patients = sorted(p for p, c in stratum.items() if c == cls)
        sizes = {p: len(by_patient[p]) for p in patients}
        assignment.update(_deal(patients, sizes, fractions, rng, names))
    return assignment


def _holdout_patients(by_patient: dict, holdout_sources: Sequence[str]) -> set[str]:
    """Patients with any image from a held-out source (all their images then go to test)."""
    found = {s.source for items in by_patient.values() for s, _ in items}
    unknown = sorted(set(holdout_sources) - found)
    if unknown:
        raise ValueError(f"--holdout-source {unknown}: no images from that source; "
                         f"sources present: {sorted(found)}")
    return {p for p, items in by_patient.items()
            if any(s.source in holdout_sources for s, _ in items)}


def _check_split_options(fractions, folds: int, holdout_sources: Sequence[str]) -> tuple:
    fractions = _check_fractions(fractions)
    if folds and folds < MIN_FOLDS:
        raise ValueError(f"folds must be 0 (none) or at least {MIN_FOLDS}, got {folds}")
    if folds and holdout_sources:
        raise ValueError("use either folds or a held-out source, not both")
    if holdout_sources:
        kept = fractions[0] + fractions[1]
        if kept <= 0:
            raise ValueError(f"fractions {fractions} leave nothing for train and val")
        fractions = (fractions[0] / kept, fractions[1] / kept, 0.0)
    return fractions


def make_split(samples: Sequence[Sample], scheme: str = L.DEFAULT_SCHEME,
               fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = DEFAULT_SEED, *,
               dedup: bool = True, folds: int = 0,
               holdout_sources: Sequence[str] = ()) -> list[ManifestRow]:
    """Split samples by patient, stratified by label, reproducibly.

    Args:
        samples: samples from the readers; findings the scheme does not use are left out.
        scheme: label scheme name.
        fractions: train, val, test fractions of each class's images.
        seed: shuffling seed; the same seed and samples give the same rows.
        dedup: merge the patients of exact and near-duplicate images first (decodes every file).
        folds: also deal patients into this many stratified CV folds (0: none, ``fold`` = -1).
        holdout_sources: reader sources whose images all go to test; the rest is split into train
            and val with the train and val fractions renormalised.

    Returns:
        One manifest row per kept sample.

    Raises:
        ValueError: bad fractions or folds, an absent held-out source, or (with ``dedup``) files
            that cannot be decoded, listed by path.
    """
    fractions = _check_split_options(fractions, folds, holdout_sources)
    if dedup:
        samples, report = merge_duplicate_patients(samples, progress=False)
        if report.problems:
            listing = "\n".join(f"  {p.path}: {p.reason}" for p in report.problems)
            raise ValueError(f"{len(report.problems)} file(s) cannot be decoded:\n{listing}")
    label_scheme = L.get_scheme(scheme)
    kept = [(s, label_scheme.label_of(s.finding)) for s in samples]
    kept = [(s, lab) for s, lab in kept if lab is not None]
    by_patient, stratum = _patient_groups((s for s, _ in kept), (lab for _, lab in kept),
                                          label_scheme.classes)
    held = _holdout_patients(by_patient, holdout_sources) if holdout_sources else set()
    rest = {p: c for p, c in stratum.items() if p not in held}
    split_of = {p: "test" for p in held}
    split_of.update(_deal_by_stratum(by_patient, rest, label_scheme.classes, fractions,
                                     random.Random(seed), SPLITS))
    fold_of = {}
    if folds:
        fold_of = _deal_by_stratum(by_patient, stratum, label_scheme.classes, [1 / folds] * folds,
                                   random.Random(seed + _FOLD_SEED_OFFSET), range(folds))
    return [ManifestRow(s.path, lab, s.finding, s.source, s.patient_id, s.patient_known,
                        split_of[s.patient_id], fold_of.get(s.patient_id, -1)) for s, lab in kept]


def fold_manifest(manifest_rows: Sequence[ManifestRow], k: int,
                  val_fold: int | None = None) -> list[ManifestRow]:
    """Rows re-assigned for cross-validation fold ``k``: test = fold k, val = the next fold.

    Args:
        manifest_rows: rows of a manifest written with ``--folds K`` (every ``fold`` in 0..K-1).
        k: the test fold.
        val_fold: the validation fold; default ``(k + 1) % K``.

    Returns:
        The same rows with ``split`` set to test (fold k), val (``val_fold``) or train (the rest).

    Raises:
        ValueError: rows without folds, fewer than ``MIN_FOLDS`` folds, or k/val_fold out of range
            or equal.
    """
    folds = {r.fold for r in manifest_rows}
    if not manifest_rows or min(folds) < 0:
        raise ValueError("manifest has rows without a fold; write it with `flannel data split "
                         "--folds K`")
    n = max(folds) + 1
    val_fold = (k + 1) % n if val_fold is None else val_fold
    if n < MIN_FOLDS or not (0 <= k < n and 0 <= val_fold < n) or val_fold == k:
        raise ValueError(f"fold {k} and validation fold {val_fold} must differ and lie in "
                         f"0..{n - 1} ({n} folds, at least {MIN_FOLDS} needed)")
    role = lambda f: "test" if f == k else "val" if f == val_fold else "train"  # noqa: E731
    return [replace(r, split=role(r.fold)) for r in manifest_rows]


def _fold_counts(rows: Sequence[ManifestRow], classes: Sequence[str]) -> dict:
    folds = sorted({r.fold for r in rows if r.fold >= 0})
    counts = {str(f): {c: 0 for c in classes} for f in folds}
    for r in rows:
        if r.fold >= 0:
            counts[str(r.fold)][r.label] += 1
    return counts


def _holdout_summary(rows: Sequence[ManifestRow], holdout_sources: Sequence[str]) -> dict:
    """Which sources were held out, and the test images that came with them through a patient."""
    if not holdout_sources:
        return {"holdout_sources": []}
    held = sum(r.source in holdout_sources for r in rows)
    pulled = sum(r.split == "test" and r.source not in holdout_sources for r in rows)
    note = (f"held out: {', '.join(sorted(holdout_sources))} ({held} images, all in test); "
            f"train and val come from the other sources")
    if pulled:
        note += (f"; {pulled} image(s) of other sources share a (merged) patient with them and "
                 "are in test too")
    return {"holdout_sources": sorted(holdout_sources), "holdout_note": note}


def split_summary(rows: Sequence[ManifestRow], scheme: str, dataset: DatasetRead | None = None,
                  duplicates: DuplicateReport | None = None, **extra) -> dict:
    """Counts per split x class (and per fold), patients, duplicates, and the problems list."""
    classes = L.get_scheme(scheme).classes
    counts = {sp: {c: 0 for c in classes} for sp in SPLITS}
    patients = {sp: set() for sp in SPLITS}
    for r in rows:
        counts[r.split][r.label] += 1
        patients[r.split].add(r.patient_id)
    unknown = sum(not r.patient_known for r in rows)
    summary = {
        "scheme": scheme, **extra, "images": len(rows), "counts": counts,
        "patients": len({r.patient_id for r in rows}),
        "patients_per_split": {sp: len(p) for sp, p in patients.items()},
        "images_without_known_patient": unknown,
    }
    if any(r.fold >= 0 for r in rows):
        summary["fold_counts"] = _fold_counts(rows, classes)
    if unknown:
        summary["patient_note"] = (
            f"{unknown} of {len(rows)} images come from sources without patient ids; each such image "
            "is its own patient, so several images of one person may sit in different splits")
    summary["duplicates"] = duplicates.to_dict() if duplicates else {"checked": False}
    if dataset is not None:
        summary["sources"] = dataset.sources
        summary["excluded_findings"] = dict(dataset.excluded)
        summary["skipped"] = dict(dataset.skipped)
        problems = dataset.problems + (duplicates.problems if duplicates else [])
        summary["problems"] = [{"path": p.path, "reason": p.reason} for p in problems]
    return summary


def write_split(rows: Sequence[ManifestRow], out_csv: str | Path, summary: dict) -> Path:
    """Write the manifest CSV and ``split_summary.json`` beside it; return the summary path."""
    out_csv = write_manifest(list(rows), out_csv)
    path = out_csv.with_name(SUMMARY_NAME)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def split_dataset(roots: Sequence[str | Path], out_csv: str | Path, scheme: str = L.DEFAULT_SCHEME,
                  fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = DEFAULT_SEED, *,
                  dedup: bool = True, folds: int = 0, holdout_sources: Sequence[str] = (),
                  progress: bool = True) -> dict:
    """Read dataset folders, merge duplicates, split them and write manifest + summary.

    Args:
        roots: dataset folders (layouts auto-detected).
        out_csv: manifest path; ``split_summary.json`` is written beside it.
        scheme: label scheme name.
        fractions: train, val, test fractions.
        seed: split seed.
        dedup: merge exact and near-duplicate images into one patient first; files that cannot be
            decoded are then left out and listed with the problems.
        folds: also write this many stratified patient-level CV folds (0: none).
        holdout_sources: reader sources put wholly in test (leave-one-source-out).
        progress: progress bar while hashing images.

    Returns:
        The summary dict (also written to disk), with ``manifest`` and ``summary`` paths.
    """
    _check_split_options(fractions, folds, holdout_sources)
    dataset = read_dataset(roots, scheme)
    samples, duplicates = dataset.samples, None
    if dedup:
        samples, duplicates = merge_duplicate_patients(samples, progress=progress)
    rows = make_split(samples, scheme, fractions, seed, dedup=False, folds=folds,
                      holdout_sources=holdout_sources)
    summary = split_summary(rows, scheme, dataset, duplicates, seed=seed,
                            fractions=list(fractions), folds=folds,
                            **_holdout_summary(rows, holdout_sources))
    summary_path = write_split(rows, out_csv, summary)
    return {**summary, "manifest": str(Path(out_csv)), "summary": str(summary_path)}
