"""Training options end to end on a toy set: resume equals an uninterrupted run, every loss,
sampler, schedule and normalisation option trains and is recorded, and DDP keeps replicas equal."""
import csv
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from flannel.checkpoint import load_checkpoint
from flannel.preprocess import IMAGENET_MEAN
from flannel.train.config import TrainConfig
from flannel.train.loop import resume_run, train_learner
from toy_data import make_toy_dataset

pytestmark = pytest.mark.slow
SMALL = {"train": 8, "val": 4, "test": 4}


@pytest.fixture(scope="module")
def toy_manifest(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), per_class=SMALL)


def _cfg(manifest, out, **kw) -> TrainConfig:
    base = dict(manifest=str(manifest), out=str(out), arch="resnet18", epochs=2, batch_size=8,
                input_size=64, lr=1e-3, seed=0, threads=1, precision="fp32")
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_resume_reproduces_an_uninterrupted_run(toy_manifest, tmp_path, monkeypatch, ema_decay):
    cfg = _cfg(toy_manifest, tmp_path / "straight", epochs=3, schedule="warmup_cosine",
               warmup_epochs=0.5, ema_decay=ema_decay)
    straight = train_learner(cfg)

    from flannel.train import loop
    real_end_epoch = loop._end_epoch

    def killed_after_epoch_2(run, epoch, *args):
        stop = real_end_epoch(run, epoch, *args)
        if epoch == 2:
            raise KeyboardInterrupt
        return stop

    interrupted = replace(cfg, out=str(tmp_path / "interrupted"))
    monkeypatch.setattr(loop, "_end_epoch", killed_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_learner(interrupted)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "interrupted" / "last.pt").epoch == 2

    resumed = resume_run(tmp_path / "interrupted")
    a, b = load_checkpoint(straight.run_dir / "last.pt"), load_checkpoint(resumed.run_dir / "last.pt")
    for name in a.state_dict:  # augmentation draws, data order, optimiser and schedule continued
        assert torch.allclose(a.state_dict[name].float(), b.state_dict[name].float(),
                              atol=1e-6), name
    if ema_decay:  # the saved weights are the average, the trained ones travel for resuming
        raw = a.train_state["model"]
        assert not torch.equal(raw["fc.weight"], a.state_dict["fc.weight"])
        assert torch.allclose(raw["fc.weight"], b.train_state["model"]["fc.weight"], atol=1e-6)
    with (resumed.run_dir / "metrics.csv").open() as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2, 3]
    assert resumed.report["test"]["confusion"] == straight.report["test"]["confusion"]


def test_focal_sampler_onecycle_dataset_normalisation_train_and_are_recorded(toy_manifest,
                                                                               tmp_path):
    cfg = _cfg(toy_manifest, tmp_path / "run", loss="focal", focal_gamma=2.0,
               class_balance="sampler", schedule="onecycle", optimizer="adamw",
               label_smoothing=0.1, normalization="dataset", precision="auto", epochs=3)
    result = train_learner(cfg)
    ckpt = load_checkpoint(result.run_dir / "best.pt")
    # The training split's own statistics, replicated over the three channels, are in the spec.
    assert ckpt.preprocess.mean != IMAGENET_MEAN and len(set(ckpt.preprocess.mean)) == 1
    assert 0.0 < ckpt.preprocess.mean[0] < 1.0 and ckpt.preprocess.std[0] > 0
    assert ckpt.config["loss"] == "focal" and ckpt.config["class_balance"] == "sampler"
    assert ckpt.training["precision"] in ("fp32", "bf16") and ckpt.training["cpu"]
    assert result.report["training"]["reason"].startswith("auto:")
    assert "Evaluation runs in fp32" in (result.run_dir / "report.md").read_text()
    assert result.report["test"]["accuracy"] >= 0.75  # the toy problem is still learned


def test_ddp_two_cpu_processes_keep_identical_weights_and_write_once(toy_manifest, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
           "-m", "flannel.cli", "train", "--manifest", str(toy_manifest), "--out", str(out),
           "--arch", "resnet18", "--input-size", "64", "--epochs", "2", "--batch-size", "4",
           "--threads", "1", "--precision", "fp32"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    digests = report["ddp"]["replica_digests"]
    assert report["ddp"]["world_size"] == 2 and len(digests) == 2 and digests[0] == digests[1]
    with (out / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2]  # one writer: no doubled rows
    assert not list(out.glob("*.tmp"))
    # Each rank trains on its half of the 24 training images per epoch: 3 steps of 4 images.
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt.training["world_size"] == 2
    assert ckpt.train_state["scheduler"]["last_epoch"] == 2 * 3


def test_a_collapsed_network_stops_training_and_is_flagged(toy_manifest, tmp_path, monkeypatch):
    """SqueezeNet classifies through conv -> ReLU: once every head unit is dead its output is
    constant, no gradient flows, and the run must say so instead of training on for nothing."""
    from flannel.cli import main
    from flannel.train import loop
    from flannel.train.compare import compare_markdown
    from flannel.train.cv import headline_metrics

    real_build = loop.build_model

    def dead_head(arch, num_classes, **kw):
        model = real_build(arch, num_classes, **kw)
        torch.nn.init.constant_(model.classifier[1].bias, -1e3)  # every ReLU output is 0
        return model

    monkeypatch.setattr(loop, "build_model", dead_head)
    cfg = _cfg(toy_manifest, tmp_path / "dead", arch="squeezenet1_1", epochs=4)
    result = train_learner(cfg)
    with (result.run_dir / "metrics.csv").open() as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2]  # stops after 2 in a row
    assert result.report["training"]["collapsed_at_epoch"] == 1
    assert "**Collapsed at epoch 1**" in (result.run_dir / "report.md").read_text()
    row = {"arch": "squeezenet1_1", **headline_metrics(result.report, "3class"),
           "seconds_per_epoch": 1.0, "trainable_params": 1, "total_params": 1, "input_size": 64}
    table = compare_markdown({"manifest": "m.csv", "covid_class": "COVID-19", "rows": [row]})
    assert "squeezenet1_1 (collapsed at epoch 1)" in table

    with pytest.raises(SystemExit, match="collapsed at epoch 1.*lower --lr"):
        main(["train", "--manifest", str(toy_manifest), "--out", str(tmp_path / "dead_cli"),
              "--arch", "squeezenet1_1", "--epochs", "2", "--input-size", "64", "--threads", "1",
              "--precision", "fp32"])


def test_one_collapsed_epoch_that_recovers_is_not_a_collapse(toy_manifest, tmp_path,
                                                              monkeypatch, caplog):
    """Constant eval-mode answers while training-mode answers vary: BatchNorm statistics that lag
    behind the weights, not a dead network."""
    from flannel.train import loop

    verdicts = iter([True, True, False])
    monkeypatch.setattr(loop, "collapsed", lambda probs: next(verdicts))
    result = train_learner(_cfg(toy_manifest, tmp_path / "lag", epochs=3))
    with (result.run_dir / "metrics.csv").open() as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2, 3]
    assert result.report["training"]["collapsed_at_epoch"] is None
    assert "BatchNorm running statistics" in caplog.text


def test_collapse_needs_identical_outputs_for_every_image():
    from flannel.train.loop import collapsed
    import numpy as np

    same = np.tile([[0.2, 0.3, 0.5]], (6, 1))
    assert collapsed(same)
    assert not collapsed(same + np.linspace(0, 1e-3, 6)[:, None] * [1, -1, 0])
    assert not collapsed(same[:1])  # one image cannot tell


def test_precise_bn_replaces_stale_running_statistics_and_spares_frozen_layers():
    from flannel.hardware import PrecisionChoice
    from flannel.train.loop import recalibrate_batchnorm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.Conv2d(4, 4, 3), torch.nn.BatchNorm2d(4))
    for bn in (model[1], model[3]):
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(100.0)  # stale, as after weights moved faster than the averages
    for p in model[3].parameters():
        p.requires_grad = False  # frozen: its statistics must stay as they are
    batches = [(torch.randn(8, 3, 12, 12), torch.zeros(8)) for _ in range(3)]
    fp32 = PrecisionChoice("fp32", "cpu", False, "test")
    assert recalibrate_batchnorm(model, batches, 2, fp32) == 2
    with torch.no_grad():
        feats = torch.cat([model[0](x) for x, _ in batches[:2]])
    torch.testing.assert_close(model[1].running_mean, feats.mean((0, 2, 3)), atol=1e-5, rtol=1e-4)
    per_batch_var = torch.stack([model[0](x).detach().var((0, 2, 3)) for x, _ in batches[:2]])
    torch.testing.assert_close(model[1].running_var, per_batch_var.mean(0), atol=1e-5, rtol=1e-4)
    assert model[1].momentum == 0.1  # restored
    assert torch.all(model[3].running_mean == 5.0) and torch.all(model[3].running_var == 100.0)
    assert recalibrate_batchnorm(model, batches, 0, fp32) == 0
