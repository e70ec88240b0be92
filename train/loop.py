"""Train one base learner on a split manifest and write a run folder.

    flannel train --manifest data/manifest.csv --arch resnet18 --epochs 5 --out runs/resnet18
    flannel train --resume runs/resnet18 --epochs 8
    torchrun --standalone --nproc_per_node 2 -m flannel.cli train --manifest data/manifest.csv

Run folder: ``config.json`` (resolved), ``metrics.csv`` (one row per epoch), ``best.pt`` (best
validation macro-F1) and ``last.pt`` (with optimiser, scheduler and RNG state for ``--resume``)
checkpoints, and the report (``report.json``, ``report.md``, confusion matrices as CSV and PNG,
``reliability.png``: temperature scaling fitted on validation).
The folder is created if needed and never wiped. Training runs in the precision
``flannel.hardware.choose_precision`` picks; evaluation and export always run in fp32. Under
torchrun only rank 0 writes files.
"""
from __future__ import annotations

import csv
import json
import logging
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm import tqdm

from flannel.checkpoint import Checkpoint, library_versions, load_checkpoint, save_checkpoint
from flannel.hardware import PrecisionChoice, choose_precision
from flannel.labels import get_scheme
from flannel.registry import build_model, freeze, get_arch, train_mode
from flannel.train import distributed as D
from flannel.train.config import TrainConfig
from flannel.train.data_setup import build_datasets, to_device
from flannel.train.evaluate import predict, split_metrics
from flannel.train.losses import build_loss, inverse_frequency
from flannel.train.report import write_report
from flannel.train.report_checks import report_checks
from flannel.train.schedule import build_optimizer, build_scheduler

log = logging.getLogger(__name__)
EPOCH_FIELDS = ("epoch", "train_loss", "train_images_per_s", "val_loss", "val_accuracy",
                "val_macro_f1", "epoch_seconds", "lr")
# Progress bar refresh interval in steps: reading the loss forces a device sync on CUDA.
LOG_EVERY_STEPS = 10
# torchvision's reference weight of inception_v3's auxiliary classifier loss.
AUX_LOSS_WEIGHT = 0.4
# Largest spread of a class probability over the validation images that still counts as "the
# output does not depend on the input" (a collapsed network, e.g. a head of dead ReLUs).
COLLAPSE_SPREAD = 1e-6
# A network is dead when its answers are the same for every image in eval mode (validation) and in
# training mode (the spread of each logit within a training batch). Eval mode alone is not enough:
# early on, BatchNorm running statistics that lag behind the weights saturate every answer to the
# same one-hot vector while the network trains well. In training mode a dying head can still twitch
# (dropout lets a unit fire now and then), so the bar there is a logit spread below
# COLLAPSE_TRAIN_SPREAD: it tells no image from another. Consecutive dead epochs that stop a run:
COLLAPSE_TRAIN_SPREAD = 1e-3
COLLAPSE_EPOCHS = 2


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    best_val_macro_f1: float
    report: dict


@dataclass
class _Progress:
    """Early-stopping state, saved in last.pt."""

    best_f1: float = -1.0
    best_epoch: int = 0
    stale: int = 0
    seconds: float = 0.0
    epochs_done: int = 0
    collapsed_at: int = 0
    # First epoch of the current run of collapsed epochs (0: the last epoch was not collapsed).
    collapsed_since: int = 0


@dataclass
class _Run:
    """Everything one training run holds while it trains."""

    cfg: TrainConfig
    run_dir: Path
    class_names: list[str]
    spec: object
    model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: D.EpochSampler
    loader: DataLoader
    choice: PrecisionChoice
    dist: D.DistInfo
    datasets: tuple
    scaler: torch.amp.GradScaler | None = None
    ema: AveragedModel | None = None
    progress: _Progress = field(default_factory=_Progress)

    @property
    def bare_model(self) -> nn.Module:
        return self.model.module if isinstance(self.model, nn.parallel.DistributedDataParallel) \
            else self.model

    @property
    def evaluated_model(self) -> nn.Module:
        """The weights validated and saved: the EMA copy when enabled, else the trained model."""
        return self.ema.module if self.ema is not None else self.bare_model


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def _rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"bit_generator": np_state["bit_generator"],
                      "key": np_state["state"]["key"].tolist(), "pos": np_state["state"]["pos"],
                      "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]}}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"], "has_gauss": n["has_gauss"],
                         "gauss": n["gauss"],
                         "state": {"key": np.asarray(n["key"], dtype=np.uint32), "pos": n["pos"]}})


def _class_weights(cfg: TrainConfig, targets: list[int], num_classes: int) -> torch.Tensor | None:
    """Per-class loss weights (cross-entropy ``weight``, focal ``alpha``).

    An explicit ``focal_alpha`` wins; otherwise ``class_balance=loss`` (the default) gives inverse
    class frequency, FLANNEL's alpha; a balanced sampler or ``none`` gives no weights.
    """
    if cfg.loss == "focal" and cfg.focal_alpha is not None:
        if len(cfg.focal_alpha) != num_classes:
            raise ValueError(f"focal_alpha has {len(cfg.focal_alpha)} values for {num_classes} "
                             "classes")
        return torch.tensor(cfg.focal_alpha, dtype=torch.float32)
    if cfg.class_balance == "loss":
        return inverse_frequency(targets, num_classes)
    return None


def _setup(cfg: TrainConfig) -> _Run:
    cfg = cfg.resolved()
    choice = choose_precision(cfg.precision)
    info = D.init_distributed(choice.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed, cfg.deterministic)
    run_dir = Path(cfg.out)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.json")
    log.info("precision: %s", choice.reason)
    class_names = list(get_scheme(cfg.scheme).classes)
    train_ds, val_ds, test_ds, spec = build_datasets(cfg, class_names)
    log.info("%s: %d train / %d val / %d test images, classes %s, input %d px, mean %.3f std %.3f "
             "(%s), world size %d", cfg.arch, len(train_ds), len(val_ds), len(test_ds),
             class_names, cfg.input_size, spec.mean[0], spec.std[0], cfg.normalization,
             info.world_size)
    if info.world_size > 1 and cfg.precise_bn_batches:
        log.info("precise BN is off under DDP (each rank would compute different statistics); "
                 "BatchNorm keeps its running averages")
    model = freeze(build_model(cfg.arch, len(class_names), weights=cfg.weights),
                   get_arch(cfg.arch), cfg.freeze)
    model = model.to(choice.device, memory_format=torch.channels_last if choice.channels_last
                     else torch.preserve_format)
    if info.enabled:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if choice.device == "cuda" else None)
    weights = _class_weights(cfg, train_ds.targets, len(class_names))
    loss_fn = build_loss(cfg.loss, weights, cfg.focal_gamma, cfg.label_smoothing).to(choice.device)
    optimizer = build_optimizer(cfg.optimizer, model, cfg.lr, cfg.weight_decay)
    sampler = D.EpochSampler(train_ds.targets, cfg.seed, cfg.class_balance == "sampler", info)
    # Workers would each copy the image cache and compete with the compute threads for 2 cores;
    # augmentation on cached images is cheap next to a training step.
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=0,
                        pin_memory=choice.device == "cuda")
    steps = cfg.epochs * len(loader)
    scheduler = build_scheduler(optimizer, cfg.schedule, steps,
                                int(round(cfg.warmup_epochs * len(loader))))
    scaler = torch.amp.GradScaler("cuda") if choice.uses_grad_scaler else None
    run = _Run(cfg, run_dir, class_names, spec, model, loss_fn, optimizer, scheduler, sampler,
               loader, choice, info, (train_ds, val_ds, test_ds), scaler)
    if cfg.ema_decay:
        # BatchNorm statistics are averaged too (use_buffers): from-scratch runs validate on
        # running statistics that otherwise jump from epoch to epoch.
        run.ema = AveragedModel(run.bare_model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay),
                                use_buffers=True)
    return run


def _autocast(choice: PrecisionChoice):
    dtype = choice.autocast_dtype
    return torch.autocast(choice.device, dtype=dtype) if dtype is not None else nullcontext()


def forward_loss(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor,
                 y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of one training batch, including inception_v3's auxiliary classifier, and the
    main logits."""
    out = model(x)
    logits = out.logits if hasattr(out, "logits") else out
    loss = loss_fn(logits.float(), y)
    aux = getattr(out, "aux_logits", None)
    if aux is not None:
        loss = loss + AUX_LOSS_WEIGHT * loss_fn(aux.float(), y)
    return loss, logits


def training_loss(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor,
                  y: torch.Tensor) -> torch.Tensor:
    """The loss of one training batch, including inception_v3's auxiliary classifier."""
    return forward_loss(model, loss_fn, x, y)[0]


def _step_loss(run: _Run, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with _autocast(run.choice):
        return forward_loss(run.model, run.loss_fn, x, y)


def _train_epoch(run: _Run, epoch: int) -> tuple[float, float, float]:
    """One epoch; returns (mean loss, images/s, the largest spread of a logit within a batch)."""
    train_mode(run.model)
    run.sampler.set_epoch(epoch)
    total = torch.zeros((), dtype=torch.float64, device=run.choice.device)
    # Whether training-mode outputs depend on the input at all, without a host sync per step.
    spread = torch.zeros((), dtype=torch.float32, device=run.choice.device)
    seen, start = 0, time.perf_counter()
    bar = tqdm(run.loader, desc=f"epoch {epoch}/{run.cfg.epochs}", unit="batch", leave=False,
               disable=None if run.dist.is_main else True, dynamic_ncols=True)
    for i, (x, y) in enumerate(bar):
        x = to_device(x, run.choice.device, run.choice.channels_last)
        y = y.to(run.choice.device, non_blocking=True)
        run.optimizer.zero_grad(set_to_none=True)
        loss, logits = _step_loss(run, x, y)
        if len(y) > 1:
            spread = torch.maximum(spread, logits.detach().float().std(dim=0).max())
        if run.scaler is not None:
            run.scaler.scale(loss).backward()
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            loss.backward()
            run.optimizer.step()
        run.scheduler.step()
        if run.ema is not None:
            run.ema.update_parameters(run.bare_model)
        total += loss.detach().double() * len(y)
        seen += len(y)
        if (i + 1) % LOG_EVERY_STEPS == 0:
            bar.set_postfix(loss=f"{float(total) / seen:.4f}",
                            img_s=f"{seen * run.dist.world_size / (time.perf_counter() - start):.1f}")
    return (float(total) / max(1, seen), seen * run.dist.world_size / (time.perf_counter() - start),
            float(spread))


def recalibrate_batchnorm(model: nn.Module, loader, batches: int, choice: PrecisionChoice) -> int:
    """Precise BN: recompute the running mean and variance of every trainable BatchNorm layer as
    the plain average over ``batches`` training batches with the current weights (frozen layers
    keep theirs). Returns the number of batches used (0 when there is nothing to do)."""
    train_mode(model)
    layers = [m for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if batches <= 0 or not layers:
        return 0
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    used = 0
    with torch.no_grad(), _autocast(choice):
        for x, _ in loader:
            if used >= batches:
                break
            model(to_device(x, choice.device, choice.channels_last))
            used += 1
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    return used


def _training_record(run: _Run) -> dict:
    return {**run.choice.to_dict(), "world_size": run.dist.world_size,
            "threads": torch.get_num_threads(),
            "collapsed_at_epoch": run.progress.collapsed_at or None}


def collapsed(probs: np.ndarray) -> bool:
    """Whether every image got the same class probabilities (needs two images or more)."""
    return len(probs) > 1 and float(probs.std(axis=0).max()) < COLLAPSE_SPREAD


def collapse_message(arch: str, epoch: int, lr: float) -> str:
    return (f"{arch} collapsed at epoch {epoch}: every validation image gets the same "
            f"probabilities, in eval and in training mode, and still did an epoch later, so no "
            f"gradient reaches the weights any more (typically a layer of dead ReLUs after too high a learning rate). Train again "
            f"with a lower --lr than {lr:g}, or with a warm-up (--schedule warmup_cosine).")


def _checkpoint(run: _Run, epoch: int, val: dict, with_state: bool) -> Checkpoint:
    state = None
    if with_state:
        p = run.progress
        state = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                 "rng": _rng_state(), "best_f1": p.best_f1, "best_epoch": p.best_epoch,
                 "stale": p.stale, "seconds": p.seconds, "collapsed_at": p.collapsed_at,
                 "collapsed_since": p.collapsed_since,
                 "scaler": run.scaler.state_dict() if run.scaler is not None else None}
        if run.ema is not None:
            state["model"] = run.bare_model.state_dict()
            state["ema_n_averaged"] = run.ema.n_averaged
    return Checkpoint(run.cfg.arch, run.class_names, run.spec, run.evaluated_model.state_dict(),
                      run.cfg.to_dict(), {"val": _summary(val)}, library_versions(), epoch,
                      _training_record(run), state)


def _validate(run: _Run) -> dict:
    """Validation metrics in fp32 with the training loss (same weights), on rank 0 only."""
    pred = predict(run.evaluated_model, run.datasets[1], run.cfg.batch_size, run.loss_fn)
    out = split_metrics(pred, run.class_names, run.cfg.scheme)
    out["collapsed"] = collapsed(pred.probs)
    return out


def _end_epoch(run: _Run, epoch: int, train_loss: float, img_s: float, train_spread: float,
               t0: float, writer: csv.DictWriter, fh) -> bool:
    """Validate, log, checkpoint; returns True when early stopping says stop (rank 0)."""
    val = _validate(run)
    p = run.progress
    seconds = time.perf_counter() - t0
    p.seconds += seconds
    p.epochs_done = epoch
    row = {"epoch": epoch, "train_loss": round(train_loss, 5), "train_images_per_s": round(img_s, 1),
           "val_loss": round(val["loss"], 5), "val_accuracy": round(val["accuracy"], 4),
           "val_macro_f1": round(val["macro_f1"], 4), "epoch_seconds": round(seconds, 1),
           "lr": run.optimizer.param_groups[0]["lr"]}
    writer.writerow(row)
    fh.flush()
    eta = p.seconds / epoch * (run.cfg.epochs - epoch)
    log.info("epoch %d/%d  train loss %.4f  %.1f img/s  val loss %.4f  acc %.3f  macro-F1 %.3f  "
             "(%.0fs, ETA %.0fs)", epoch, run.cfg.epochs, train_loss, img_s, val["loss"],
             val["accuracy"], val["macro_f1"], seconds, eta)
    improved = val["macro_f1"] > p.best_f1
    if improved:
        p.best_f1, p.best_epoch, p.stale = val["macro_f1"], epoch, 0
    else:
        p.stale += 1
    if improved:
        save_checkpoint(run.run_dir / "best.pt", _checkpoint(run, epoch, val, with_state=False))
    save_checkpoint(run.run_dir / "last.pt", _checkpoint(run, epoch, val, with_state=True))
    # Dead: constant answers in eval mode and in training mode (dead ReLUs give no gradient).
    dead = val["collapsed"] and train_spread < COLLAPSE_TRAIN_SPREAD
    p.collapsed_since = (p.collapsed_since or epoch) if dead else 0
    if p.collapsed_since and (epoch - p.collapsed_since + 1 >= COLLAPSE_EPOCHS
                              or epoch == run.cfg.epochs):
        p.collapsed_at = p.collapsed_since
        log.error("%s; stopping", collapse_message(run.cfg.arch, p.collapsed_at, run.cfg.lr))
        return True
    if dead:
        log.warning("%s: every image got the same answer at epoch %d, in training and in eval "
                    "mode; the run stops if the next epoch does too", run.cfg.arch, epoch)
    elif val["collapsed"]:
        log.warning("%s: every validation image got the same probabilities at epoch %d while "
                    "training outputs vary (largest logit spread in a batch %.3g): typically "
                    "BatchNorm running statistics that have not caught up with the weights yet",
                    run.cfg.arch, epoch, train_spread)
    if run.cfg.patience and p.stale >= run.cfg.patience:
        log.info("early stop: no better val macro-F1 for %d epochs", p.stale)
        return True
    return False


def _open_metrics(run: _Run, first_epoch: int):
    """metrics.csv, keeping the rows of epochs before ``first_epoch`` (a resumed run)."""
    path = run.run_dir / "metrics.csv"
    kept = []
    if first_epoch > 1 and path.is_file():
        with path.open(newline="") as fh:
            kept = [r for r in csv.DictReader(fh) if int(r["epoch"]) < first_epoch]
    fh = path.open("w", newline="")
    writer = csv.DictWriter(fh, fieldnames=EPOCH_FIELDS)
    writer.writeheader()
    writer.writerows(kept)
    return fh, writer


def _fit(run: _Run, first_epoch: int) -> None:
    """Epochs ``first_epoch``..``cfg.epochs``; only rank 0 validates and writes."""
    fh, writer = _open_metrics(run, first_epoch) if run.dist.is_main else (None, None)
    try:
        for epoch in range(first_epoch, run.cfg.epochs + 1):
            t0 = time.perf_counter()
            train_loss, img_s, spread = _train_epoch(run, epoch)
            if run.dist.world_size == 1:
                recalibrate_batchnorm(run.evaluated_model, run.loader,
                                      run.cfg.precise_bn_batches, run.choice)
            stop = _end_epoch(run, epoch, train_loss, img_s, spread, t0, writer, fh) \
                if run.dist.is_main else False
            if D.broadcast_flag(stop, run.dist):
                break
    finally:
        if fh is not None:
            fh.close()


def _finish(run: _Run, started: float) -> TrainResult:
    digests = D.replica_digests(run.bare_model, run.dist)
    if len(set(digests)) != 1:
        raise RuntimeError(f"DDP replicas diverged: weight digests {digests}")
    report = {}
    if run.dist.is_main:
        extra = {"training": _training_record(run)}
        if run.dist.enabled:
            extra["ddp"] = {"world_size": run.dist.world_size, "replica_digests": digests}
        report = _final_report(run, time.perf_counter() - started, extra)
    D.shutdown(run.dist)
    return TrainResult(run.run_dir, run.progress.best_epoch, run.progress.best_f1, report)


def train_learner(cfg: TrainConfig) -> TrainResult:
    """Train one learner as configured and write its run folder.

    Args:
        cfg: the training config; it is resolved and saved as ``config.json``.

    Returns:
        The run folder, the best epoch and its validation macro-F1, and the final report
        (empty on ranks other than 0 under torchrun).
    """
    started = time.perf_counter()
    run = _setup(cfg)
    _fit(run, first_epoch=1)
    return _finish(run, started)


def resume_run(run_dir: str | Path, epochs: int | None = None) -> TrainResult:
    """Continue a run folder from ``last.pt``: weights, optimiser, scheduler, RNG and early
    stopping state, so the result equals an uninterrupted run of the same config.

    Args:
        run_dir: a run folder written by ``train_learner``.
        epochs: a new total epoch count (longer runs re-plan the learning-rate schedule).
    """
    run_dir = Path(run_dir)
    last = load_checkpoint(run_dir / "last.pt")
    if last.train_state is None:
        raise ValueError(f"{run_dir / 'last.pt'} holds no training state to resume from")
    cfg = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    if epochs is not None:
        cfg.epochs = epochs
    if last.epoch >= cfg.epochs:
        log.info("%s already trained %d of %d epochs; writing the report only", run_dir,
                 last.epoch, cfg.epochs)
    started = time.perf_counter()
    run = _setup(cfg)
    _restore(run, last)
    log.info("resumed %s at epoch %d of %d", run_dir, last.epoch + 1, cfg.epochs)
    _fit(run, first_epoch=last.epoch + 1)
    return _finish(run, started - run.progress.seconds)


def _restore(run: _Run, last: Checkpoint) -> None:
    s = last.train_state
    if run.ema is not None:
        run.bare_model.load_state_dict(s["model"])
        run.ema.module.load_state_dict(last.state_dict)
        run.ema.n_averaged.copy_(s["ema_n_averaged"])
    else:
        run.bare_model.load_state_dict(last.state_dict)
    run.optimizer.load_state_dict(s["optimizer"])
    run.scheduler.load_state_dict(s["scheduler"])
    if run.scaler is not None and s.get("scaler"):
        run.scaler.load_state_dict(s["scaler"])
    _set_rng_state(s["rng"])
    run.progress = _Progress(s["best_f1"], s["best_epoch"], s["stale"], s["seconds"], last.epoch,
                             s.get("collapsed_at", 0), s.get("collapsed_since", 0))


def _summary(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("accuracy", "macro_f1", "loss", "n")}


def _final_report(run: _Run, seconds: float, extra: dict) -> dict:
    """Evaluate ``best.pt`` on val and test, store the figures in it, and write the report."""
    ckpt = load_checkpoint(run.run_dir / "best.pt")
    model = ckpt.build_model()
    _, val_ds, test_ds = run.datasets
    preds = {"val": predict(model, val_ds, run.cfg.batch_size, run.loss_fn)}
    if len(test_ds):
        preds["test"] = predict(model, test_ds, run.cfg.batch_size, run.loss_fn)
    splits = {s: split_metrics(p, ckpt.class_names, run.cfg.scheme) for s, p in preds.items()}
    ckpt.metrics = {s: _summary(m) for s, m in splits.items()}
    save_checkpoint(run.run_dir / "best.pt", ckpt)
    checks = report_checks(run.run_dir, model, ckpt, run.datasets, splits, run.cfg.scheme,
                           run.cfg.batch_size)
    return write_report(run.run_dir, run.cfg.to_dict(), ckpt.epoch, splits, seconds,
                        {**extra, "checks": checks},
                        {s: (p.probs, p.targets) for s, p in preds.items()})
