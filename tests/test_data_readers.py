"""Readers on tiny copies of each public layout: findings, patients, problems, layout detection.

The external layouts' builders (``build_hannover``, ``build_openist``) live here and are reused by
the external evaluation tests.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from fixtures_data import (VIETNAM, build_ieee8023, build_kaggle, build_muhammedtalo,
                           build_radiography, write_png)
from flannel import labels as L
from flannel.data.readers import (READERS, LayoutNotFound, detect_layout, ieee8023_finding,
                                  read_dataset, read_hannover, read_ieee8023, read_kaggle,
                                  read_muhammedtalo, read_openist, read_radiography)


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


# --- external layouts: Hannover (data.csv + png/) and OpenIST (JPEGs + @.png masks) ---------------
HANNOVER_FIELDS = ["patient_id", "image_id", "sex", "age", "size", "weight", "admission_offset",
                   "icu_admission_offset", "modality", "projection"]
# (patient_id, image_id, modality, projection, what to write: "png" | "text" | None)
HANNOVER_ROWS = [
    ("024e7871", "fff13f3a", "CR", "pa", "png"),
    ("042f06a9", "b343e657", "CR", "ap", "png"),
    ("042f06a9", "c9280a30", "DX", "ap", "png"),
    ("0a1b2c3d", "deadbeef", "CR", "ap", None),      # listed, file missing
    ("0a1b2c3d", "0badf00d", "CR", "ap", "text"),    # listed, not an image
    ("0a1b2c3d", "11111111", "CR", "lateral", "png"),
]


def build_hannover(root: Path, seed: int = 500) -> Path:
    """``hannover-covid19/{data.csv,png/}``: 3 usable images of 2 patients, a missing file, a text
    file named .png, a lateral view and an unlisted png."""
    import csv

    base = root / "hannover-covid19"
    (base / "png").mkdir(parents=True)
    with (base / "data.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=HANNOVER_FIELDS, restval="")
        writer.writeheader()
        for i, (pid, image_id, modality, projection, content) in enumerate(HANNOVER_ROWS):
            writer.writerow({"patient_id": pid, "image_id": image_id, "modality": modality,
                             "projection": projection, "admission_offset": -i})
            if content == "png":
                write_png(base / "png" / f"{image_id}.png", seed + i)
            elif content == "text":
                (base / "png" / f"{image_id}.png").write_text("not a png")
    write_png(base / "png" / "unlisted.png", seed + 99)
    (base / "LICENSE").write_text("CC BY 3.0")
    return root


OPENIST_STEMS = ("1-10-500-500-100", "10-19-500-500-100", "100-109-500-500-100")


def build_openist(root: Path, seed: int = 600) -> Path:
    """``Datasets/Chest_x-ray`` (as in the OpenIST repository): 3 JPEGs, 2 ``@.png`` masks and a
    stray file."""
    base = root / "Datasets" / "Chest_x-ray"
    for i, stem in enumerate(OPENIST_STEMS):
        write_png(base / f"{stem}.jpg", seed + i)
        if i < 2:
            write_png(base / f"{stem}@.png", seed + 10 + i)
    (base / "Thumbs.db").write_bytes(b"\x00thumbs")
    return root


def test_hannover_covid_patients_and_problems(tmp_path):
    build_hannover(tmp_path)
    result = read_hannover(tmp_path)
    s = by_name(result)
    assert set(s) == {"fff13f3a.png", "b343e657.png", "c9280a30.png"}
    assert {x.finding for x in result.samples} == {L.COVID19}
    assert s["b343e657.png"].patient_id == s["c9280a30.png"].patient_id == "hannover:042f06a9"
    assert all(x.patient_known and x.source == "hannover" for x in result.samples)
    problems = problem_names(result)
    assert problems["deadbeef.png"] == "listed in data.csv but the file is missing"
    assert "not PNG, JPEG or DICOM" in problems["0badf00d.png"]
    assert "not listed in data.csv" in problems["unlisted.png"]
    assert len(problems) == 3
    assert dict(result.skipped) == {"projection lateral": 1}


def test_openist_normals_own_patients_masks_skipped(tmp_path):
    build_openist(tmp_path)
    result = read_openist(tmp_path)  # two wrapper folders above the images
    s = by_name(result)
    assert set(s) == {f"{stem}.jpg" for stem in OPENIST_STEMS}
    assert {x.finding for x in result.samples} == {L.NORMAL}
    assert s["1-10-500-500-100.jpg"].patient_id == "openist:1-10-500-500-100"
    assert not any(x.patient_known for x in result.samples)
    assert dict(result.skipped) == {"lung mask (@.png)": 2}
    assert set(problem_names(result)) == {"Thumbs.db"}  # masks are not problems


@pytest.mark.parametrize("builder, name", [(build_hannover, "hannover"), (build_openist, "openist")])
def test_detect_external_layouts(tmp_path, builder, name):
    builder(tmp_path)
    assert detect_layout(tmp_path) == name
    inner = next(p for p in tmp_path.rglob("*") if p.is_dir() and detect_layout(p) == name)
    assert READERS[name](inner).samples == READERS[name](tmp_path).samples


def test_kaggle_jpegs_are_not_mistaken_for_openist(tmp_path):
    build_kaggle(tmp_path)
    with pytest.raises(LayoutNotFound, match="OpenIST"):
        read_openist(tmp_path)


def test_external_layouts_merge_under_a_scheme(tmp_path):
    build_hannover(tmp_path / "h")
    build_openist(tmp_path / "o")
    ds = read_dataset([tmp_path / "h", tmp_path / "o"], "3class")
    assert ds.class_counts() == {"COVID-19": 3, "Normal": 3, "Pneumonia": 0}
    assert ds.sources == {str(tmp_path / "h"): "hannover", str(tmp_path / "o"): "openist"}
    assert ds.skipped == {"projection lateral": 1, "lung mask (@.png)": 2}
    assert read_dataset([tmp_path / "h"], "4class").class_counts()["COVID"] == 3
