"""Typed training config, resolved once and saved next to the outputs and inside checkpoints."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from flannel.preprocess import INTENSITIES
from flannel.registry import get_arch

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "warmup_cosine", "onecycle", "constant")
LOSSES = ("ce", "focal")
CLASS_BALANCE = ("none", "loss", "sampler")
NORMALIZATIONS = ("imagenet", "dataset")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything that determines a training run.

    Attributes:
        manifest: split manifest CSV (``flannel data split``).
        out: run folder; created, never wiped.
        arch: registry name.
        scheme: label scheme the manifest was built with.
        epochs, batch_size, lr, weight_decay, optimizer: the optimisation.
        schedule: learning-rate schedule: ``cosine`` (per epoch), ``warmup_cosine`` (linear warm-up
            for ``warmup_epochs``, then cosine, per step), ``onecycle`` or ``constant``.
        warmup_epochs: warm-up length of ``warmup_cosine`` (fractions allowed).
        label_smoothing: cross-entropy label smoothing (also applied to the focal loss target).
        ema_decay: exponential moving average of the weights and BatchNorm statistics, updated
            every step (e.g. 0.998); validation, checkpoints and the report use the average.
            0 turns it off.
        loss: ``ce`` (cross-entropy) or ``focal`` (``focal_gamma``, per-class ``focal_alpha``).
        focal_alpha: per-class alpha; None = inverse class frequency of the training split.
        class_balance: ``loss`` weights the loss by inverse class frequency, ``sampler`` draws
            class-balanced batches, ``none`` does neither.
        input_size: model input side (centre crop); None = the architecture's native size.
        normalization: mean/std of ``imagenet`` or of the training split (``dataset``); the values
            are written into the preprocessing spec.
        intensity: intensity harmonisation in the preprocessing spec (``none`` or ``equalize``).
        weights: None (random init), "DEFAULT"/enum name (torchvision, needs a network) or a path.
        freeze: "none", "head" or "last:FRACTION" (see ``flannel.registry.freeze``).
        augment: training augmentation preset (see ``flannel.train.augment.PRESETS``).
        precision: ``auto`` or a forced ``fp32``/``bf16``/``fp16`` for training; evaluation and
            export always run in fp32. The resolved choice is recorded in the checkpoint.
        patience: early stopping after this many epochs without a better val macro-F1 (0 = off).
        precise_bn_batches: before each validation, BatchNorm running statistics are recomputed
            from this many training batches with the current weights ("precise BN"); 0 keeps the
            running averages. Running averages lag behind the weights: channels whose variance
            shrinks during training keep a far larger running variance, and the network that is
            validated and saved answers every image alike (mnasnet1_0 on the real data).
        seed, deterministic: reproducibility switches.
        threads: torch intra-op threads (None = torch's default).
    """

    manifest: str
    out: str = "runs/learner"
    arch: str = "resnet18"
    scheme: str = "3class"
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adam"
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    ema_decay: float = 0.0
    loss: str = "ce"
    focal_gamma: float = 2.0
    focal_alpha: list[float] | None = None
    class_balance: str = "loss"
    input_size: int | None = None
    normalization: str = "imagenet"
    intensity: str = "none"
    weights: str | None = None
    freeze: str = "none"
    augment: str = "base"
    precision: str = "auto"
    patience: int = 0
    precise_bn_batches: int = 8
    seed: int = 0
    deterministic: bool = False
    threads: int | None = None

    def resolved(self) -> "TrainConfig":
        """A copy with defaults that depend on other fields filled in and values checked."""
        spec = get_arch(self.arch)
        cfg = dataclasses.replace(self, input_size=self.input_size or spec.input_size)
        if cfg.input_size < spec.min_size:
            raise ValueError(f"{cfg.arch} needs an input of at least {spec.min_size} pixels")
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES),
                              ("loss", LOSSES), ("class_balance", CLASS_BALANCE),
                              ("normalization", NORMALIZATIONS), ("precision", PRECISIONS),
                              ("intensity", INTENSITIES)):
            if getattr(cfg, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(cfg, name)!r}")
        if cfg.epochs < 1 or cfg.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")
        if not 0.0 <= cfg.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
        if cfg.precise_bn_batches < 0:
            raise ValueError(f"precise_bn_batches must be 0 or more, got {cfg.precise_bn_batches}")
        if not 0.0 <= cfg.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {cfg.ema_decay}")
        if cfg.focal_gamma < 0:
            raise ValueError(f"focal_gamma must be >= 0, got {cfg.focal_gamma}")
        if cfg.focal_alpha is not None:
            cfg.focal_alpha = [float(a) for a in cfg.focal_alpha]
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training config keys: {sorted(unknown)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
