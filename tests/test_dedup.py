"""Duplicate grouping: exact copies and re-encoded/resized copies merge into one patient; distinct
images, even of similar layout, stay apart; undecodable files are reported."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures_data import build_muhammedtalo
from flannel import labels as L
from flannel.data.dedup import (NEAR_DUPLICATE_MAX_DISTANCE, close_pairs, duplicate_groups,
                                fingerprint, merge_duplicate_patients, merge_patients)
from flannel.data.records import Sample, read_manifest
from flannel.data.split import make_split, split_dataset


def smooth_image(seed: int, side: int = 128) -> Image.Image:
    """A radiograph-like smooth grey image: random 6x6 field upsampled bicubically, plus a bright
    seed-dependent block, so that distinct seeds differ at low spatial frequencies."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8))
    image = np.asarray(coarse.resize((side, side), Image.BICUBIC)).copy()
    y, x = rng.integers(0, side // 2, 2)
    image[y:y + side // 4, x:x + side // 4] = 255
    return Image.fromarray(image)


def save(image: Image.Image, path: Path, **kwargs) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return str(path)


@pytest.fixture
def images(tmp_path):
    """original, its byte copy, a JPEG-q70 copy at 0.75x, and three distinct images."""
    original = smooth_image(1)
    paths = {"original": save(original, tmp_path / "a" / "original.png")}
    paths["copy"] = str(tmp_path / "b" / "copy.png")
    Path(paths["copy"]).parent.mkdir()
    Path(paths["copy"]).write_bytes(Path(paths["original"]).read_bytes())
    paths["reencoded"] = save(original.resize((96, 96), Image.BILINEAR), tmp_path / "c" / "re.jpg",
                              quality=70)
    for seed in (2, 3, 4):
        paths[f"other{seed}"] = save(smooth_image(seed), tmp_path / "d" / f"other{seed}.png")
    return paths


def test_exact_and_near_copies_grouped_distinct_images_apart(images):
    shas, hashes, problems = fingerprint(list(images.values()), progress=False)
    assert problems == []
    exact, near = duplicate_groups(shas, hashes)
    assert exact == [sorted([images["original"], images["copy"]])]
    assert near == [sorted([images["original"], images["copy"], images["reencoded"]])]


def test_distances_known_for_hand_made_hashes():
    hashes = np.zeros((4, 16), dtype=bool)
    hashes[1, :3] = True   # 3 bits from row 0
    hashes[2, :12] = True  # 12 bits from row 0, 9 from row 1
    hashes[3] = True       # 16 bits from row 0, 13 from row 1, 4 from row 2
    assert close_pairs(hashes, 3) == [(0, 1)]
    assert close_pairs(hashes, 4) == [(0, 1), (2, 3)]
    assert close_pairs(hashes, 9) == [(0, 1), (1, 2), (2, 3)]
    assert close_pairs(hashes, 0) == []


def test_patients_merge_to_smallest_id_and_whole_patients_follow():
    samples = [Sample("/x/1.png", L.NORMAL, "s", "s:b", True),
               Sample("/x/2.png", L.NORMAL, "s", "s:b", True),   # another image of patient b
               Sample("/y/1.png", L.NORMAL, "t", "t:a", False),  # duplicate of /x/1.png
               Sample("/z/1.png", L.NORMAL, "t", "t:c", False)]
    merged, changed, folded = merge_patients(samples, [["/x/1.png", "/y/1.png"]])
    assert [s.patient_id for s in merged] == ["s:b", "s:b", "s:b", "t:c"]
    assert (changed, folded) == (1, 1)
    assert [s.path for s in merged] == [s.path for s in samples]


def test_undecodable_file_is_a_problem_not_dropped_silently(images, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
    samples = [Sample(p, L.NORMAL, "s", f"s:{k}", False) for k, p in images.items()]
    samples.append(Sample(str(bad), L.NORMAL, "s", "s:bad", False))
    merged, report = merge_duplicate_patients(samples, progress=False)
    assert [p.path for p in report.problems] == [str(bad)]
    assert "cannot be decoded" in report.problems[0].reason
    assert str(bad) not in {s.path for s in merged} and len(merged) == len(images)
    with pytest.raises(ValueError, match="bad.png"):
        make_split(samples, "3class")


def test_merged_duplicates_land_in_the_same_split(images, tmp_path):
    # Many distinct images so the split has somewhere else to put the copies.
    others = [save(smooth_image(100 + i), tmp_path / "e" / f"{i}.png") for i in range(30)]
    paths = list(images.values()) + others
    samples = [Sample(p, L.NORMAL, "s", f"s:{Path(p).stem}", False) for p in paths]
    copies = {images["original"], images["copy"], images["reencoded"]}
    for seed in range(5):
        rows = make_split(samples, "3class", seed=seed)
        assert len({r.split for r in rows if r.path in copies}) == 1
        assert len({r.patient_id for r in rows if r.path in copies}) == 1
        assert len({r.patient_id for r in rows}) == len(paths) - 2
        undeduped = make_split(samples, "3class", seed=seed, dedup=False)
        assert len({r.patient_id for r in undeduped}) == len(paths)


def test_split_summary_reports_duplicate_groups(tmp_path):
    build_muhammedtalo(tmp_path / "data")
    base = tmp_path / "data" / "X-Ray Image DataSet"
    # An exact copy of a ChestX-ray8 normal under a COVID-19-style name (own patient), and a
    # re-encoded smaller JPEG copy of another normal.
    (base / "No_findings" / "00000009_000.png").write_bytes(
        (base / "No_findings" / "00000003_000.png").read_bytes())
    original = Image.open(base / "No_findings" / "00000001_000.png")
    buf = io.BytesIO()
    original.resize((48, 48)).save(buf, format="JPEG", quality=85)
    (base / "Covid-19" / "copy-of-1.jpeg").write_bytes(buf.getvalue())
    out = split_dataset([tmp_path / "data"], tmp_path / "m.csv", "3class", progress=False)
    dup = json.loads((tmp_path / "split_summary.json").read_text())["duplicates"]
    assert (dup["exact_groups"], dup["near_groups"]) == (1, 1), dup
    # Both copies join the ChestX-ray8 patient of their original (the smaller id).
    assert (dup["images_changed_patient"], dup["patients_merged"]) == (2, 2)
    rows = {Path(r.path).name: r for r in read_manifest(tmp_path / "m.csv")}
    assert rows["copy-of-1.jpeg"].patient_id == "chestxray8:00000001"
    assert rows["copy-of-1.jpeg"].split == rows["00000001_000.png"].split
    assert rows["00000009_000.png"].patient_id == "chestxray8:00000003"
    assert dup["max_phash_distance"] == NEAR_DUPLICATE_MAX_DISTANCE
    assert out["duplicates"] == dup
    off = split_dataset([tmp_path / "data"], tmp_path / "n.csv", "3class", dedup=False)
    assert off["duplicates"] == {"checked": False}
    assert off["patients"] - out["patients"] == dup["patients_merged"]
