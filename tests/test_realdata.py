"""The shared real dataset (muhammedtalo/COVID-19, downscaled): counts, patient split, shortcut audit.

Skipped when ``../shared/datasets/covid19-xray-3class`` is absent (it is never committed).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from flannel.data.readers import detect_layout, read_dataset
from flannel.data.split import make_split

DATASET = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "covid19-xray-3class"

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not DATASET.is_dir(), reason=f"shared real dataset not found at {DATASET}"),
]


@pytest.fixture(scope="module")
def dataset():
    return read_dataset([DATASET], "3class")


def test_counts_124_500_500(dataset):
    assert detect_layout(DATASET) == "muhammedtalo"
    assert dataset.class_counts() == {"COVID-19": 124, "Normal": 500, "Pneumonia": 500}
    assert dataset.problems == [] and not dataset.excluded


@pytest.mark.slow
def test_chestxray8_patients_recovered_and_split_has_no_overlap(dataset):
    cxr8 = [s for s in dataset.samples if s.patient_id.startswith("chestxray8:")]
    assert len(cxr8) == 1000 and all(s.patient_known for s in cxr8)
    patients = {s.patient_id for s in cxr8}
    assert len(patients) < 1000  # patients repeat across follow-ups
    rows = make_split(dataset.samples, "3class", seed=1)
    splits_of = defaultdict(set)
    for r in rows:
        splits_of[r.patient_id].add(r.split)
    assert all(len(s) == 1 for s in splits_of.values())
    repeated = [p for p in patients if sum(s.patient_id == p for s in cxr8) > 1]
    assert repeated  # and these multi-image patients stayed whole (checked above)


@pytest.mark.slow
def test_audit_exposes_the_covid_source_shortcut():
    from flannel.data.audit import audit_dataset
    report = audit_dataset(DATASET, "3class")
    s = report.shortcut
    assert s["accuracy"] > s["chance"] + 0.2
    assert s["per_class_auc"]["COVID-19"] > 0.9
    assert any("'COVID-19' is separable by metadata alone" in w for w in report.warnings)
    # The source difference itself: COVID-19 images come in colour modes and formats that no
    # ChestX-ray8 image has.
    assert set(report.formats["COVID-19"]) > {"png"} and set(report.formats["Normal"]) == {"png"}
    assert report.modes["Normal"] == {"L": 500}
