"""Optimisers and learning-rate schedules, stepped once per optimisation step.

    python -c "from flannel.train.schedule import lr_factor; print(lr_factor('warmup_cosine', 5, 100, 10))"

Every schedule is a factor of the configured learning rate as a function of the step, so a resumed
run continues on the same curve from the scheduler's saved step count.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

# torchvision's classification reference uses SGD momentum 0.9.
SGD_MOMENTUM = 0.9
# One-cycle: warm up for 30% of the steps, start at lr/25 and end at lr/1e4 (PyTorch's defaults).
ONECYCLE_PCT_START = 0.3
ONECYCLE_DIV = 25.0
ONECYCLE_FINAL_DIV = 1e4


def build_optimizer(name: str, model: nn.Module, lr: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD with momentum over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: the freeze policy froze everything")
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use adam, adamw or sgd")


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``.

    Args:
        schedule: "constant", "cosine", "warmup_cosine" or "onecycle".
        step: optimisation steps taken so far.
        total_steps: steps in the whole run.
        warmup_steps: linear warm-up length of ``warmup_cosine``.
    """
    total = max(1, total_steps)
    t = min(step, total) / total
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "warmup_cosine":
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        rest = max(1, total - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup_steps, rest) / rest))
    if schedule == "onecycle":
        up = max(1, int(ONECYCLE_PCT_START * total))
        start, end = 1 / ONECYCLE_DIV, 1 / (ONECYCLE_DIV * ONECYCLE_FINAL_DIV)
        if step < up:
            return start + (1 - start) * 0.5 * (1 - math.cos(math.pi * step / up))
        frac = min(1.0, (step - up) / max(1, total - up))
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * frac))
    raise ValueError(f"unknown schedule {schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int,
                    warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR following ``lr_factor``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(schedule, step, total_steps, warmup_steps))
