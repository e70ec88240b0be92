"""`flannel evaluate`: a tiny random-weights checkpoint on folders in the hannover, openist and
muhammedtalo layouts; counts, classes without images, predictions equal to the served tensor path,
and clear errors."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_data import build_muhammedtalo, build_radiography
from flannel.checkpoint import Checkpoint, save_checkpoint
from flannel.cli import main
from flannel.data.readers import read_dataset
from flannel.labels import get_scheme
from flannel.metrics import confusion_matrix
from flannel.preprocess import PreprocessSpec, load_tensor
from flannel.registry import build_model
from flannel.train.external import EXTERNAL_DIR, ExternalDataError, evaluate_external
from test_data_readers import build_hannover, build_openist

CROP = 64


def make_run(run_dir: Path, scheme: str = "3class", class_names: list[str] | None = None) -> Path:
    classes = class_names or list(get_scheme(scheme).classes)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("resnet18", len(classes))
    ckpt = Checkpoint(arch="resnet18", class_names=classes,
                      preprocess=PreprocessSpec.for_input_size(CROP),
                      state_dict=model.state_dict(), config={"scheme": scheme, "arch": "resnet18"})
    save_checkpoint(run_dir / "best.pt", ckpt)
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    root = tmp_path_factory.mktemp("external")
    build_hannover(root / "hannover")
    build_openist(root / "openist")
    build_muhammedtalo(root / "muhammedtalo")
    return root


def expected_confusion(run_dir: Path, dirs: list[Path], scheme: str = "3class") -> list[list[int]]:
    """The confusion matrix from the tensor path export and serving use, image by image."""
    from flannel.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run_dir / "best.pt")
    model = ckpt.build_model()
    ds = read_dataset(dirs, scheme)
    with torch.no_grad():
        predicted = [int(model(load_tensor(s.path, ckpt.preprocess)[None]).argmax())
                     for s in ds.samples]
    truth = [ckpt.class_names.index(label) for label in ds.labels]
    return confusion_matrix(truth, predicted, len(ckpt.class_names)).tolist()


def test_hannover_and_openist_report(run_dir, external):
    dirs = [external / "hannover", external / "openist"]
    r = evaluate_external(run_dir, dirs, name="hann-open")
    metrics = r["metrics"]
    support = {c: m["support"] for c, m in metrics["per_class"].items()}
    assert support == {"COVID-19": 3, "Normal": 3, "Pneumonia": 0} and r["images"] == 6
    assert r["counts_by_source"] == {"hannover": {"COVID-19": 3}, "openist": {"Normal": 3}}
    assert metrics["confusion"] == expected_confusion(run_dir, dirs)
    recalls = r["recall_summary"]
    assert recalls["not_externally_validated"] == ["Pneumonia"]
    assert set(recalls["recall"]) == {"COVID-19", "Normal"}
    per = metrics["per_class"]
    assert recalls["covid_normal_mean_recall"] == pytest.approx(
        (per["COVID-19"]["recall"] + per["Normal"]["recall"]) / 2)
    assert r["skipped"] == {"projection lateral": 1, "lung mask (@.png)": 2}
    assert len(r["problems"]) == 4  # 3 from hannover's data.csv, openist's Thumbs.db

    out = run_dir / EXTERNAL_DIR / "hann-open"
    assert Path(r["out_dir"]) == out
    md = (out / "report.md").read_text()
    assert "**Not externally validated: Pneumonia**" in md
    assert "Mean of COVID-19 and Normal recall" in md
    assert json.loads((out / "report.json").read_text())["metrics"]["confusion"] == metrics[
        "confusion"]
    with (out / "confusion.csv").open() as fh:
        table = list(csv.reader(fh))
    assert [sum(map(int, row[1:])) for row in table[1:]] == [3, 3, 0]
    assert (out / "confusion.png").stat().st_size > 0


def test_classes_map_across_layouts(run_dir, external):
    dirs = [external / "muhammedtalo", external / "hannover", external / "openist"]
    r = evaluate_external(run_dir, dirs, name="all")
    support = {c: m["support"] for c, m in r["metrics"]["per_class"].items()}
    assert support == {"COVID-19": 6, "Normal": 6, "Pneumonia": 3}
    assert r["recall_summary"]["not_externally_validated"] == []
    assert r["metrics"]["confusion"] == expected_confusion(run_dir, dirs)
    assert set(r["sources"].values()) == {"muhammedtalo", "hannover", "openist"}


def test_four_class_checkpoint_counts_excluded_findings(tmp_path, external):
    run = make_run(tmp_path / "run4", scheme="4class")
    r = evaluate_external(run, [external / "muhammedtalo"], name="mt")
    support = {c: m["support"] for c, m in r["metrics"]["per_class"].items()}
    assert support == {"COVID": 3, "Lung_Opacity": 0, "Normal": 3, "Viral Pneumonia": 0}
    assert r["excluded_findings"] == {"pneumonia": 3}  # cause unstated: not viral pneumonia
    assert r["recall_summary"]["not_externally_validated"] == ["Lung_Opacity", "Viral Pneumonia"]
    assert r["recall_summary"]["covid_normal_classes"] == ["COVID", "Normal"]
    assert "Findings outside the scheme, not evaluated: pneumonia 3" in (
        Path(r["out_dir"]) / "report.md").read_text()


def test_unmappable_folder_is_a_clear_error(run_dir, tmp_path, capsys):
    build_radiography(tmp_path / "rad")
    base = tmp_path / "rad" / "COVID-19_Radiography_Dataset"
    for cls in ("COVID", "Normal", "Viral Pneumonia"):  # keep only Lung_Opacity images
        for image in (base / cls / "images").iterdir():
            image.unlink()
    with pytest.raises(ExternalDataError, match=r"maps onto the checkpoint's classes \['COVID-19', "
                                                r"'Normal', 'Pneumonia'\].*lung_opacity 2"):
        evaluate_external(run_dir, [tmp_path / "rad"])
    assert main(["evaluate", str(run_dir), str(tmp_path / "rad")]) == 2
    assert "lung_opacity 2" in capsys.readouterr().err


def test_scheme_and_class_names_must_agree(tmp_path, external):
    run = make_run(tmp_path / "bad", scheme="4class",
                   class_names=["COVID-19", "Normal", "Pneumonia"])
    with pytest.raises(ExternalDataError, match="do not match its label scheme '4class'"):
        evaluate_external(run, [external / "openist"])


def test_undecodable_files_fail_before_predicting(run_dir, tmp_path):
    build_openist(tmp_path / "o")
    broken = tmp_path / "o" / "Datasets" / "Chest_x-ray" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff" + bytes(64))  # JPEG signature, no image
    with pytest.raises(ExternalDataError, match=r"1 file\(s\) cannot be decoded:\n  .*broken.jpg"):
        evaluate_external(run_dir, [tmp_path / "o"], name="broken")
    assert not (run_dir / EXTERNAL_DIR / "broken").exists()


def test_cli_prints_recall_and_unvalidated_classes(run_dir, external, capsys):
    assert main(["evaluate", str(run_dir), str(external / "hannover"), str(external / "openist"),
                 "--name", "cli"]) == 0
    out = capsys.readouterr().out
    assert "6 external images, scheme 3class" in out
    assert "not externally validated (no images): Pneumonia" in out
    assert "mean of COVID-19 and Normal recall" in out
    report = json.loads((run_dir / EXTERNAL_DIR / "cli" / "report.json").read_text())
    assert report["images"] == 6 and report["precision"] == "fp32"
    assert np.isclose(sum(report["recall_summary"]["recall"].values()) / 2,
                      report["recall_summary"]["covid_normal_mean_recall"])
