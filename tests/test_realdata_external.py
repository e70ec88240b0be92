"""The shared external sets (Hannover COVID-19, OpenIST normals): readers, duplicates, evaluation.

Skipped when ``../shared/datasets/external-cxr`` is absent (it is never committed).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from flannel.data.dedup import merge_duplicate_patients
from flannel.data.readers import detect_layout, read_dataset, read_hannover, read_openist

EXTERNAL = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "external-cxr"
HANNOVER = EXTERNAL / "hannover-covid19"
OPENIST = EXTERNAL / "openist-normal"

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not EXTERNAL.is_dir(), reason=f"external dataset not found at {EXTERNAL}"),
]


def test_hannover_243_covid_images_of_71_patients():
    assert detect_layout(HANNOVER) == "hannover"
    result = read_hannover(HANNOVER)
    assert len(result.samples) == 243 and result.problems == [] and not result.skipped
    assert {s.finding for s in result.samples} == {"covid19"}
    assert len({s.patient_id for s in result.samples}) == 71
    assert all(s.patient_known and s.patient_id.startswith("hannover:") for s in result.samples)


def test_openist_275_normals_masks_skipped():
    assert detect_layout(OPENIST) == "openist"
    result = read_openist(OPENIST)
    assert len(result.samples) == 275 and result.problems == []
    assert dict(result.skipped) == {"lung mask (@.png)": 275}
    assert len({s.patient_id for s in result.samples}) == 275


@pytest.mark.slow
def test_the_byte_identical_openist_pair_becomes_one_patient():
    ds = read_dataset([HANNOVER, OPENIST], "3class")
    assert ds.class_counts() == {"COVID-19": 243, "Normal": 275, "Pneumonia": 0}
    merged, report = merge_duplicate_patients(ds.samples, progress=False)
    assert report.problems == [] and len(merged) == 518
    assert len(report.exact_groups) == 1 and report.near_groups == []
    pair = report.exact_groups[0]
    assert all("openist-normal" in p for p in pair)
    assert len({s.patient_id for s in merged if s.path in pair}) == 1
    assert report.changed == 1


@pytest.mark.slow
def test_evaluate_reports_pneumonia_as_not_externally_validated(tmp_path):
    import torch

    from flannel.checkpoint import Checkpoint, save_checkpoint
    from flannel.preprocess import PreprocessSpec
    from flannel.registry import build_model
    from flannel.train.external import evaluate_external

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "best.pt", Checkpoint(
        arch="resnet18", class_names=["COVID-19", "Normal", "Pneumonia"],
        preprocess=PreprocessSpec.for_input_size(64),
        state_dict=build_model("resnet18", 3).state_dict(), config={"scheme": "3class"}))
    r = evaluate_external(tmp_path, [HANNOVER, OPENIST], name="external-cxr")
    support = {c: m["support"] for c, m in r["metrics"]["per_class"].items()}
    assert support == {"COVID-19": 243, "Normal": 275, "Pneumonia": 0}
    assert r["recall_summary"]["not_externally_validated"] == ["Pneumonia"]
    assert r["recall_summary"]["covid_normal_mean_recall"] is not None
    assert (tmp_path / "external" / "external-cxr" / "report.md").is_file()
