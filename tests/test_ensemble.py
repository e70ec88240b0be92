"""FLANNEL's ensemble: the fusion module, its focal loss, learner selection, the probability cache,
the one-module ensemble against the staged path, its ONNX export and the CLI."""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from flannel.artifacts import ENSEMBLE, EXPORT_DIRNAME, read_manifest
from flannel.checkpoint import load_checkpoint, save_checkpoint
from flannel.data.records import read_manifest as read_split
from flannel.data.torch_dataset import XrayDataset
from flannel.export.sources import load_fitted, load_source
from flannel.fusion import NeuralWeightModule
from flannel.graphs import (FUSION_CHECKPOINT, MemberChanged, load_ensemble, load_fusion,
                            member_names)
from flannel.preprocess import PreprocessSpec
from flannel.train.ensemble_data import learner_probabilities, select_learners
from flannel.train.fusion_fit import fit_fusion, fused_outputs, fusion_loss, majority_vote
from run_fixtures import make_tiny_run


def _dirichlet(rng, n, learners, classes):
    return rng.dirichlet(np.ones(classes), size=(n, learners)).astype(np.float32)


# --- the module --------------------------------------------------------------------------------

def test_weights_are_a_softmax_and_the_answer_their_convex_mix():
    torch.manual_seed(0)
    module = NeuralWeightModule(4, 3)
    torch.nn.init.normal_(module.linear.weight, std=0.5)
    probs = torch.from_numpy(_dirichlet(np.random.default_rng(0), 16, 4, 3))
    fused, weights = module(probs)
    assert weights.shape == (16, 4) and fused.shape == (16, 3)
    assert torch.allclose(weights.sum(1), torch.ones(16), atol=1e-6)
    assert (weights > 0).all()
    assert torch.allclose(fused, torch.einsum("nl,nlc->nc", weights, probs), atol=1e-6)
    assert torch.allclose(fused.sum(1), torch.ones(16), atol=1e-6)
    assert weights.std(0).max() > 1e-3, "weights depend on the input, not a constant"


def test_a_fresh_module_is_the_mean_of_its_learners_and_checks_shapes():
    probs = torch.from_numpy(_dirichlet(np.random.default_rng(1), 5, 3, 3))
    fused, weights = NeuralWeightModule(3, 3)(probs)
    assert torch.allclose(weights, torch.full((5, 3), 1 / 3))
    assert torch.allclose(fused, probs.mean(1), atol=1e-7)
    with pytest.raises(ValueError, match=r"expected \(N, 3, 3\)"):
        NeuralWeightModule(3, 3)(probs[:, :2])


def test_focal_loss_of_fused_probabilities_by_hand():
    p = torch.tensor([[0.7, 0.2, 0.1]])
    t = torch.tensor([0])
    # alpha_t * (1 - p_t)^gamma * -log p_t, no second softmax over the probabilities
    expected = 2.0 * 0.3 ** 2 * -math.log(0.7)
    got = fusion_loss(p, t, gamma=2.0, alpha=torch.tensor([2.0, 1.0, 1.0]))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.0642, abs=1e-4)
    # gamma 0 and no alpha is the cross-entropy of the probabilities themselves; a mean over items
    two = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4]])
    ce = fusion_loss(two, torch.tensor([0, 1]), gamma=0.0, alpha=None)
    assert ce.item() == pytest.approx((-math.log(0.7) - math.log(0.5)) / 2, rel=1e-5)


def test_fusion_learns_to_trust_the_one_good_learner():
    rng = np.random.default_rng(0)
    n, classes = 300, 3
    targets = rng.integers(0, classes, n)
    good = np.full((n, classes), 0.1, np.float32)
    good[np.arange(n), targets] = 0.8
    noisy = _dirichlet(rng, n, 3, classes)
    probs = np.concatenate([noisy[:, :1], good[:, None], noisy[:, 1:]], axis=1)
    fit = fit_fusion(probs, targets, gammas=[2.0])
    fused, weights = fused_outputs(fit.module, probs)
    assert weights.mean(0).argmax() == 1 and weights.mean(0)[1] > 0.6
    assert (fused.argmax(1) == targets).mean() > (probs.mean(1).argmax(1) == targets).mean()
    assert (fused.argmax(1) == targets).mean() > 0.95


@pytest.mark.slow
def test_gamma_is_chosen_by_cross_validation_and_ties_go_to_the_smaller():
    rng = np.random.default_rng(3)
    targets = rng.integers(0, 3, 60)
    probs = _dirichlet(rng, 60, 2, 3)
    fit = fit_fusion(probs, targets, gammas=[0.0, 2.0])
    assert set(fit.cv_macro_f1) == {"0", "2"}
    best = max(fit.cv_macro_f1.values())
    assert fit.gamma == min(g for g in (0.0, 2.0) if fit.cv_macro_f1[f"{g:g}"] == best)
    with pytest.raises(ValueError, match="empty"):
        fit_fusion(probs[:0], targets[:0])


def test_majority_vote_breaks_ties_by_mean_probability():
    probs = np.array([[[0.6, 0.4, 0.0], [0.0, 0.9, 0.1]]], np.float32)  # one vote each: 0 and 1
    assert majority_vote(probs).argmax(1).tolist() == [1]
    assert member_names(["resnet18", "resnet18", "densenet121"]) == \
        ["resnet18", "resnet18-2", "densenet121"]


# --- selection and cache -----------------------------------------------------------------------

def _runs(tmp_path, f1s):
    archs = ["resnet18", "squeezenet1_1", "mobilenet_v3_small", "shufflenet_v2_x1_0"]
    return [make_tiny_run(tmp_path, arch=a, crop=64, val_macro_f1=f) for a, f in zip(archs, f1s)]


def test_selection_keeps_the_best_k_by_validation_macro_f1(tmp_path):
    runs = _runs(tmp_path, [0.61, 0.83, 0.47, 0.72])
    chosen, ranking = select_learners(runs, k=2)
    assert [c.arch for c in chosen] == ["squeezenet1_1", "shufflenet_v2_x1_0"]
    assert [c.val_macro_f1 for c in ranking] == [0.83, 0.72, 0.61, 0.47]
    with pytest.raises(ValueError, match="4 usable learner runs given .* k = 5"):
        select_learners(runs, k=5)


def test_selection_skips_collapsed_runs(tmp_path):
    runs = _runs(tmp_path, [0.61, 0.83, 0.47])
    report = runs[1] / "report.json"
    report.write_text(json.dumps({"training": {"collapsed_at_epoch": 2}}))
    chosen, ranking = select_learners(runs, k=2)
    assert [c.arch for c in chosen] == ["resnet18", "mobilenet_v3_small"]
    assert ranking[0].collapsed_at_epoch == 2
    with pytest.raises(ValueError, match=r"2 usable .*\(1 collapsed\)"):
        select_learners(runs, k=3)


def test_selection_refuses_runs_of_other_classes_or_splits(tmp_path):
    runs = _runs(tmp_path / "a", [0.6, 0.7])
    other_split = make_tiny_run(tmp_path / "b", arch="resnet18", seed=5, val_macro_f1=0.5)
    with pytest.raises(ValueError, match="an ensemble needs one split"):
        select_learners([*runs, other_split], k=2)
    ckpt = load_checkpoint(runs[0] / "best.pt")
    ckpt.class_names = list(reversed(ckpt.class_names))
    save_checkpoint(runs[0] / "best.pt", ckpt)
    with pytest.raises(ValueError, match="one label scheme"):
        select_learners(runs, k=2)
    unfinished = make_tiny_run(tmp_path / "c", arch="resnet18")
    with pytest.raises(ValueError, match="no validation macro-F1"):
        select_learners([unfinished], k=1)


def test_cache_is_reused_and_invalidated_by_a_changed_checkpoint(tmp_path, caplog):
    runs = _runs(tmp_path, [0.6, 0.7])
    chosen, _ = select_learners(runs, k=2)
    spec = PreprocessSpec.for_input_size(64)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="flannel.train.ensemble_data"):
        first = learner_probabilities(chosen, spec, cache, batch_size=4)
        assert caplog.text.count("computed") == 2
        files = sorted(cache.glob("*.npz"))
        stamps = [f.stat().st_mtime_ns for f in files]
        caplog.clear()
        again = learner_probabilities(chosen, spec, cache, batch_size=4)
        assert caplog.text.count("cached in") == 2 and "computed" not in caplog.text
    assert [f.stat().st_mtime_ns for f in files] == stamps
    for split in ("train", "val", "test"):
        assert np.array_equal(first[split].probs, again[split].probs)
        assert first[split].probs.shape[1:] == (2, 3)
        assert np.allclose(first[split].probs.sum(2), 1, atol=1e-5)
    # retrain one learner: its cache key changes, the other learner's entry is still used
    ckpt = load_checkpoint(runs[1] / "best.pt")
    ckpt.state_dict = {k: v + 0.01 if v.is_floating_point() else v
                       for k, v in ckpt.state_dict.items()}
    save_checkpoint(runs[1] / "best.pt", ckpt)
    chosen, _ = select_learners(runs, k=2)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flannel.train.ensemble_data"):
        changed = learner_probabilities(chosen, spec, cache, batch_size=4)
    assert caplog.text.count("computed") == 1 and caplog.text.count("cached in") == 1
    assert len(list(cache.glob("*.npz"))) == 3
    arch_changed = [c.arch for c in chosen].index("squeezenet1_1")
    assert not np.allclose(changed["val"].probs[:, arch_changed], first["val"].probs[:, 1])


# --- the fitted ensemble -----------------------------------------------------------------------

def test_ensemble_folder_report_and_fusion_checkpoint(tiny_ensemble):
    fusion, meta = load_fusion(tiny_ensemble / FUSION_CHECKPOINT)
    assert [m["name"] for m in meta["members"]] == ["resnet18", "mobilenet_v3_small",
                                                    "squeezenet1_1"]
    assert all(len(m["checkpoint_sha256"]) == 64 and m["preprocess"] for m in meta["members"])
    assert meta["gamma"] in (0.0, 2.0) and meta["fitted_on"] == "val"
    report = json.loads((tiny_ensemble / "ensemble_report.json").read_text())
    names = [r["name"] for r in report["methods"]["test"]]
    assert names[:3] == [m["name"] for m in meta["members"]] and "mean" in names and "majority vote" in names
    assert any(n.startswith("FLANNEL (gamma 10") for n in names)
    md = (tiny_ensemble / "ensemble_report.md").read_text()
    assert "stacking (logistic)" in md and "sick called Normal" in md
    assert (tiny_ensemble / "learner_weights.png").stat().st_size > 1000
    assert len(list((tiny_ensemble / "confusion").glob("*.png"))) == len(names)


def _test_batch(ensemble_dir: Path, meta: dict) -> torch.Tensor:
    spec = PreprocessSpec.from_dict(meta["input_spec"])
    rows = read_split(meta["config"]["manifest"], split="test")
    dataset = XrayDataset(rows, meta["class_names"], spec, cache=False)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def test_fused_module_equals_the_staged_computation(tiny_ensemble):
    module, meta = load_ensemble(tiny_ensemble)
    assert module.learners[0].preprocess.input_side == 73  # the 64 px learners' resize
    x = _test_batch(tiny_ensemble, meta)
    with torch.no_grad():
        _, weights, _ = module(x)
        fused = module.parts(x)[0]  # before the calibration export fits (the identity here)
    from flannel.train.ensemble_data import candidate
    chosen = [candidate(m["run_dir"]) for m in meta["members"]]
    cached = learner_probabilities(chosen, PreprocessSpec.from_dict(meta["input_spec"]),
                                   tiny_ensemble / "cache")["test"]
    staged_fused, staged_weights = fused_outputs(load_fusion(tiny_ensemble / FUSION_CHECKPOINT)[0],
                                                 cached.probs)
    assert np.abs(fused.numpy() - staged_fused).max() < 1e-6
    assert np.abs(weights.numpy() - staged_weights).max() < 1e-6


def test_a_changed_member_is_refused_by_name(tiny_ensemble, tmp_path):
    copy = shutil.copytree(tiny_ensemble.parent, tmp_path / "copy")
    fusion_path = copy / "ensemble" / FUSION_CHECKPOINT
    payload = torch.load(fusion_path, weights_only=True)
    member = payload["meta"]["members"][0]
    member["checkpoint"] = str(copy / Path(member["checkpoint"]).relative_to(tiny_ensemble.parent))
    torch.save(payload, fusion_path)
    ckpt = load_checkpoint(member["checkpoint"])
    ckpt.epoch = 7
    save_checkpoint(member["checkpoint"], ckpt)
    with pytest.raises(MemberChanged, match=r"member resnet18: .* has sha256 .* fit the ensemble"):
        load_ensemble(copy / "ensemble")


def test_ensemble_exports_to_one_onnx_graph_that_passes_parity(tiny_ensemble, tmp_path):
    from flannel.export.parity import run_parity

    export_dir = tiny_ensemble / EXPORT_DIRNAME
    manifest = read_manifest(export_dir)
    assert manifest["kind"] == "ensemble"
    assert tuple(manifest["graph"]["output_names"]) == ENSEMBLE.output_names
    assert [m["name"] for m in manifest["members"]] == ["resnet18", "mobilenet_v3_small",
                                                        "squeezenet1_1"]
    assert manifest["input"]["spec"]["resize"] == 73
    session = ort.InferenceSession(str(export_dir / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    source = load_source(tiny_ensemble)
    load_fitted(source, export_dir, manifest)  # the temperature and OOD statistics export fitted
    module, meta = source.module, load_fusion(tiny_ensemble / "fusion.pt")[1]
    x = _test_batch(tiny_ensemble, meta)
    probs, weights, ood = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        ref_probs, ref_weights, ref_ood = module(x)
    assert np.abs(probs - ref_probs.numpy()).max() < 1e-4
    assert np.abs(weights - ref_weights.numpy()).max() < 1e-4
    np.testing.assert_allclose(ood, ref_ood.numpy(), rtol=1e-3, atol=1e-4)
    assert ood.shape == (len(x),) and float(module.calibration.scale[0]) != 1.0
    assert weights.shape == (len(x), 3) and np.allclose(weights.sum(1), 1, atol=1e-5)
    copy = shutil.copytree(tiny_ensemble.parent, tmp_path / "copy")
    report = run_parity(copy / "ensemble")
    assert report.passed and report.kind == "ensemble"
    assert report.members == ["resnet18", "mobilenet_v3_small", "squeezenet1_1"]
    assert {c.output for c in report.checks} >= {"probabilities", "learner_weights"}
    assert len(report.val_labels) == 3  # the stratified sample holds every class


@pytest.mark.slow
def test_cli_trains_and_evaluates_an_ensemble(tmp_path, capsys):
    from flannel.cli import main

    runs = _runs(tmp_path, [0.6, 0.7, 0.5])
    out = tmp_path / "ens"
    assert main(["ensemble", "train", "--runs", ",".join(map(str, runs)), "--k", "2",
                 "--gammas", "0,1", "--batch-size", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "# FLANNEL ensemble of squeezenet1_1, resnet18" in printed
    _, meta = load_fusion(out / FUSION_CHECKPOINT)
    assert [m["arch"] for m in meta["members"]] == ["squeezenet1_1", "resnet18"]
    (out / "ensemble_report.md").unlink()
    assert main(["ensemble", "eval", str(out)]) == 0
    assert (out / "ensemble_report.md").is_file()
    with pytest.raises(SystemExit, match="give --runs"):
        main(["ensemble", "train", "--out", str(tmp_path / "none")])


@pytest.mark.slow
def test_paper_preset_builds_exports_and_passes_parity_at_a_tiny_size(tmp_path):
    """FLANNEL's five (densenet161, inception_v3, resnet152, resnext101_32x8d, vgg19_bn) as one
    graph: inception_v3's larger input makes the others resize inside the graph."""
    from flannel.export.answer_policy import PolicyConfig
    from flannel.export.onnx_export import export_onnx
    from flannel.export.parity import run_parity
    from flannel.registry import get_arch
    from flannel.train.ensemble import PRESETS
    from run_fixtures import make_tiny_ensemble

    members = [(arch, max(64, get_arch(arch).min_size), 0.9 - 0.1 * i)
               for i, arch in enumerate(PRESETS["paper"])]
    ens = make_tiny_ensemble(tmp_path, members=members, k=5)
    # The graph is under test here; the OOD sets' figures are tested on the tiny run.
    export_onnx(ens, policy=PolicyConfig(ood_sets=False))
    report = run_parity(ens)
    assert report.passed and sorted(report.members) == sorted(PRESETS["paper"])
    manifest = read_manifest(ens / EXPORT_DIRNAME)
    sides = {m["name"]: m["preprocess"]["crop"] for m in manifest["members"]}
    assert manifest["input"]["spec"]["resize"] > min(sides.values())


@pytest.mark.slow
def test_the_report_calibrates_the_fused_probabilities_on_validation(tiny_ensemble):
    report = json.loads((tiny_ensemble / "ensemble_report.json").read_text())
    calibration = report["calibration"]
    assert calibration["scaling"]["kind"] == "temperature"
    assert calibration["scaling"]["temperature"] > 0 and calibration["bins"] == 15
    for split in report["methods"]:
        before, after = calibration[split]["before"], calibration[split]["after"]
        assert before["images"] == report["images"][split]
        assert after["accuracy"] == before["accuracy"]  # a temperature keeps every decision
        assert 0 <= after["ece"] <= 1 and 0 <= after["brier"] <= 2
    # fitted by NLL on validation (T = 1 is where the search starts): never a worse NLL there
    assert calibration["val"]["after"]["nll"] <= calibration["val"]["before"]["nll"] + 1e-9
    markdown = (tiny_ensemble / "ensemble_report.md").read_text()
    assert "## Calibration of the fused probabilities" in markdown
    assert (tiny_ensemble / "reliability.png").read_bytes()[:4] == b"\x89PNG"


def _overconfident_learners(n: int, seed: int):
    """(N, 2, 3) probabilities of a calibrated learner and of one four times too sure, and the
    labels, drawn from the calibrated learner's own probabilities."""
    from flannel.calibration import softmax

    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (n, 3))
    labels = np.array([rng.choice(3, p=p) for p in softmax(logits)])
    return np.stack([softmax(logits), softmax(4.0 * logits)], axis=1), labels


def test_each_learner_gets_its_own_temperature_fitted_on_validation():
    from flannel.train.ensemble import learner_calibration
    from flannel.train.ensemble_data import SplitProbs
    from flannel.train.ensemble_report import learner_calibration_markdown

    data = {s: SplitProbs(*_overconfident_learners(400, seed), paths=[])
            for s, seed in (("val", 0), ("test", 1))}
    figures = learner_calibration(data, ["calibrated", "overconfident"], ["val", "test"], None)
    t = {name: f["scaling"]["temperature"] for name, f in figures.items()}
    assert 0.7 < t["calibrated"] < 1.4 and t["overconfident"] > 2.5
    for i, (name, f) in enumerate(figures.items()):
        for split in ("val", "test"):
            before, after = f[split]["before"], f[split]["after"]
            own = (data[split].probs[:, i].argmax(1) == data[split].targets).mean()
            assert before["accuracy"] == after["accuracy"] == pytest.approx(own)
    test = figures["overconfident"]["test"]
    assert test["after"]["ece"] < test["before"]["ece"] / 2
    table = "\n".join(learner_calibration_markdown(figures))
    assert "## Calibration of each learner" in table
    assert f"| overconfident | {t['overconfident']:.3f} | " in table


@pytest.mark.slow
def test_the_report_calibrates_each_learner_on_validation(tiny_ensemble):
    report = json.loads((tiny_ensemble / "ensemble_report.json").read_text())
    learners = report["learner_calibration"]
    assert list(learners) == report["members"]
    for name, figures in learners.items():
        assert figures["scaling"]["temperature"] > 0 and figures["fitted_on"]["split"] == "val"
        for split, rows in report["methods"].items():
            row = next(r for r in rows if r["name"] == name)
            before, after = figures[split]["before"], figures[split]["after"]
            assert before["accuracy"] == pytest.approx(row["accuracy"])  # the learner's own
            assert after["accuracy"] == before["accuracy"]
            assert all(math.isfinite(v) for f in (before, after) for v in f.values())
        assert (tiny_ensemble / figures["diagram"]).read_bytes()[:4] == b"\x89PNG"
    markdown = (tiny_ensemble / "ensemble_report.md").read_text()
    assert "## Calibration of each learner" in markdown
    assert all(f"| {name} | " in markdown for name in learners)
