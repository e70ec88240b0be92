"""Typed training config, resolved once and saved next to the outputs and inside checkpoints."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from flannel.registry import get_arch

OPTIMIZERS = ("adam", "sgd")
CLASS_BALANCE = ("none", "loss")


@dataclass
class TrainConfig:
    """Everything that determines a training run.

    Attributes:
        manifest: split manifest CSV (``flannel data split``).
        out: run folder; created, never wiped.
        arch: registry name.
        scheme: label scheme the manifest was built with.
        epochs, batch_size, lr, weight_decay, optimizer: the optimisation.
        input_size: model input side (centre crop); None = the architecture's native size.
        weights: None (random init), "DEFAULT"/enum name (torchvision, needs a network) or a path.
        freeze: "none", "head" or "last:FRACTION" (see ``flannel.registry.freeze``).
        augment: training augmentation preset ("none", "base", "strong").
        class_balance: "loss" weights the loss by inverse class frequency; "none" does not.
        patience: early stopping after this many epochs without a better val macro-F1 (0 = off).
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
    input_size: int | None = None
    weights: str | None = None
    freeze: str = "none"
    augment: str = "base"
    class_balance: str = "loss"
    patience: int = 0
    seed: int = 0
    deterministic: bool = False
    threads: int | None = None

    def resolved(self) -> "TrainConfig":
        """A copy with defaults that depend on other fields filled in and values checked."""
        spec = get_arch(self.arch)
        cfg = dataclasses.replace(self, input_size=self.input_size or spec.input_size)
        if cfg.input_size < spec.min_size:
            raise ValueError(f"{cfg.arch} needs an input of at least {spec.min_size} pixels")
        if cfg.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}")
        if cfg.class_balance not in CLASS_BALANCE:
            raise ValueError(f"class_balance must be one of {CLASS_BALANCE}")
        if cfg.epochs < 1 or cfg.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
