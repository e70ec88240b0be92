"""Patient-level stratified split: no patient in two splits, fractions per class, seeded."""
from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest

from fixtures_data import build_muhammedtalo
from flannel import labels as L
from flannel.data.records import SPLITS, Sample, read_manifest
from flannel.data.split import make_split, split_dataset, split_summary, write_split


def synthetic_samples():
    """600 images: 200 per 3class label, patients with 1 to 4 images, some patients unknown."""
    samples = []
    findings = {"COVID-19": L.COVID19, "Normal": L.NORMAL, "Pneumonia": L.BACTERIAL_PNEUMONIA}
    for label, finding in findings.items():
        n, p = 0, 0
        while n < 200:
            k = min(1 + p % 4, 200 - n)
            for i in range(k):
                samples.append(Sample(f"/d/{label}/{p}_{i}.png", finding, "test",
                                      f"test:{label}-{p}", True))
            n, p = n + k, p + 1
    # A patient with images of two classes (a follow-up that became pneumonia).
    samples.append(Sample("/d/Normal/x_0.png", L.NORMAL, "test", "test:mixed", True))
    samples.append(Sample("/d/Pneumonia/x_1.png", L.BACTERIAL_PNEUMONIA, "test", "test:mixed", True))
    samples += [Sample(f"/d/u/{i}.png", L.COVID19, "other", f"other:{i}", False) for i in range(20)]
    samples.append(Sample("/d/lo.png", L.LUNG_OPACITY, "test", "test:lo", True))  # not in 3class
    return samples


def test_no_patient_in_two_splits_and_excluded_findings_left_out():
    rows = make_split(synthetic_samples(), "3class", seed=1)
    splits_of = defaultdict(set)
    for r in rows:
        splits_of[r.patient_id].add(r.split)
    assert all(len(s) == 1 for s in splits_of.values())
    assert len(rows) == 622 and "/d/lo.png" not in {r.path for r in rows}
    assert {r.split for r in rows} == set(SPLITS)


def test_stratification_close_to_fractions():
    rows = make_split(synthetic_samples(), "3class", seed=3)
    counts = Counter((r.label, r.split) for r in rows)
    for label in ("COVID-19", "Normal", "Pneumonia"):
        total = sum(counts[label, s] for s in SPLITS)
        for split, fraction in zip(SPLITS, (0.8, 0.1, 0.1)):
            # Whole patients of up to 4 images move together, so allow a few images either way.
            assert abs(counts[label, split] - fraction * total) <= 5, (label, split, counts)


def test_same_seed_same_rows_different_seed_different_rows(tmp_path):
    samples = synthetic_samples()
    a = make_split(samples, "3class", seed=1)
    b = make_split(list(reversed(samples)), "3class", seed=1)
    c = make_split(samples, "3class", seed=2)
    key = lambda rows: sorted((r.path, r.split) for r in rows)  # noqa: E731
    assert key(a) == key(b)
    assert key(a) != key(c)
    summary = split_summary(a, "3class")
    write_split(a, tmp_path / "a.csv", summary)
    write_split(b, tmp_path / "b.csv", summary)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()


def test_fractions_validated():
    with pytest.raises(ValueError, match="summing to 1"):
        make_split(synthetic_samples(), "3class", fractions=(0.8, 0.3, 0.1))


def test_split_dataset_writes_manifest_and_summary(tmp_path):
    build_muhammedtalo(tmp_path / "data")
    out = split_dataset([tmp_path / "data"], tmp_path / "out" / "manifest.csv", "3class",
                        fractions=(0.6, 0.2, 0.2), seed=1)
    rows = read_manifest(tmp_path / "out" / "manifest.csv")
    assert len(rows) == 9
    summary = json.loads((tmp_path / "out" / "split_summary.json").read_text())
    assert summary == {k: v for k, v in out.items() if k not in ("manifest", "summary")}
    assert summary["images"] == 9 and summary["patients"] == 8  # 00000001 has two images
    assert sum(summary["counts"][s]["COVID-19"] for s in SPLITS) == 3
    assert summary["images_without_known_patient"] == 3
    assert "each such image is its own patient" in summary["patient_note"]
    assert {p["reason"] for p in summary["problems"]} >= {"empty file (0 bytes)"}
    assert len(summary["problems"]) == 2
    same = [r.split for r in rows if r.patient_id == "chestxray8:00000001"]
    assert len(same) == 2 and len(set(same)) == 1


def test_summary_without_unknown_patients_has_no_note():
    rows = make_split([s for s in synthetic_samples() if s.patient_known], "3class")
    summary = split_summary(rows, "3class")
    assert summary["images_without_known_patient"] == 0 and "patient_note" not in summary
