"""Cross-validation tests every image exactly once, summarises the folds' own figures, refuses a
manifest without folds, and continues from finished folds instead of retraining them."""
import json
import logging
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from flannel.cli import main
from flannel.data.records import ManifestRow, read_manifest, write_manifest
from flannel.data.split import fold_manifest
from flannel.train import cv
from flannel.train.config import TrainConfig
from flannel.train.cv import run_cross_validation
from toy_data import make_toy_dataset

N_FOLDS = 3
SPLIT_HINT = "flannel data split --folds K"


def with_folds(manifest, n_folds=N_FOLDS):
    """Deal the manifest's rows into folds round-robin within each class; rewrite it."""
    seen = Counter()
    rows = []
    for r in read_manifest(manifest):
        rows.append(replace(r, fold=seen[r.label] % n_folds))
        seen[r.label] += 1
    return write_manifest(rows, manifest)


def fake_rows(folds):
    return [ManifestRow(f"/x/{i}.png", "Normal", "normal", "toy", f"p{i}", False, "train", f)
            for i, f in enumerate(folds)]


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    manifest = with_folds(make_toy_dataset(root / "data", per_class={"train": 12}))
    cfg = TrainConfig(manifest=str(manifest), arch="resnet18", epochs=2, batch_size=8,
                      input_size=64, seed=0, threads=1)
    return cfg, root / "cv", run_cross_validation(cfg, root / "cv")


def test_fold_manifest_tests_fold_k_validates_the_next_and_trains_on_the_rest():
    rows = fold_manifest(fake_rows([0, 1, 2, 0, 1, 2]), 2)
    assert [r.split for r in rows] == ["val", "train", "test", "val", "train", "test"]
    rows = fold_manifest(fake_rows([0, 1, 2, 3]), 0, val_fold=3)
    assert [r.split for r in rows] == ["test", "train", "train", "val"]


@pytest.mark.parametrize("folds", [[-1, -1, -1], [0, 1, 2, -1], [0, 2, 2], [0, 1, 0]])
def test_manifest_without_usable_folds_is_refused_naming_the_split_command(tmp_path, folds):
    manifest = write_manifest(fake_rows(folds), tmp_path / "m.csv")
    cfg = TrainConfig(manifest=str(manifest), input_size=64)
    with pytest.raises(ValueError, match=SPLIT_HINT):
        run_cross_validation(cfg, tmp_path / "cv")
    assert not (tmp_path / "cv").exists()


def test_cli_reports_the_missing_folds(tmp_path):
    manifest = write_manifest(fake_rows([-1, -1]), tmp_path / "m.csv")
    with pytest.raises(SystemExit) as err:
        main(["train", "cv", "--manifest", str(manifest), "--out", str(tmp_path / "cv")])
    assert "2 of 2 rows have no cross-validation fold" in str(err.value.code)
    assert SPLIT_HINT in str(err.value.code)


def test_unknown_test_fold_is_refused(tmp_path):
    manifest = write_manifest(fake_rows([0, 1, 2]), tmp_path / "m.csv")
    with pytest.raises(ValueError, match=r"not \[5\]"):
        run_cross_validation(TrainConfig(manifest=str(manifest)), tmp_path / "cv", folds=[0, 5])


@pytest.mark.slow
def test_every_image_is_tested_in_exactly_one_fold(cv_run):
    cfg, out, report = cv_run
    everything = {r.path for r in read_manifest(cfg.manifest)}
    fold_rows = [read_manifest(out / f"fold{k}" / "manifest.csv") for k in range(N_FOLDS)]
    tested = [{r.path for r in rows if r.split == "test"} for rows in fold_rows]
    assert sum(len(t) for t in tested) == len(everything) == 36
    assert set().union(*tested) == everything
    for k, rows in enumerate(fold_rows):
        assert {r.path for r in rows if r.split == "val"} == tested[(k + 1) % N_FOLDS]
        assert {r.path for r in rows if r.split == "train"} == (
            everything - tested[k] - tested[(k + 1) % N_FOLDS])
    assert int(np.sum(report["confusion"])) == len(everything)
    assert report["confusion"] == np.sum([f["confusion"] for f in report["per_fold"]], 0).tolist()


@pytest.mark.slow
def test_summary_is_mean_and_sample_sd_of_the_folds_own_figures(cv_run):
    cfg, out, report = cv_run
    assert [f["fold"] for f in report["per_fold"]] == [0, 1, 2]
    for fold in report["per_fold"]:
        test = json.loads((out / f"fold{fold['fold']}" / "run" / "report.json").read_text())["test"]
        assert fold["accuracy"] == test["accuracy"] and fold["macro_f1"] == test["macro_f1"]
        assert fold["covid_recall"] == test["per_class"]["COVID-19"]["recall"]
    for name in ("accuracy", "macro_f1", "covid_recall"):
        values = [f[name] for f in report["per_fold"]]
        assert report["summary"][name]["mean"] == pytest.approx(np.mean(values))
        assert report["summary"][name]["sd"] == pytest.approx(np.std(values, ddof=1))
    assert json.loads((out / "cv_report.json").read_text()) == report
    md = (out / "cv_report.md").read_text()
    s = report["summary"]["macro_f1"]
    assert f"{s['mean']:.4f} ± {s['sd']:.4f}" in md and (out / "cv_confusion.png").is_file()


@pytest.mark.slow
def test_second_call_reuses_finished_folds_and_retrains_a_changed_config(cv_run, monkeypatch,
                                                                          caplog):
    cfg, out, first = cv_run

    def must_not_train(cfg):
        raise AssertionError(f"retrained {cfg.out}")
    monkeypatch.setattr(cv, "train_learner", must_not_train)
    caplog.set_level(logging.INFO, logger="flannel.train.cv")
    again = run_cross_validation(cfg, out)
    assert [f["reused"] for f in again["per_fold"]] == [True] * N_FOLDS
    assert again["summary"] == first["summary"] and again["confusion"] == first["confusion"]
    assert sum("reused" in m for m in caplog.messages) == N_FOLDS
    with pytest.raises(AssertionError, match="retrained"):
        run_cross_validation(replace(cfg, epochs=1), out, folds=[0])


def test_an_interrupted_fold_resumes_from_last_pt(tmp_path, monkeypatch):
    import torch

    from flannel.checkpoint import Checkpoint, save_checkpoint
    from flannel.preprocess import PreprocessSpec
    from flannel.train import cv

    cfg = TrainConfig(manifest=str(tmp_path / "m.csv"), out=str(tmp_path / "run"), input_size=64)
    run = tmp_path / "run"
    run.mkdir()
    cfg.resolved().save(run / "config.json")
    save_checkpoint(run / "last.pt", Checkpoint("resnet18", ["a", "b", "c"],
                                                PreprocessSpec.for_input_size(64),
                                                {"w": torch.zeros(1)}, train_state={"step": 1}))
    calls = []
    monkeypatch.setattr(cv, "resume_run", lambda out: calls.append(out) or
                        type("R", (), {"report": {"resumed": True}})())
    monkeypatch.setattr(cv, "train_learner", lambda c: pytest.fail("must resume, not retrain"))
    assert cv.train_or_reuse(cfg) == ({"resumed": True}, False) and calls == [cfg.out]
    other = replace(cfg, epochs=cfg.epochs + 1)  # another config: not this run's to resume
    assert not cv.interrupted_run(other)
