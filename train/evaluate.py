"""Evaluate a model on one split and turn its predictions into the reports' metrics.

    python -c "from flannel.train.evaluate import evaluate_checkpoint; print(evaluate_checkpoint('runs/x/best.pt', 'test'))"
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from flannel.checkpoint import load_checkpoint
from flannel.data.records import read_manifest
from flannel.data.torch_dataset import XrayDataset
from flannel.labels import NORMAL_CLASS
from flannel.metrics import classification_metrics


@dataclass
class Predictions:
    """Class probabilities and true labels of one split."""

    probs: np.ndarray
    targets: np.ndarray
    loss: float

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


@torch.no_grad()
def predict(model: nn.Module, dataset: XrayDataset, batch_size: int = 32,
            loss_fn: nn.Module | None = None) -> Predictions:
    """Run ``model`` in eval mode and fp32 over ``dataset`` (evaluation transform).

    Args:
        model: the classifier; inputs go to the device of its parameters.
        dataset: evaluation dataset.
        batch_size: items per forward pass.
        loss_fn: the loss reported (pass the training loss, so that validation and training
            losses are the same objective); default plain cross-entropy.
    """
    model.eval()
    device = next(model.parameters()).device
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    probs, targets, total = [], [], 0.0
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        x, y = x.to(device), y.to(device)
        logits = model(x).float()
        total += float(loss_fn(logits, y)) * len(y)
        probs.append(torch.softmax(logits, dim=1).cpu().numpy())
        targets.append(y.cpu().numpy())
    n = max(1, len(dataset))
    return Predictions(np.concatenate(probs) if probs else np.zeros((0, len(dataset.class_names))),
                       np.concatenate(targets) if targets else np.zeros(0, dtype=int), total / n)


def split_metrics(pred: Predictions, class_names: list[str], scheme: str) -> dict:
    """The reports' metrics for one split's predictions."""
    probs = pred.probs if len(pred.targets) else None
    out = classification_metrics(pred.targets, pred.predicted, class_names, probs=probs,
                                 normal_class=NORMAL_CLASS.get(scheme))
    out["loss"] = pred.loss
    out["n"] = int(len(pred.targets))
    return out


def evaluate_checkpoint(checkpoint: str, split: str = "test", manifest: str | None = None,
                        batch_size: int = 32) -> dict:
    """Metrics of a saved checkpoint on one split of its (or another) manifest."""
    ckpt = load_checkpoint(checkpoint)
    rows = read_manifest(manifest or ckpt.config["manifest"], split=split)
    dataset = XrayDataset(rows, ckpt.class_names, ckpt.preprocess)
    pred = predict(ckpt.build_model(), dataset, batch_size)
    return split_metrics(pred, ckpt.class_names, ckpt.config.get("scheme", "3class"))
