"""Audit: counts, sizes, modes, problems, patient overlap, and the metadata shortcut check."""
from __future__ import annotations

import json

import pytest

from fixtures_data import build_muhammedtalo
from flannel.data.audit import (SHORTCUT_ACCURACY_MARGIN, audit_dataset, border_stats,
                                inspect_image)
from flannel.data.records import ManifestRow, write_manifest
from flannel.data.synth import SynthConfig, synthesize

# 3 x 40 images at 64 px: big enough for 5-fold CV, a second or two to generate and audit.
AUDIT_SYNTH = dict(n_per_class=40, size=64, seed=0)


@pytest.fixture(scope="module")
def synth_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    synthesize(root / "clean", SynthConfig(**AUDIT_SYNTH))
    synthesize(root / "markers", SynthConfig(**AUDIT_SYNTH, markers=True))
    return root / "clean", root / "markers"


def test_shortcut_check_quiet_on_clean_synthetic(synth_pair):
    report = audit_dataset(synth_pair[0])
    s = report.shortcut
    assert report.warnings == []
    assert s["chance"] == pytest.approx(1 / 3)
    assert s["accuracy"] < s["chance"] + SHORTCUT_ACCURACY_MARGIN
    assert "WARNING" not in report.format_text()


def test_shortcut_check_fires_on_markers(synth_pair):
    report = audit_dataset(synth_pair[1])
    s = report.shortcut
    assert s["accuracy"] > 0.9
    assert any(f.startswith("border_") for f in s["top_features"])
    text = report.format_text()
    assert "WARNING: metadata alone predicts the class" in text
    assert set(s["per_class_recall"]) == {"COVID-19", "Normal", "Pneumonia"}


def test_counts_sizes_modes_formats(synth_pair):
    report = audit_dataset(synth_pair[0])
    assert report.counts == {"COVID-19": 40, "Normal": 40, "Pneumonia": 40}
    assert report.sizes["Normal"] == {"width": [64, 64.0, 64], "height": [64, 64.0, 64]}
    assert report.formats["COVID-19"] == {"png": 24, "jpeg": 8, "dicom": 8}
    assert report.modes["COVID-19"]["MONOCHROME1/12bit"] == 4
    assert report.images_without_known_patient == 120 and report.patients == 120


def test_problems_listed_and_json(tmp_path, capsys):
    build_muhammedtalo(tmp_path / "data")
    # A file with a PNG signature that does not decode: found by the reader, refused by the decoder.
    bad = tmp_path / "data" / "X-Ray Image DataSet" / "Pneumonia" / "00000007_000.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    from flannel.cli import main
    assert main(["data", "audit", str(tmp_path / "data"), "--json", str(tmp_path / "a.json")]) == 0
    report = json.loads((tmp_path / "a.json").read_text())
    reasons = {p["path"].rsplit("/", 1)[-1]: p["reason"] for p in report["problems"]}
    assert reasons["00000006_000.png"] == "empty file (0 bytes)"
    assert reasons["00000007_000.png"].startswith("DecodeError")
    assert "notes.txt" in reasons
    assert report["counts"] == {"COVID-19": 3, "Normal": 3, "Pneumonia": 3}
    assert report["modes"]["COVID-19"] == {"RGB": 1, "RGBA": 1, "L": 1}
    assert report["shortcut"]["skipped"]  # 3 images per class: too few for the check
    assert "Problems: 3" in capsys.readouterr().out


def test_patient_overlap_from_manifest(tmp_path):
    build_muhammedtalo(tmp_path / "data")
    base = tmp_path / "data" / "X-Ray Image DataSet" / "No_findings"
    rows = [ManifestRow(str(base / "00000001_000.png"), "Normal", "normal", "muhammedtalo",
                        "chestxray8:00000001", True, "train"),
            ManifestRow(str(base / "00000001_001.png"), "Normal", "normal", "muhammedtalo",
                        "chestxray8:00000001", True, "test"),
            ManifestRow(str(base / "00000003_000.png"), "Normal", "normal", "muhammedtalo",
                        "chestxray8:00000003", True, "val")]
    manifest = write_manifest(rows, tmp_path / "m.csv")
    report = audit_dataset([tmp_path / "data"], manifest=manifest)
    assert report.patient_overlap["patients_in_several_splits"] == ["chestxray8:00000001"]
    assert any("1 patients sit in more than one split" in w for w in report.warnings)


def test_duplicates_and_border_stats(tmp_path):
    build_muhammedtalo(tmp_path)
    folder = tmp_path / "X-Ray Image DataSet" / "No_findings"
    (folder / "00000009_000.png").write_bytes((folder / "00000003_000.png").read_bytes())
    report = audit_dataset(tmp_path)
    assert [[p.rsplit("/", 1)[-1] for p in g] for g in report.duplicates] == [
        ["00000003_000.png", "00000009_000.png"]]
    import numpy as np
    img = np.zeros((64, 64), dtype=np.float32)
    img[:4] = 1.0  # a bright top strip (6.25% of 64 = 4 rows)
    stats = border_stats(img)
    assert stats[:2] == (1.0, 0.0) and stats[2:4] == (0.0, 0.0)
    assert stats[4] == pytest.approx(4 / 64)  # left strip: its top 4 of 64 rows are bright
    info = inspect_image(folder / "00000003_000.png")
    assert (info.fmt, info.mode, info.width, info.height) == ("png", "L", 64, 64)
