"""Records shared by every data stage: one image (``Sample``), one unreadable file (``Problem``),
and the split manifest that fixes which image sits in which split for all later stages.

    python -c "from flannel.data.records import read_manifest; print(len(read_manifest('data/manifest.csv')))"
"""
from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, fields
from pathlib import Path

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    """One image as a reader found it.

    Attributes:
        path: absolute path of the file.
        finding: canonical finding (see ``flannel.labels.FINDINGS``).
        source: reader that found it ("muhammedtalo", "radiography", "ieee8023", "kaggle").
        patient_id: patient identifier, namespaced by source; the file stem when unknown.
        patient_known: False when the source gives no patient and each image is its own patient.
    """

    path: str
    finding: str
    source: str
    patient_id: str
    patient_known: bool


@dataclass(frozen=True)
class Problem:
    """A file that was found but cannot be used, and why. Reported, never dropped silently."""

    path: str
    reason: str


@dataclass(frozen=True)
class ManifestRow:
    """One line of the split manifest.

    ``fold`` is the patient-level cross-validation fold (0..K-1) written by
    ``flannel data split --folds K``; -1 when the manifest has no folds.
    """

    path: str
    label: str
    finding: str
    source: str
    patient_id: str
    patient_known: bool
    split: str
    fold: int = -1


def resolve_path(path: str | Path, *bases: Path) -> Path:
    """A path as written, or relative to the first base folder where it exists (manifests and
    configs record paths relative to where they were written)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return next((b / p for b in bases if (b / p).exists()), p)


def write_manifest(rows: list[ManifestRow], path: str | Path) -> Path:
    """Write the manifest CSV (header + one row per image), sorted for stable diffs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f.name for f in fields(ManifestRow)]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=names)
        writer.writeheader()
        for row in sorted(rows, key=lambda r: (SPLITS.index(r.split), r.label, r.path)):
            writer.writerow(asdict(row))
    return path


def read_manifest(path: str | Path, split: str | None = None) -> list[ManifestRow]:
    """Read a manifest CSV; optionally keep one split."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split manifest not found: {path} (run `flannel data split`)")
    with path.open(newline="") as fh:
        # Manifests written before folds existed have no ``fold`` column.
        rows = [ManifestRow(**{**r, "patient_known": r["patient_known"] == "True",
                               "fold": int(r.get("fold") or -1)})
                for r in csv.DictReader(fh)]
    for r in rows:
        if r.split not in SPLITS:
            raise ValueError(f"{path}: row {r.path} has unknown split {r.split!r}")
    return [r for r in rows if split is None or r.split == split]
