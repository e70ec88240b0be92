"""Training learns a separable problem and writes a complete, reloadable run folder."""
import csv
import json

import pytest
import torch

from flannel.checkpoint import load_checkpoint
from flannel.data.records import read_manifest
from flannel.data.torch_dataset import XrayDataset
from flannel.preprocess import load_tensor
from flannel.train.augment import get_transform
from flannel.train.config import TrainConfig
from flannel.train.evaluate import evaluate_checkpoint
from flannel.train.loop import train_learner
from toy_data import make_toy_dataset


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    manifest = make_toy_dataset(root)
    cfg = TrainConfig(manifest=str(manifest), out=str(root / "run"), arch="resnet18", epochs=3,
                      batch_size=16, input_size=64, lr=1e-3, seed=0, threads=2)
    return cfg, train_learner(cfg)


@pytest.mark.slow
def test_small_model_learns_the_toy_problem(trained):
    _, result = trained
    assert result.best_val_macro_f1 >= 0.9
    assert result.report["test"]["accuracy"] >= 0.9


@pytest.mark.slow
def test_run_folder_is_complete(trained):
    cfg, result = trained
    names = {p.name for p in result.run_dir.iterdir()}
    assert {"config.json", "metrics.csv", "best.pt", "last.pt", "report.json", "report.md",
            "confusion_test.csv", "confusion_test.png", "confusion_val.png"} <= names
    with (result.run_dir / "metrics.csv").open() as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2, 3]
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert saved["input_size"] == 64 and saved["arch"] == "resnet18"


@pytest.mark.slow
def test_report_carries_the_shortcut_check_baseline_and_gradcam(trained):
    _, result = trained
    checks = json.loads((result.run_dir / "report.json").read_text())["checks"]
    s = checks["shortcut"]
    assert s["split"] == "test"
    assert s["accuracy"]["main"] == pytest.approx(result.report["test"]["accuracy"])
    assert s["accuracy"]["drop"] == pytest.approx(s["accuracy"]["main"]
                                                  - s["accuracy"]["harmonised"])
    # The toy classes differ by where a square sits, which harmonising keeps: no shortcut here.
    assert s["accuracy"]["harmonised"] >= 0.8
    assert checks["baseline"]["test"]["n"] == result.report["test"]["n"]
    assert len(checks["gradcam"]) == 2 * 3  # two test images per class
    assert all((result.run_dir / p).is_file() for p in checks["gradcam"])
    md = (result.run_dir / "report.md").read_text()
    assert "## Shortcut check" in md and "## Baseline" in md and "![Grad-CAM](gradcam/" in md


@pytest.mark.slow
def test_best_checkpoint_reloads_and_reproduces_the_report(trained):
    cfg, result = trained
    ckpt = load_checkpoint(result.run_dir / "best.pt")
    assert ckpt.config["manifest"] == cfg.manifest and ckpt.preprocess.crop == 64
    again = evaluate_checkpoint(str(result.run_dir / "best.pt"), "test")
    assert again["confusion"] == result.report["test"]["confusion"]
    assert ckpt.metrics["test"]["accuracy"] == pytest.approx(result.report["test"]["accuracy"])


@pytest.mark.slow
def test_evaluation_items_are_the_shared_preprocessing(trained):
    cfg, result = trained
    ckpt = load_checkpoint(result.run_dir / "best.pt")
    rows = read_manifest(cfg.manifest, "val")
    ds = XrayDataset(rows, ckpt.class_names, ckpt.preprocess)
    assert torch.equal(ds[0][0], load_tensor(rows[0].path, ckpt.preprocess))


def test_augmentation_presets_keep_shape_and_differ_from_eval(tmp_path):
    manifest = make_toy_dataset(tmp_path, per_class={"train": 1})
    rows = read_manifest(manifest)
    from flannel.preprocess import PreprocessSpec
    spec = PreprocessSpec.for_input_size(64)
    torch.manual_seed(0)
    for name in ("base", "strong"):
        ds = XrayDataset(rows, ["COVID-19", "Normal", "Pneumonia"], spec, get_transform(name))
        x, _ = ds[0]
        assert x.shape == (3, 64, 64)
        assert not torch.equal(x, load_tensor(rows[0].path, spec))
    with pytest.raises(ValueError, match="unknown augmentation preset"):
        get_transform("extreme")


def test_dataset_caches_resized_images_and_augmentation_leaves_them_intact(tmp_path):
    manifest = make_toy_dataset(tmp_path, per_class={"train": 1}, size=96)
    rows = read_manifest(manifest)
    from flannel.preprocess import PreprocessSpec
    spec = PreprocessSpec.for_input_size(64)
    ds = XrayDataset(rows, ["COVID-19", "Normal", "Pneumonia"], spec, get_transform("strong"))
    cached = ds.resized(0)
    assert cached.shape == (1, spec.resize, spec.resize)
    before = cached.clone()
    for _ in range(5):
        ds[0]
    assert ds.resized(0) is cached and torch.equal(cached, before)


def test_config_rejects_too_small_input():
    with pytest.raises(ValueError, match="at least 299"):
        TrainConfig(manifest="m.csv", arch="inception_v3", input_size=64).resolved()


def test_undecodable_file_in_the_manifest_is_reported_by_path(tmp_path):
    manifest = make_toy_dataset(tmp_path, per_class={"train": 2, "val": 1})
    bad = read_manifest(manifest, "train")[0].path
    with open(bad, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ValueError, match="cannot be decoded") as err:
        train_learner(TrainConfig(manifest=str(manifest), out=str(tmp_path / "run"),
                                  arch="squeezenet1_1", epochs=1, input_size=64))
    assert bad in str(err.value)


# --- the calibration section of the run report ---------------------------------------------

CLASSES = ["COVID-19", "Normal", "Pneumonia"]


def overconfident_split(n: int, seed: int):
    """Probabilities four times too sure of labels drawn from calibrated logits, and the labels."""
    import numpy as np

    from flannel.calibration import softmax

    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (n, len(CLASSES)))
    labels = np.array([rng.choice(len(CLASSES), p=p) for p in softmax(logits)])
    return softmax(4.0 * logits), labels


@pytest.mark.slow
def test_run_report_calibrates_an_overconfident_learner_on_validation(tmp_path):
    import math

    from flannel.train.evaluate import Predictions, split_metrics
    from flannel.train.report import write_report

    predictions = {"val": overconfident_split(200, 0), "test": overconfident_split(200, 1)}
    splits = {s: split_metrics(Predictions(p, t, 0.0), CLASSES, "3class")
              for s, (p, t) in predictions.items()}
    config = {"arch": "resnet18", "manifest": "toy.csv", "epochs": 1, "lr": 1e-3}
    write_report(tmp_path, config, 1, splits, 1.0, predictions=predictions)

    calibration = json.loads((tmp_path / "report.json").read_text())["calibration"]
    assert calibration["scaling"]["kind"] == "temperature"
    assert calibration["scaling"]["temperature"] > 2  # four times too sure: T well above 1
    assert calibration["fitted_on"] == {"split": "val", "images": 200}
    for split in ("val", "test"):
        before, after = calibration[split]["before"], calibration[split]["after"]
        assert before["accuracy"] == pytest.approx(splits[split]["accuracy"])
        assert after["accuracy"] == before["accuracy"]  # a temperature keeps every decision
        assert all(math.isfinite(v) for f in (before, after) for v in f.values())
        assert after["ece"] < before["ece"] and after["nll"] < before["nll"]
    assert calibration["diagram"] == "reliability.png"
    assert (tmp_path / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "report.md").read_text()
    assert "## Calibration" in md and "![reliability](reliability.png)" in md


def test_run_report_without_enough_validation_images_says_why(tmp_path):
    from flannel.train.calibration_report import calibration_section

    probs, labels = overconfident_split(1, 0)
    section = calibration_section({"val": probs}, {"val": labels}, None, title="one image")
    assert section.figures["scaling"] is None and section.diagram is None
    assert "fewer than 2 validation images" in section.figures["no_scaling"]
    assert section.figures["val"]["before"]["images"] == 1
    assert "No temperature scaling (fewer than 2 validation images" in "\n".join(section.markdown)


@pytest.mark.slow
def test_trained_run_report_holds_the_calibration_of_its_own_predictions(trained):
    _, result = trained
    report = json.loads((result.run_dir / "report.json").read_text())
    calibration = report["calibration"]
    assert calibration["scaling"]["temperature"] > 0
    for split in ("val", "test"):
        before, after = calibration[split]["before"], calibration[split]["after"]
        assert before["images"] == report[split]["n"]
        assert before["accuracy"] == pytest.approx(report[split]["accuracy"])
        assert after["accuracy"] == before["accuracy"]
    # The figures' log loss is the evaluated checkpoint's cross-entropy: the reported loss, as
    # the toy classes are balanced and their inverse-frequency loss weights equal.
    assert calibration["val"]["before"]["nll"] == pytest.approx(report["val"]["loss"], rel=1e-4)
    assert (result.run_dir / "reliability.png").stat().st_size > 0
