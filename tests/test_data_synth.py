"""Synthetic dataset: layout the radiography reader reads back, formats, masks, markers, determinism."""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flannel import labels as L
from flannel.data.readers import detect_layout, read_radiography
from flannel.data.synth import FORMAT_CYCLE, MARKER_FRACTION, SynthConfig, render, synthesize
from flannel.decode import read_image

SMALL = dict(n_per_class=10, size=64)


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_byte_identical_other_seed_differs(tmp_path):
    a = synthesize(tmp_path / "a", SynthConfig(**SMALL, seed=3))
    synthesize(tmp_path / "b", SynthConfig(**SMALL, seed=3))
    synthesize(tmp_path / "c", SynthConfig(**SMALL, seed=4))
    ha, hb, hc = (tree_hashes(tmp_path / n) for n in "abc")
    ha.pop("README.txt"), hb.pop("README.txt"), hc.pop("README.txt")  # README names the folder
    assert ha == hb
    assert set(ha) == set(hc) and all(ha[k] != hc[k] for k in ha if "/images/" in k)
    assert a["files"] == 30


def test_radiography_reader_reads_it_back(tmp_path):
    synthesize(tmp_path, SynthConfig(**SMALL))
    assert detect_layout(tmp_path) == "radiography"
    result = read_radiography(tmp_path)
    assert result.problems == []
    assert Counter(s.finding for s in result.samples) == {
        L.COVID19: 10, L.NORMAL: 10, L.VIRAL_PNEUMONIA: 10}
    suffixes = Counter(Path(s.path).suffix for s in result.samples)
    assert suffixes == {".png": 18, ".jpg": 6, ".dcm": 6}
    assert (tmp_path / "README.txt").read_text().startswith("Synthetic chest-X-ray-like dataset")


def test_every_format_decodes_to_the_same_kind_of_picture(tmp_path):
    synthesize(tmp_path, SynthConfig(**SMALL))
    images = tmp_path / "Normal" / "images"
    kinds = set()
    for i, kind in enumerate(FORMAT_CYCLE):
        path = next(images.glob(f"Normal-{i + 1}.*"))
        img = read_image(path)
        kinds.add(kind)
        # Lungs (dark) inside a bright body on a dark background, whatever the storage;
        # MONOCHROME1 files come back upright after inversion.
        assert img[28:36, 12:20].mean() < img[48:56, 28:36].mean(), kind
        assert img[0:4, 0:4].mean() < img[48:56, 28:36].mean(), kind
    assert kinds == set(FORMAT_CYCLE)
    assert Image.open(next(images.glob("Normal-6.png"))).mode.startswith("I")  # 16-bit PNG
    with Image.open(tmp_path / "Normal" / "masks" / "Normal-1.png") as mask:
        values = set(np.unique(np.asarray(mask)).tolist())
    assert values == {0, 255}


def test_class_findings_differ_from_normal():
    cfg = SynthConfig(size=64, noise=0.0)
    # The same generator state for every class: only the finding differs.
    normal, lung = render("Normal", cfg, np.random.default_rng(0))
    for folder in ("COVID", "Viral Pneumonia", "Lung_Opacity"):
        img, _ = render(folder, cfg, np.random.default_rng(0))
        diff = img - normal
        assert diff[lung].mean() > 0.02, folder  # opacity raises lung density
        assert np.abs(diff[~lung]).mean() < diff[lung].mean() / 4, folder


def test_markers_sit_in_class_corners_inside_the_border(tmp_path):
    synthesize(tmp_path, SynthConfig(n_per_class=1, size=64, markers=True))
    m = round(MARKER_FRACTION * 64) + 1
    corners = {"COVID": (slice(0, m), slice(0, m)), "Normal": (slice(0, m), slice(64 - m, 64)),
               "Viral Pneumonia": (slice(64 - m, 64), slice(0, m))}
    for folder, (rows, cols) in corners.items():
        img = read_image(tmp_path / folder / "images" / f"{folder}-1.png")
        assert img[rows, cols].max() == 1.0, folder
        others = [v for k, v in corners.items() if k != folder]
        assert all(img[r, c].max() < 0.9 for r, c in others), folder


def test_imbalance_4class_and_refusing_a_non_empty_folder(tmp_path):
    summary = synthesize(tmp_path / "d", SynthConfig(n_per_class=8, size=32, scheme="4class",
                                                     imbalance={"COVID": 0.25}))
    assert summary["counts"] == {"COVID": 2, "Lung_Opacity": 8, "Normal": 8, "Viral Pneumonia": 8}
    assert {s.finding for s in read_radiography(tmp_path / "d").samples} == {
        L.COVID19, L.LUNG_OPACITY, L.NORMAL, L.VIRAL_PNEUMONIA}
    with pytest.raises(FileExistsError):
        synthesize(tmp_path / "d", SynthConfig(n_per_class=1, size=32))
    with pytest.raises(ValueError, match="unknown classes"):
        SynthConfig(imbalance={"Lung_Opacity": 0.5})


def test_cli_synth_then_split(tmp_path, capsys):
    from flannel.cli import main

    assert main(["data", "synth", str(tmp_path / "s"), "--n-per-class", "10", "--size", "48",
                 "--imbalance", "COVID=0.5"]) == 0
    assert main(["data", "split", str(tmp_path / "s"), "--out", str(tmp_path / "m.csv")]) == 0
    out = capsys.readouterr().out
    assert "wrote 25 images" in out and "25 images, 25 patients" in out
    assert (tmp_path / "split_summary.json").is_file()
