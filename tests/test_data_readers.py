"""Readers on tiny copies of each public layout: findings, patients, problems, layout detection."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from fixtures_data import (VIETNAM, build_ieee8023, build_kaggle, build_muhammedtalo,
                           build_radiography, write_png)
from flannel import labels as L
from flannel.data.readers import (READERS, LayoutNotFound, detect_layout, ieee8023_finding,
                                  read_dataset, read_ieee8023, read_kaggle, read_muhammedtalo,
                                  read_radiography)


def by_name(result):
    return {Path(s.path).name: s for s in result.samples}


def problem_names(result):
    return {Path(p.path).name: p.reason for p in result.problems}


def test_muhammedtalo_findings_patients_and_problems(tmp_path):
    build_muhammedtalo(tmp_path)
    result = read_muhammedtalo(tmp_path)
    s = by_name(result)
    assert Counter(x.finding for x in result.samples) == {L.COVID19: 3, L.NORMAL: 3, L.PNEUMONIA: 3}
    assert s["00000001_000.png"].patient_id == "chestxray8:00000001"
    assert s["00000001_001.png"].patient_id == "chestxray8:00000001"
    assert s["00000001_000.png"].patient_known is True
    covid = s["covid-19-pneumonia-7-PA.png"]
    assert (covid.patient_known, covid.patient_id) == (False, "muhammedtalo:covid-19-pneumonia-7-PA")
    assert {x.source for x in result.samples} == {"muhammedtalo"}
    problems = problem_names(result)
    assert problems["00000006_000.png"] == "empty file (0 bytes)"
    assert "extension" in problems["notes.txt"]


def test_muhammedtalo_accepts_inner_folder_and_wrapper(tmp_path):
    build_muhammedtalo(tmp_path / "COVID-19-master")
    inner = read_muhammedtalo(tmp_path / "COVID-19-master" / "X-Ray Image DataSet")
    wrapped = read_muhammedtalo(tmp_path)
    assert len(inner.samples) == len(wrapped.samples) == 9


def test_radiography_reads_images_never_masks(tmp_path):
    build_radiography(tmp_path)
    result = read_radiography(tmp_path)
    assert len(result.samples) == 8
    assert all("/images/" in x.path and "/masks/" not in x.path for x in result.samples)
    assert Counter(x.finding for x in result.samples) == {
        L.COVID19: 2, L.LUNG_OPACITY: 2, L.NORMAL: 2, L.VIRAL_PNEUMONIA: 2}
    viral = by_name(result)["Viral Pneumonia-1.png"]
    assert viral.patient_id == "radiography:Viral Pneumonia/Viral Pneumonia-1"
    assert not any(x.patient_known for x in result.samples)
    assert result.problems == []  # the xlsx and README sit outside the class folders


def test_radiography_flat_older_release(tmp_path):
    for cls in ("COVID", "Normal"):
        write_png(tmp_path / cls / f"{cls} (1).png")
    result = read_radiography(tmp_path)
    assert sorted(Path(x.path).name for x in result.samples) == ["COVID (1).png", "Normal (1).png"]


def test_ieee8023_views_findings_and_missing_files(tmp_path):
    build_ieee8023(tmp_path)
    result = read_ieee8023(tmp_path)
    s = by_name(result)
    assert set(s) == {VIETNAM, "auntminnie-b.jpeg", "strep.png", "sars.png", "normal.png", "pcp.png",
                      "tb.png", "plain.png"}
    assert s["auntminnie-b.jpeg"].finding == L.COVID19  # AP Supine is frontal
    assert s["strep.png"].finding == L.BACTERIAL_PNEUMONIA
    assert s["sars.png"].finding == L.VIRAL_PNEUMONIA
    assert s["normal.png"].finding == L.NORMAL
    assert s["pcp.png"].finding == L.PNEUMONIA
    assert s["tb.png"].finding == L.OTHER
    assert s["plain.png"].finding == L.PNEUMONIA
    assert s["strep.png"].patient_id == "ieee8023:4" and s["strep.png"].patient_known
    assert dict(result.skipped) == {"view L": 1, "modality CT": 1}
    assert problem_names(result) == {"missing.png": "listed in metadata.csv but the file is missing"}


@pytest.mark.parametrize("text, finding", [
    ("Pneumonia/Viral/COVID-19", L.COVID19), ("COVID-19, ARDS", L.COVID19),
    ("Pneumonia/Bacterial/Klebsiella", L.BACTERIAL_PNEUMONIA), ("No Finding", L.NORMAL),
    ("Pneumonia/Viral/Influenza", L.VIRAL_PNEUMONIA), ("Pneumonia/Lipoid", L.PNEUMONIA),
    ("todo", L.OTHER), ("Unknown", L.OTHER)])
def test_ieee8023_finding_map(text, finding):
    assert ieee8023_finding(text) == finding


def test_kaggle_patients_and_causes(tmp_path):
    build_kaggle(tmp_path)
    result = read_kaggle(tmp_path)
    s = by_name(result)
    assert len(result.samples) == 12
    assert s["person1_bacteria_1.jpeg"].finding == L.BACTERIAL_PNEUMONIA
    assert s["person1_virus_6.jpeg"].finding == L.VIRAL_PNEUMONIA
    assert s["person1_bacteria_1.jpeg"].patient_id == "kaggle:person1"
    assert s["person1_virus_6.jpeg"].patient_id == "kaggle:person1"
    # Same patient across the published train and test folders.
    assert s["person2_bacteria_3.jpeg"].patient_id == s["person2_bacteria_4.jpeg"].patient_id
    assert s["IM-0115-0001.jpeg"].patient_id == s["IM-0115-0002.jpeg"].patient_id == "kaggle:IM-0115"
    assert s["NORMAL2-IM-1427-0001.jpeg"].patient_id == "kaggle:NORMAL2-IM-1427"
    assert (s["odd-name.jpeg"].patient_known, s["odd-name.jpeg"].finding) == (False, L.NORMAL)
    assert "extension" in problem_names(result)[".DS_Store"]


def test_kaggle_nested_archive_folder(tmp_path):
    build_kaggle(tmp_path / "chest_xray")  # the Kaggle zip nests chest_xray/chest_xray/
    assert len(read_kaggle(tmp_path).samples) == 12


@pytest.mark.parametrize("builder, name", [(build_muhammedtalo, "muhammedtalo"),
                                           (build_radiography, "radiography"),
                                           (build_ieee8023, "ieee8023"), (build_kaggle, "kaggle")])
def test_detect_layout(tmp_path, builder, name):
    builder(tmp_path)
    assert detect_layout(tmp_path) == name
    assert READERS[name](tmp_path).samples


def test_unknown_layout_is_a_clear_error(tmp_path):
    write_png(tmp_path / "somewhere" / "x.png")
    with pytest.raises(LayoutNotFound, match="no known dataset layout"):
        detect_layout(tmp_path)
    with pytest.raises(LayoutNotFound, match="No_findings"):
        read_muhammedtalo(tmp_path)
    with pytest.raises(LayoutNotFound, match="not a folder"):
        read_kaggle(tmp_path / "absent")


def test_non_image_content_with_image_extension_is_a_problem(tmp_path):
    build_radiography(tmp_path)
    bad = tmp_path / "COVID-19_Radiography_Dataset" / "Normal" / "images" / "Normal-9.png"
    bad.write_text("<html>404</html>")
    assert "not PNG, JPEG or DICOM" in problem_names(read_radiography(tmp_path))["Normal-9.png"]


def test_read_dataset_merges_and_counts_excluded(tmp_path):
    build_radiography(tmp_path / "rad")
    build_ieee8023(tmp_path / "ieee")
    ds = read_dataset([tmp_path / "rad", tmp_path / "ieee"], "3class")
    assert ds.sources == {str(tmp_path / "rad"): "radiography", str(tmp_path / "ieee"): "ieee8023"}
    # rad: 2 COVID, 2 Normal, 2 viral (lung opacity excluded); ieee: 2 COVID, 1 normal, 4 pneumonia.
    assert ds.class_counts() == {"COVID-19": 4, "Normal": 3, "Pneumonia": 6}
    assert dict(ds.excluded) == {L.LUNG_OPACITY: 2, L.OTHER: 1}
    assert len(ds.problems) == 1 and ds.skipped["view L"] == 1
    assert len(ds.labels) == len(ds.samples)
    four = read_dataset([tmp_path / "rad", tmp_path / "ieee"], "4class")
    assert four.class_counts() == {"COVID": 4, "Lung_Opacity": 2, "Normal": 3, "Viral Pneumonia": 3}
    assert dict(four.excluded) == {L.BACTERIAL_PNEUMONIA: 1, L.PNEUMONIA: 2, L.OTHER: 1}
