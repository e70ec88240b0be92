"""The architecture comparison tabulates each run's own report figures, ranks by macro-F1, counts
parameters exactly and draws a chart that decodes."""
import csv
import json

import pytest
from PIL import Image

from flannel.train import cv
from flannel.train.compare import compare_architectures, parameter_counts
from flannel.train.config import TrainConfig
from toy_data import make_toy_dataset

ARCHS = ["squeezenet1_1", "resnet18"]
# torchvision's published totals (resnet18 11,689,512; squeezenet1_1 1,235,496) with the
# 1000-class head (513,000 parameters) swapped for a 3-class one (1,539).
OVERRIDES = {"squeezenet1_1": {"lr": 1e-4}}
TOTAL_PARAMS = {"resnet18": 11_178_051, "squeezenet1_1": 724_035}


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    manifest = make_toy_dataset(root / "data", per_class={"train": 8, "val": 4, "test": 4})
    cfg = TrainConfig(manifest=str(manifest), epochs=2, batch_size=8, input_size=64, seed=0,
                      threads=1)
    return cfg, root / "cmp", compare_architectures(cfg, ARCHS, root / "cmp", overrides=OVERRIDES)


def test_per_architecture_overrides_reach_only_their_run(comparison):
    from flannel.train.ensemble import PRESETS, preset_overrides

    cfg, out, _ = comparison
    lrs = {a: json.loads((out / a / "config.json").read_text())["lr"] for a in ARCHS}
    assert lrs == {"squeezenet1_1": 1e-4, "resnet18": cfg.lr}
    assert preset_overrides(PRESETS["lite"], cfg) == {"squeezenet1_1": {"lr": cfg.lr * 0.1}}
    assert preset_overrides(PRESETS["paper"], cfg) == {}


def test_parameter_counts_follow_the_freeze_policy():
    assert parameter_counts("resnet18", 3) == (TOTAL_PARAMS["resnet18"],) * 2
    assert parameter_counts("resnet18", 3, "head") == (512 * 3 + 3, TOTAL_PARAMS["resnet18"])


def test_unknown_or_repeated_architecture_is_refused_before_training(tmp_path):
    cfg = TrainConfig(manifest=str(tmp_path / "missing.csv"))
    with pytest.raises(KeyError, match="unknown architecture 'nosuchnet'"):
        compare_architectures(cfg, ["resnet18", "nosuchnet"], tmp_path / "cmp")
    with pytest.raises(ValueError, match="each architecture once"):
        compare_architectures(cfg, ["resnet18", "resnet18"], tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()


@pytest.mark.slow
def test_table_has_each_architecture_with_the_figures_of_its_report(comparison):
    cfg, out, result = comparison
    rows = result["rows"]
    assert sorted(r["arch"] for r in rows) == sorted(ARCHS)
    assert [r["macro_f1"] for r in rows] == sorted((r["macro_f1"] for r in rows), reverse=True)
    for row in rows:
        report = json.loads((out / row["arch"] / "report.json").read_text())
        test = report["test"]
        assert row["evaluated_on"] == "test" and row["images"] == 12
        assert (row["accuracy"], row["macro_f1"]) == (test["accuracy"], test["macro_f1"])
        assert row["covid_recall"] == test["per_class"]["COVID-19"]["recall"]
        assert row["sick_called_normal"] == sum(test["called_normal"].values())
        assert row["seconds_per_epoch"] == pytest.approx(
            sum(report["epoch_seconds"]) / len(report["epoch_seconds"]))
        assert row["trainable_params"] == row["total_params"] == TOTAL_PARAMS[row["arch"]]
    assert json.loads((out / "compare.json").read_text()) == result
    with (out / "compare.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [t["arch"] for t in table] == [r["arch"] for r in rows]
    assert [float(t["macro_f1"]) for t in table] == [r["macro_f1"] for r in rows]
    md = (out / "compare.md").read_text()
    assert all(f"| {r['arch']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} |" in md for r in rows)


@pytest.mark.slow
def test_chart_is_a_png_that_decodes(comparison):
    _, out, _ = comparison
    with Image.open(out / "compare.png") as img:
        assert img.format == "PNG"
        img.load()
        assert img.width > 200 and img.height > 200


@pytest.mark.slow
def test_second_call_reuses_the_finished_runs(comparison, monkeypatch):
    cfg, out, first = comparison

    def must_not_train(cfg):
        raise AssertionError(f"retrained {cfg.out}")
    monkeypatch.setattr(cv, "train_learner", must_not_train)
    again = compare_architectures(cfg, ARCHS, out, overrides=OVERRIDES)
    assert [r["reused"] for r in again["rows"]] == [True, True]
    assert [r["macro_f1"] for r in again["rows"]] == [r["macro_f1"] for r in first["rows"]]
