"""The out-of-distribution sets (flannel.ood_sets): built from installed packages' files, read by
the product's own decoder, byte-identical on every build; and the figures computed on them."""
from __future__ import annotations

import io
import json
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from flannel import ood_sets
from flannel.decode import MIN_SIDE, decode_image, read_image, sniff_format
from flannel.ood_sets import (MANIFEST_NAME, MAX_SIDE, MIN_IMAGES_PER_SET, OOD_SETS, TRANSFORMS,
                              EmptyOodSet, OodSet, SourceImage, build_ood_sets, build_set,
                              dicom_sources,
                              expand, fit_side, ood_auroc, ood_figures, render_dicom, to_8bit)

# The sets whose pixels come from random generators: the ones where a seed could slip.
SEEDED_SETS = ("documents", "noise")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict[str, list[Path]]]:
    """Every set, built once for the module. Read-only."""
    out = tmp_path_factory.mktemp("ood-sets")
    return out, build_ood_sets(out)


@pytest.fixture(scope="module")
def manifest(built) -> dict:
    return json.loads((built[0] / MANIFEST_NAME).read_text())


def installed_testfile(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not installed (pydicom or pydicom-data)"
    return Path(path)


def file_bytes(paths: list[Path]) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in paths}


# --- the sets ----------------------------------------------------------------------------------

def test_every_set_is_built_in_its_folder_with_enough_images(built, manifest):
    out, paths = built
    assert list(paths) == list(OOD_SETS)
    for name, files in paths.items():
        assert len(files) >= MIN_IMAGES_PER_SET, name
        assert all(path.parent == out / name and path.is_file() for path in files), name
        entry = manifest["sets"][name]
        assert entry["images"] == len(files) and entry["unusable"] == {}, name
        assert [f["file"] for f in entry["files"]] == [path.name for path in files], name
        assert entry["description"] == OOD_SETS[name].description


def test_every_image_is_a_png_the_product_decodes_within_the_size_bounds(built):
    for name, files in built[1].items():
        for path in files:
            assert sniff_format(path.read_bytes()[:16]) == "png", path
            image = read_image(path)
            assert MIN_SIDE <= min(image.shape), (path, image.shape)
            assert max(image.shape) <= MAX_SIDE, (path, image.shape)
            assert image.dtype == np.float32 and 0.0 <= image.min() <= image.max() <= 1.0


def test_no_two_images_of_a_set_are_the_same(built):
    for name, files in built[1].items():
        contents = file_bytes(files)
        assert len(set(contents.values())) == len(contents), name


def test_the_seeded_sets_are_byte_identical_on_a_second_build(built, tmp_path):
    again = build_ood_sets(tmp_path, SEEDED_SETS)
    for name in SEEDED_SETS:
        assert file_bytes(again[name]) == file_bytes(built[1][name]), name


@pytest.mark.slow
def test_a_second_build_of_every_set_is_byte_identical_manifest_included(built, tmp_path):
    again = build_ood_sets(tmp_path)
    for name, files in built[1].items():
        assert file_bytes(again[name]) == file_bytes(files), name
    assert (tmp_path / MANIFEST_NAME).read_bytes() == (built[0] / MANIFEST_NAME).read_bytes()


def test_the_extremity_set_comes_from_the_extremity_file(built, manifest):
    entry = manifest["sets"]["extremity-radiograph"]
    assert entry["sources"] == ["pydicom-data:RG3_UNCR.dcm"]
    path = installed_testfile("RG3_UNCR.dcm")
    header = pydicom.dcmread(path, stop_before_pixels=True)
    assert (header.Modality, header.BodyPartExamined) == ("CR", "EXTREMITY")
    original = built[0] / "extremity-radiograph" / "rg3_uncr.png"
    expected = np.asarray(fit_side(Image.fromarray(to_8bit(decode_image(path.read_bytes())))))
    np.testing.assert_array_equal(np.asarray(Image.open(original)), expected)
    assert sorted(f["transform"] for f in entry["files"]) == sorted(name for name, _ in TRANSFORMS)


def test_a_dicom_is_rendered_as_the_product_decodes_it(built):
    """CT_small is 128 x 128, written unresized: its PNG reads back as the DICOM decodes, to
    within the 8-bit rounding."""
    png = read_image(built[0] / "ct" / "ct_small.png")
    dicom = decode_image(installed_testfile("CT_small.dcm").read_bytes())
    assert np.abs(png - dicom).max() <= 0.5 / 255 + 1e-6


def single_frame_file(path: Path, index: int, **top_level) -> bytes:
    """Frame ``index`` of a multi-frame file as a single-frame file, which the product decodes,
    with ``top_level`` attributes set."""
    ds = pydicom.dcmread(path)
    frame = ds.pixel_array[index]
    for keyword in ("NumberOfFrames", "PerFrameFunctionalGroupsSequence",
                    "SharedFunctionalGroupsSequence"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.PixelData = np.ascontiguousarray(frame).tobytes()
    for keyword, value in top_level.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_a_multi_frame_dicom_gives_its_middle_frame_as_the_product_would_decode_it():
    path = installed_testfile("emri_small.dcm")  # 10 frames
    rendered = np.asarray(render_dicom(path))
    np.testing.assert_array_equal(rendered, to_8bit(decode_image(single_frame_file(path, 5))))
    assert not np.array_equal(rendered, to_8bit(decode_image(single_frame_file(path, 0))))


def test_an_enhanced_multi_frame_dicom_takes_its_rescale_and_window_from_the_frame_groups():
    # 2 frames; the rescale and the window are in the shared functional groups.
    path = installed_testfile("eCT_Supplemental.dcm")
    header = pydicom.dcmread(path, stop_before_pixels=True)
    shared = header.SharedFunctionalGroupsSequence[0]
    rescale, window = shared.PixelValueTransformationSequence[0], shared.FrameVOILUTSequence[0]
    expected = decode_image(single_frame_file(
        path, 1, RescaleIntercept=rescale.RescaleIntercept, RescaleSlope=rescale.RescaleSlope,
        WindowCenter=window.WindowCenter, WindowWidth=window.WindowWidth))
    np.testing.assert_array_equal(np.asarray(render_dicom(path)), to_8bit(expected))


def test_photographs_include_scikit_images_when_installed_and_expand_without_it(
        manifest, tmp_path, monkeypatch):
    sources = manifest["sets"]["photographs"]["sources"]
    assert {"scikit-learn:china.jpg", "scikit-learn:flower.jpg"} <= set(sources)
    if ood_sets.skimage_photograph_files():
        assert "scikit-image:astronaut.png" in sources
    monkeypatch.setattr(ood_sets, "skimage_photograph_files", lambda: [])
    paths = build_ood_sets(tmp_path, ["photographs"])["photographs"]
    # Two sources: each as it is, then flipped and rotated, up to the minimum.
    suffixes = ("", "-flip-lr", "-flip-tb", "-rot90", "-rot180", "-rot270")
    assert sorted(p.name for p in paths) == sorted(
        f"{stem}{suffix}.png" for stem in ("china", "flower") for suffix in suffixes)


def test_unusable_sources_are_reported_and_a_set_with_none_left_is_refused(tmp_path, monkeypatch):
    names = ("CT_small.dcm", "MR_truncated.dcm", "no_such_file.dcm")
    monkeypatch.setitem(OOD_SETS, "probe",
                        OodSet("probe", "a probe", partial(dicom_sources, names)))
    monkeypatch.setitem(OOD_SETS, "empty", OodSet("empty", "none left",
                                                  partial(dicom_sources, names[1:])))
    paths = build_ood_sets(tmp_path, ["probe"])["probe"]
    entry = json.loads((tmp_path / MANIFEST_NAME).read_text())["sets"]["probe"]
    assert len(paths) == MIN_IMAGES_PER_SET and entry["sources"] == ["pydicom:CT_small.dcm"]
    assert set(entry["unusable"]) == {"pydicom:MR_truncated.dcm", "no_such_file.dcm"}
    assert "DecodeError" in entry["unusable"]["pydicom:MR_truncated.dcm"]
    with pytest.raises(EmptyOodSet, match="empty"):
        build_set(OOD_SETS["empty"], tmp_path)
    # A whole build leaves such a set out and says why (its package may not be installed).
    assert build_ood_sets(tmp_path, ["probe", "empty"]).keys() == {"probe"}
    recorded = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert set(recorded["sets"]) == {"probe"} and "empty" in recorded["unavailable"]["empty"]


def test_a_build_overwrites_its_own_files_and_deletes_nothing(tmp_path):
    folder = tmp_path / "noise"
    folder.mkdir()
    (folder / "keep.txt").write_text("not ours")
    (folder / "uniform-0.png").write_bytes(b"stale")
    paths = build_ood_sets(tmp_path, ["noise"])["noise"]
    assert (folder / "keep.txt").read_text() == "not ours"
    assert folder / "uniform-0.png" in paths and read_image(folder / "uniform-0.png").shape
    assert list(json.loads((tmp_path / MANIFEST_NAME).read_text())["sets"]) == ["noise"]


def test_an_unknown_set_is_refused(tmp_path):
    with pytest.raises(KeyError, match="xrays"):
        build_ood_sets(tmp_path, ["noise", "xrays"])
    assert not (tmp_path / "noise").exists()


# --- expansion and size -------------------------------------------------------------------------

def sources(count: int) -> list[SourceImage]:
    return [SourceImage(f"s{i}", Image.new("L", (64, 48), i), f"test:{i}") for i in range(count)]


def test_one_source_expands_to_the_minimum_with_every_transform_once():
    assert len(TRANSFORMS) >= MIN_IMAGES_PER_SET
    pairs = expand(sources(1))
    assert [name for _, name in pairs] == [name for name, _ in TRANSFORMS][:MIN_IMAGES_PER_SET]


def test_sources_are_all_taken_as_they_are_before_any_transform():
    assert [name for _, name in expand(sources(5))][:5] == ["original"] * 5
    assert {name for _, name in expand(sources(MIN_IMAGES_PER_SET + 3))} == {"original"}
    with pytest.raises(ValueError, match="fewer than"):
        expand(sources(1), minimum=len(TRANSFORMS) + 1)


def test_fit_side_reduces_only_what_is_too_large_and_keeps_the_aspect():
    assert fit_side(Image.new("L", (1000, 500))).size == (MAX_SIDE, MAX_SIDE // 2)
    assert fit_side(Image.new("L", (100, 50))).size == (100, 50)


# --- figures ------------------------------------------------------------------------------------

def pairwise_auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """The definition: over all (out, in) pairs, 1 where out scores higher, 1/2 for a tie."""
    diff = out_scores[:, None] - in_scores[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def tied_scores(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 8, 150) / 4.0, rng.integers(2, 10, 90) / 4.0


@pytest.mark.parametrize("seed", range(5))
def test_ood_auroc_is_the_share_of_pairs_with_ties_counted_half(seed):
    in_scores, out_scores = tied_scores(seed)
    assert ood_auroc(in_scores, out_scores) == pytest.approx(pairwise_auroc(in_scores, out_scores),
                                                             abs=1e-12)


@pytest.mark.slow  # importing sklearn.metrics alone takes about 2.5 s
def test_ood_auroc_equals_sklearns_roc_auc_score_with_ties():
    from sklearn.metrics import roc_auc_score

    for seed in range(5):
        in_scores, out_scores = tied_scores(seed)
        labels = np.r_[np.zeros(in_scores.size), np.ones(out_scores.size)]
        expected = roc_auc_score(labels, np.r_[in_scores, out_scores])
        assert ood_auroc(in_scores, out_scores) == pytest.approx(expected, abs=1e-12)


def test_ood_auroc_is_exact_at_the_extremes():
    assert ood_auroc([0.1, 0.2, 0.3], [0.5, 0.9]) == 1.0
    assert ood_auroc([0.5, 0.9], [0.1, 0.2, 0.3]) == 0.0
    assert ood_auroc([0.7] * 4, [0.7] * 3) == 0.5


@pytest.mark.parametrize("in_scores, out_scores", [([], [1.0]), ([1.0], []), ([np.nan], [1.0])])
def test_ood_auroc_refuses_empty_or_non_finite_scores(in_scores, out_scores):
    with pytest.raises(ValueError):
        ood_auroc(in_scores, out_scores)


def test_ood_figures_on_a_known_example():
    figures = ood_figures([0.2, 0.5, 0.9, 1.0, 1.5],
                          {"near": [2.0, 3.0, 0.5, 1.0], "far": [5.0, 6.0]}, threshold=1.0)
    assert figures == {
        "threshold": 1.0,
        "in_distribution": {"images": 5, "pass_rate": 0.8},
        # near: 2.0 and 3.0 beat all 5, 0.5 beats 1 and ties 1, 1.0 beats 3 and ties 1: 15 / 20.
        "sets": {"near": {"images": 4, "auroc": 0.75, "pass_rate": 0.5},
                 "far": {"images": 2, "auroc": 1.0, "pass_rate": 0.0}},
    }
