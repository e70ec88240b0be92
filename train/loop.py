"""Train one base learner on a split manifest and write a run folder.

    flannel train --manifest data/manifest.csv --arch resnet18 --epochs 5 --out runs/resnet18

Run folder: ``config.json`` (resolved), ``metrics.csv`` (one row per epoch), ``best.pt`` (best
validation macro-F1) and ``last.pt`` checkpoints, and the report (``report.json``, ``report.md``,
confusion matrices as CSV and PNG). The folder is created if needed and never wiped.
"""
from __future__ import annotations

import csv
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from flannel.checkpoint import Checkpoint, library_versions, load_checkpoint, save_checkpoint
from flannel.data.records import read_manifest
from flannel.data.torch_dataset import XrayDataset, check_readable
from flannel.labels import get_scheme
from flannel.preprocess import PreprocessSpec
from flannel.registry import build_model, freeze, get_arch
from flannel.train.augment import get_transform
from flannel.train.config import TrainConfig
from flannel.train.evaluate import predict, split_metrics
from flannel.train.report import write_report

log = logging.getLogger(__name__)
EPOCH_FIELDS = ("epoch", "train_loss", "train_images_per_s", "val_loss", "val_accuracy",
                "val_macro_f1", "epoch_seconds", "lr")


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    best_val_macro_f1: float
    report: dict


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def _class_weights(targets: list[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, normalised to mean 1 (absent classes get weight 0)."""
    counts = np.bincount(targets, minlength=num_classes).astype(float)
    w = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
    return torch.tensor(w * num_classes / w.sum(), dtype=torch.float32)


def _datasets(cfg: TrainConfig, class_names: list[str], spec: PreprocessSpec):
    rows = read_manifest(cfg.manifest)
    by_split = {s: [r for r in rows if r.split == s] for s in ("train", "val", "test")}
    if not by_split["train"] or not by_split["val"]:
        raise ValueError(f"{cfg.manifest}: the train and val splits must not be empty")
    train = XrayDataset(by_split["train"], class_names, spec, transform=get_transform(cfg.augment))
    val = XrayDataset(by_split["val"], class_names, spec)
    test = XrayDataset(by_split["test"], class_names, spec)
    bad = [p for ds in (train, val, test) for p in check_readable(ds)]
    if bad:
        listing = "\n".join(f"  {path}: {reason}" for path, reason in bad)
        raise ValueError(f"{len(bad)} file(s) in {cfg.manifest} cannot be decoded:\n{listing}")
    return train, val, test


def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


def _train_epoch(model, loader, loss_fn, optimizer, epoch: int, epochs: int) -> tuple[float, float]:
    model.train()
    total, seen, start = 0.0, 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False,
               disable=None, dynamic_ncols=True)
    for x, y in bar:
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        logits = out.logits if hasattr(out, "logits") else out  # inception_v3 aux outputs
        loss = loss_fn(logits, y)
        if hasattr(out, "aux_logits") and out.aux_logits is not None:
            loss = loss + 0.4 * loss_fn(out.aux_logits, y)  # torchvision's reference weight
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(y)
        seen += len(y)
        bar.set_postfix(loss=f"{total / seen:.4f}",
                        img_s=f"{seen / (time.perf_counter() - start):.1f}")
    return total / max(1, seen), seen / (time.perf_counter() - start)


def train_learner(cfg: TrainConfig) -> TrainResult:
    """Train one learner as configured and write its run folder.

    Args:
        cfg: the training config; it is resolved and saved as ``config.json``.

    Returns:
        The run folder, the best epoch and its validation macro-F1, and the final report.
    """
    cfg = cfg.resolved()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed, cfg.deterministic)
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.json")
    class_names = list(get_scheme(cfg.scheme).classes)
    spec = PreprocessSpec.for_input_size(cfg.input_size)
    train_ds, val_ds, test_ds = _datasets(cfg, class_names, spec)
    log.info("%s: %d train / %d val / %d test images, classes %s, input %d px",
             cfg.arch, len(train_ds), len(val_ds), len(test_ds), class_names, cfg.input_size)

    model = freeze(build_model(cfg.arch, len(class_names), weights=cfg.weights),
                   get_arch(cfg.arch), cfg.freeze)
    weights = _class_weights(train_ds.targets, len(class_names)) if cfg.class_balance == "loss" else None
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    optimizer = _optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, drop_last=False,
                        generator=torch.Generator().manual_seed(cfg.seed))

    best_f1, best_epoch, stale, started = -1.0, 0, 0, time.perf_counter()
    with (run_dir / "metrics.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=EPOCH_FIELDS)
        writer.writeheader()
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            train_loss, img_s = _train_epoch(model, loader, loss_fn, optimizer, epoch, cfg.epochs)
            val = split_metrics(predict(model, val_ds, cfg.batch_size), class_names, cfg.scheme)
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            row = {"epoch": epoch, "train_loss": round(train_loss, 5),
                   "train_images_per_s": round(img_s, 1), "val_loss": round(val["loss"], 5),
                   "val_accuracy": round(val["accuracy"], 4), "val_macro_f1": round(val["macro_f1"], 4),
                   "epoch_seconds": round(time.perf_counter() - t0, 1), "lr": lr}
            writer.writerow(row)
            fh.flush()
            eta = (time.perf_counter() - started) / epoch * (cfg.epochs - epoch)
            log.info("epoch %d/%d  train loss %.4f  %.1f img/s  val loss %.4f  acc %.3f  "
                     "macro-F1 %.3f  (%.0fs, ETA %.0fs)", epoch, cfg.epochs, train_loss, img_s,
                     val["loss"], val["accuracy"], val["macro_f1"], row["epoch_seconds"], eta)
            ckpt = Checkpoint(cfg.arch, class_names, spec, model.state_dict(), cfg.to_dict(),
                              {"val": _summary(val)}, library_versions(), epoch)
            save_checkpoint(run_dir / "last.pt", ckpt)
            if val["macro_f1"] > best_f1:
                best_f1, best_epoch, stale = val["macro_f1"], epoch, 0
                save_checkpoint(run_dir / "best.pt", ckpt)
            else:
                stale += 1
                if cfg.patience and stale >= cfg.patience:
                    log.info("early stop: no better val macro-F1 for %d epochs", stale)
                    break

    report = _final_report(run_dir, cfg, val_ds, test_ds, time.perf_counter() - started)
    return TrainResult(run_dir, best_epoch, best_f1, report)


def _summary(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("accuracy", "macro_f1", "loss", "n")}


def _final_report(run_dir: Path, cfg: TrainConfig, val_ds, test_ds, seconds: float) -> dict:
    """Evaluate ``best.pt`` on val and test, store the figures in it, and write the report."""
    ckpt = load_checkpoint(run_dir / "best.pt")
    model = ckpt.build_model()
    splits = {"val": split_metrics(predict(model, val_ds, cfg.batch_size), ckpt.class_names, cfg.scheme)}
    if len(test_ds):
        splits["test"] = split_metrics(predict(model, test_ds, cfg.batch_size), ckpt.class_names,
                                       cfg.scheme)
    ckpt.metrics = {s: _summary(m) for s, m in splits.items()}
    save_checkpoint(run_dir / "best.pt", ckpt)
    return write_report(run_dir, cfg.to_dict(), ckpt.epoch, splits, seconds)
