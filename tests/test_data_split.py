"""Patient-level stratified split: no patient in two splits, fractions per class, seeded; CV folds
and leave-one-source-out. ``synthetic_samples`` names files that do not exist: no dedup there."""
from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest

from fixtures_data import build_muhammedtalo
from flannel import labels as L
from flannel.data.records import SPLITS, Sample, read_manifest
from flannel.data.split import (fold_manifest, make_split, split_dataset, split_summary,
                                 write_split)


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
    rows = make_split(synthetic_samples(), "3class", seed=1, dedup=False)
    splits_of = defaultdict(set)
    for r in rows:
        splits_of[r.patient_id].add(r.split)
    assert all(len(s) == 1 for s in splits_of.values())
    assert len(rows) == 622 and "/d/lo.png" not in {r.path for r in rows}
    assert {r.split for r in rows} == set(SPLITS)


def test_stratification_close_to_fractions():
    rows = make_split(synthetic_samples(), "3class", seed=3, dedup=False)
    counts = Counter((r.label, r.split) for r in rows)
    for label in ("COVID-19", "Normal", "Pneumonia"):
        total = sum(counts[label, s] for s in SPLITS)
        for split, fraction in zip(SPLITS, (0.8, 0.1, 0.1)):
            # Whole patients of up to 4 images move together, so allow a few images either way.
            assert abs(counts[label, split] - fraction * total) <= 5, (label, split, counts)


def test_same_seed_same_rows_different_seed_different_rows(tmp_path):
    samples = synthetic_samples()
    a = make_split(samples, "3class", seed=1, dedup=False)
    b = make_split(list(reversed(samples)), "3class", seed=1, dedup=False)
    c = make_split(samples, "3class", seed=2, dedup=False)
    key = lambda rows: sorted((r.path, r.split) for r in rows)  # noqa: E731
    assert key(a) == key(b)
    assert key(a) != key(c)
    summary = split_summary(a, "3class")
    write_split(a, tmp_path / "a.csv", summary)
    write_split(b, tmp_path / "b.csv", summary)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()


def test_fractions_validated():
    with pytest.raises(ValueError, match="summing to 1"):
        make_split(synthetic_samples(), "3class", fractions=(0.8, 0.3, 0.1), dedup=False)


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
    rows = make_split([s for s in synthetic_samples() if s.patient_known], "3class", dedup=False)
    summary = split_summary(rows, "3class")
    assert summary["images_without_known_patient"] == 0 and "patient_note" not in summary


# --- cross-validation folds ------------------------------------------------------------------------
def _largest_patient(samples) -> int:
    return max(Counter(s.patient_id for s in samples).values())


@pytest.mark.parametrize("k", [3, 5])
def test_folds_patient_disjoint_and_stratified(k):
    samples = synthetic_samples()
    rows = make_split(samples, "3class", seed=1, dedup=False, folds=k)
    folds_of = defaultdict(set)
    for r in rows:
        folds_of[r.patient_id].add(r.fold)
    assert all(len(f) == 1 for f in folds_of.values())
    assert {r.fold for r in rows} == set(range(k))
    per_fold = Counter((r.label, r.fold) for r in rows)
    per_class = Counter(r.label for r in rows)
    tolerance = _largest_patient(samples)  # whole patients move together
    for label, total in per_class.items():
        for fold in range(k):
            assert abs(per_fold[label, fold] - total / k) <= tolerance, (label, fold, per_fold)


def test_folds_reproducible_and_leave_the_split_unchanged():
    samples = synthetic_samples()
    key = lambda rows: sorted((r.path, r.split, r.fold) for r in rows)  # noqa: E731
    a = make_split(samples, "3class", seed=4, dedup=False, folds=4)
    b = make_split(list(reversed(samples)), "3class", seed=4, dedup=False, folds=4)
    c = make_split(samples, "3class", seed=5, dedup=False, folds=4)
    plain = make_split(samples, "3class", seed=4, dedup=False)
    assert key(a) == key(b) and key(a) != key(c)
    assert sorted((r.path, r.split) for r in a) == sorted((r.path, r.split) for r in plain)
    assert {r.fold for r in plain} == {-1}


def test_fold_manifest_assigns_test_val_train():
    rows = make_split(synthetic_samples(), "3class", seed=1, dedup=False, folds=5)
    for k in range(5):
        cv = fold_manifest(rows, k)
        assert [r.path for r in cv] == [r.path for r in rows]
        for before, after in zip(rows, cv):
            expected = ("test" if before.fold == k else "val" if before.fold == (k + 1) % 5
                        else "train")
            assert after.split == expected and after.fold == before.fold
    custom = fold_manifest(rows, 4, val_fold=2)
    assert {r.fold for r in custom if r.split == "val"} == {2}
    assert {r.fold for r in custom if r.split == "train"} == {0, 1, 3}


@pytest.mark.parametrize("k, val_fold", [(5, None), (0, 0), (1, 7)])
def test_fold_manifest_refuses_bad_folds(k, val_fold):
    rows = make_split(synthetic_samples(), "3class", seed=1, dedup=False, folds=5)
    with pytest.raises(ValueError, match="must differ and lie in 0..4"):
        fold_manifest(rows, k, val_fold)


def test_fold_manifest_needs_folds_and_folds_need_three():
    with pytest.raises(ValueError, match="--folds K"):
        fold_manifest(make_split(synthetic_samples(), "3class", dedup=False), 0)
    with pytest.raises(ValueError, match="at least 3"):
        make_split(synthetic_samples(), "3class", dedup=False, folds=2)


# --- leave-one-source-out --------------------------------------------------------------------------
def test_holdout_source_goes_to_test_and_the_rest_to_train_val():
    samples = synthetic_samples()
    rows = make_split(samples, "3class", seed=1, dedup=False, holdout_sources=["other"])
    held = [r for r in rows if r.source == "other"]
    rest = [r for r in rows if r.source != "other"]
    assert len(held) == 20 and {r.split for r in held} == {"test"}
    assert {r.split for r in rest} == {"train", "val"}
    # 0.8 / 0.1 renormalised over train + val: 8/9 of every class in train.
    counts = Counter((r.label, r.split) for r in rest)
    for label in ("COVID-19", "Normal", "Pneumonia"):
        total = counts[label, "train"] + counts[label, "val"]
        assert abs(counts[label, "train"] - total * 8 / 9) <= _largest_patient(samples)


def test_holdout_keeps_a_merged_patient_whole():
    samples = synthetic_samples()
    # A duplicate search merged one "test" image into an "other" patient.
    samples.append(Sample("/d/copy.png", L.COVID19, "test", "other:0", False))
    rows = make_split(samples, "3class", seed=1, dedup=False, holdout_sources=["other"])
    assert next(r.split for r in rows if r.path == "/d/copy.png") == "test"


def test_holdout_errors_are_clear():
    with pytest.raises(ValueError, match=r"no images from that source; sources present: "
                                         r"\['other', 'test'\]"):
        make_split(synthetic_samples(), "3class", dedup=False, holdout_sources=["hannover"])
    with pytest.raises(ValueError, match="either folds or a held-out source"):
        make_split(synthetic_samples(), "3class", dedup=False, folds=3, holdout_sources=["other"])


def test_cli_split_holdout_and_folds(tmp_path, capsys):
    from flannel.cli import main
    from test_data_readers import build_hannover

    build_muhammedtalo(tmp_path / "mt")
    build_hannover(tmp_path / "h")
    out = tmp_path / "loso" / "manifest.csv"
    assert main(["data", "split", str(tmp_path / "mt"), str(tmp_path / "h"), "--out", str(out),
                 "--holdout-source", "hannover", "--fractions", "0.6", "0.2", "0.2"]) == 0
    printed = capsys.readouterr().out
    assert "held out: hannover (3 images, all in test)" in printed
    assert "duplicates: 0 exact and 0 near-duplicate group(s)" in printed
    rows = read_manifest(out)
    assert {r.split for r in rows if r.source == "hannover"} == {"test"}
    assert {r.split for r in rows if r.source != "hannover"} <= {"train", "val"}
    summary = json.loads(out.with_name("split_summary.json").read_text())
    assert summary["holdout_sources"] == ["hannover"]

    folds_csv = tmp_path / "cv" / "manifest.csv"
    assert main(["data", "split", str(tmp_path / "mt"), "--out", str(folds_csv), "--folds", "3",
                 "--no-dedup"]) == 0
    assert "duplicates: not checked" in capsys.readouterr().out
    assert {r.fold for r in read_manifest(folds_csv)} == {0, 1, 2}
    assert main(["data", "split", str(tmp_path / "mt"), "--out", str(folds_csv), "--folds", "3",
                 "--holdout-source", "hannover"]) == 2
    assert "either folds or a held-out source" in capsys.readouterr().err
