"""Patient-level, label-stratified, seeded train/val/test split and the manifest that records it.

    flannel data split data/raw/COVID-19 --out data/manifest.csv --scheme 3class --seed 1

No patient sits in two splits (FLANNEL's reference code split per image, so one patient could be in
train and test). Patients are grouped by their most frequent class and each group is dealt out so
every split gets close to its fraction of that class's images. Sources without patient ids make each
image its own patient; the summary says so, because near-duplicates of one person can then still
cross splits.
"""
from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Sequence

from flannel import labels as L
from flannel.data.readers import DatasetRead, read_dataset
from flannel.data.records import SPLITS, ManifestRow, Sample, write_manifest

# Seed 004 split 80/10/10 with seed 1.
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
DEFAULT_SEED = 1
SUMMARY_NAME = "split_summary.json"


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


def _deal(patients: list[str], sizes: dict[str, int], fractions: tuple[float, ...],
          rng: random.Random) -> dict[str, str]:
    """Assign shuffled patients one by one to the split furthest below its image target."""
    rng.shuffle(patients)
    # Large patients first (stable for equal sizes after the shuffle): small ones then fill gaps.
    patients.sort(key=lambda p: -sizes[p])
    total = sum(sizes.values())
    targets = [f * total for f in fractions]
    filled = [0] * len(SPLITS)
    out = {}
    for pid in patients:
        best = max(range(len(SPLITS)), key=lambda i: (targets[i] - filled[i], -i))
        out[pid] = SPLITS[best]
        filled[best] += sizes[pid]
    return out


def make_split(samples: Sequence[Sample], scheme: str = L.DEFAULT_SCHEME,
               fractions: Sequence[float] = DEFAULT_FRACTIONS,
               seed: int = DEFAULT_SEED) -> list[ManifestRow]:
    """Split samples by patient, stratified by label, reproducibly.

    Args:
        samples: samples from the readers; findings the scheme does not use are left out.
        scheme: label scheme name.
        fractions: train, val, test fractions of each class's images.
        seed: shuffling seed; the same seed and samples give the same rows.

    Returns:
        One manifest row per kept sample.
    """
    fractions = _check_fractions(fractions)
    label_scheme = L.get_scheme(scheme)
    kept = [(s, label_scheme.label_of(s.finding)) for s in samples]
    kept = [(s, lab) for s, lab in kept if lab is not None]
    by_patient, stratum = _patient_groups((s for s, _ in kept), (lab for _, lab in kept),
                                          label_scheme.classes)
    rng = random.Random(seed)
    assignment: dict[str, str] = {}
    for cls in label_scheme.classes:
        patients = sorted(p for p, c in stratum.items() if c == cls)
        sizes = {p: len(by_patient[p]) for p in patients}
        assignment.update(_deal(patients, sizes, fractions, rng))
    return [ManifestRow(s.path, lab, s.finding, s.source, s.patient_id, s.patient_known,
                        assignment[s.patient_id]) for s, lab in kept]


def split_summary(rows: Sequence[ManifestRow], scheme: str, dataset: DatasetRead | None = None,
                  **extra) -> dict:
    """Counts per split x class, patients, unknown-patient images and the problems list."""
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
    if unknown:
        summary["patient_note"] = (
            f"{unknown} of {len(rows)} images come from sources without patient ids; each such image "
            "is its own patient, so several images of one person may sit in different splits")
    if dataset is not None:
        summary["sources"] = dataset.sources
        summary["excluded_findings"] = dict(dataset.excluded)
        summary["skipped"] = dict(dataset.skipped)
        summary["problems"] = [{"path": p.path, "reason": p.reason} for p in dataset.problems]
    return summary


def write_split(rows: Sequence[ManifestRow], out_csv: str | Path, summary: dict) -> Path:
    """Write the manifest CSV and ``split_summary.json`` beside it; return the summary path."""
    out_csv = write_manifest(list(rows), out_csv)
    path = out_csv.with_name(SUMMARY_NAME)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def split_dataset(roots: Sequence[str | Path], out_csv: str | Path, scheme: str = L.DEFAULT_SCHEME,
                  fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = DEFAULT_SEED) -> dict:
    """Read dataset folders, split them and write manifest + summary.

    Args:
        roots: dataset folders (layouts auto-detected).
        out_csv: manifest path; ``split_summary.json`` is written beside it.
        scheme: label scheme name.
        fractions: train, val, test fractions.
        seed: split seed.

    Returns:
        The summary dict (also written to disk), with ``manifest`` and ``summary`` paths.
    """
    dataset = read_dataset(roots, scheme)
    rows = make_split(dataset.samples, scheme, fractions, seed)
    summary = split_summary(rows, scheme, dataset, seed=seed, fractions=list(fractions))
    summary_path = write_split(rows, out_csv, summary)
    return {**summary, "manifest": str(Path(out_csv)), "summary": str(summary_path)}
