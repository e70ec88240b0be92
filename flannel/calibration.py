"""Calibrated probabilities: temperature (or vector) scaling fitted on the validation split, and
the figures that judge it (expected calibration error, Brier score, reliability diagram).

    python -c "from flannel.calibration import calibrate; help(calibrate)"

Temperature scaling (Guo et al., 2017) divides a model's logits by one scalar T > 0 fitted by
minimising the negative log-likelihood of the validation labels; it never changes a decision.
Vector scaling fits one scale and one bias per class (more freedom, and it can change decisions).
For an ensemble whose graph fuses probabilities, the logits are the log of the fused
probabilities, so ``softmax(log p / T)`` is the calibrated answer.

The expected calibration error uses ``ECE_BINS`` equal-mass bins of the top-1 confidence (each
bin holds the same number of images, so no bin is estimated from a handful while another holds
most of the split).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# Equal-mass bins of top-1 confidence for the expected calibration error.
ECE_BINS = 15
KINDS = ("temperature", "vector")
# Probabilities are clipped here before their log is taken (log 0 would be -inf).
LOG_FLOOR = 1e-12


@dataclass(frozen=True)
class Scaling:
    """A fitted calibration map of logits.

    Attributes:
        kind: "temperature" or "vector".
        temperature: the divisor of every logit (temperature scaling; 1.0 for vector).
        scale, bias: per-class ``logit * scale + bias`` (vector scaling; empty for temperature).
    """

    kind: str
    temperature: float = 1.0
    scale: tuple[float, ...] = ()
    bias: tuple[float, ...] = ()

    def logits(self, logits: np.ndarray) -> np.ndarray:
        """The calibrated logits."""
        logits = np.asarray(logits, dtype=np.float64)
        if self.kind == "vector":
            return logits * np.asarray(self.scale) + np.asarray(self.bias)
        return logits / self.temperature

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return softmax(self.logits(logits))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "Scaling":
        return cls(data["kind"], float(data.get("temperature", 1.0)),
                   tuple(data.get("scale", ())), tuple(data.get("bias", ())))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def logits_of(probabilities: np.ndarray) -> np.ndarray:
    """Logits whose softmax is ``probabilities`` (their log, clipped at ``LOG_FLOOR``)."""
    return np.log(np.clip(np.asarray(probabilities, dtype=np.float64), LOG_FLOOR, 1.0))


def _fit(logits: np.ndarray, labels: np.ndarray, kind: str, max_iter: int) -> Scaling:
    import torch

    x = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    classes = x.shape[1]
    if kind == "temperature":
        params = [torch.zeros(1, dtype=torch.float64, requires_grad=True)]  # log T

        def transform():
            return x / params[0].exp()
    elif kind == "vector":
        params = [torch.zeros(classes, dtype=torch.float64, requires_grad=True),  # log scale
                  torch.zeros(classes, dtype=torch.float64, requires_grad=True)]

        def transform():
            return x * params[0].exp() + params[1]
    else:
        raise ValueError(f"calibration {kind!r}: use one of {KINDS}")
    optimizer = torch.optim.LBFGS(params, lr=0.5, max_iter=max_iter,
                                  line_search_fn="strong_wolfe")
    loss_fn = torch.nn.CrossEntropyLoss()

    def closure():
        optimizer.zero_grad()
        loss = loss_fn(transform(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    if kind == "temperature":
        return Scaling("temperature", float(params[0].exp().item()))
    return Scaling("vector", 1.0, tuple(params[0].exp().detach().tolist()),
                   tuple(params[1].detach().tolist()))


def fit_scaling(logits: np.ndarray, labels: np.ndarray, kind: str = "temperature",
                max_iter: int = 200) -> Scaling:
    """Fit ``kind`` scaling by minimising the negative log-likelihood of ``labels``.

    Args:
        logits: (N, C) logits of the split it is fitted on (validation, never test).
        labels: (N,) class indices.
        kind: "temperature" (one scalar; decisions unchanged) or "vector" (per class).

    Raises:
        ValueError: an unknown kind, or fewer than two labelled images.
    """
    if len(labels) < 2:
        raise ValueError(f"calibration needs labelled images to fit on; got {len(labels)}")
    return _fit(logits, labels, kind, max_iter)


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray,
                               bins: int = ECE_BINS) -> float:
    """Sum over equal-mass bins of top-1 confidence of |accuracy - mean confidence| x bin share."""
    p = np.asarray(probabilities, dtype=np.float64)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    order = np.argsort(confidence, kind="stable")
    total = 0.0
    for chunk in np.array_split(order, min(bins, len(order))):
        if len(chunk):
            total += abs(correct[chunk].mean() - confidence[chunk].mean()) * len(chunk)
    return total / max(len(order), 1)


def brier_score(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean over images of the squared distance between the probabilities and the one-hot label."""
    p = np.asarray(probabilities, dtype=np.float64)
    onehot = np.eye(p.shape[1])[np.asarray(labels)]
    return float(((p - onehot) ** 2).sum(axis=1).mean())


def reliability_curve(probabilities: np.ndarray, labels: np.ndarray,
                      bins: int = ECE_BINS) -> list[dict]:
    """Per equal-mass bin: mean confidence, accuracy and image count."""
    p = np.asarray(probabilities, dtype=np.float64)
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == np.asarray(labels)
    order = np.argsort(confidence, kind="stable")
    return [{"confidence": float(confidence[c].mean()), "accuracy": float(correct[c].mean()),
             "images": int(len(c))} for c in np.array_split(order, min(bins, len(order))) if len(c)]


def log_loss(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-probability of the true class (what the scaling minimises)."""
    p = np.asarray(probabilities, dtype=np.float64)[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.log(np.clip(p, LOG_FLOOR, 1.0)).mean())


def split_figures(probabilities: np.ndarray, labels: np.ndarray) -> dict:
    return {"ece": expected_calibration_error(probabilities, labels),
            "brier": brier_score(probabilities, labels), "nll": log_loss(probabilities, labels),
            "accuracy": float((np.asarray(probabilities).argmax(1) == np.asarray(labels)).mean()),
            "images": int(len(labels))}


def calibrate(val_logits: np.ndarray, val_labels: np.ndarray,
              splits: dict[str, tuple[np.ndarray, np.ndarray]], kind: str = "temperature"
              ) -> tuple[Scaling, dict]:
    """Fit on validation; the ECE, Brier score and accuracy before and after on every split.

    Args:
        val_logits, val_labels: the split the scaling is fitted on.
        splits: name -> (logits, labels) to report (validation and test, typically).

    Returns:
        (the scaling, {"scaling": ..., "bins": ECE_BINS, split: {"before": ..., "after": ...}}).
    """
    scaling = fit_scaling(val_logits, val_labels, kind)
    report: dict = {"scaling": scaling.to_dict(), "bins": ECE_BINS}
    for name, (logits, labels) in splits.items():
        report[name] = {"before": split_figures(softmax(logits), labels),
                        "after": split_figures(scaling.probabilities(logits), labels)}
    return scaling, report


def reliability_diagram(splits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                        path: str | Path, title: str) -> Path:
    """One panel per split: accuracy against confidence per equal-mass bin, before and after.

    Args:
        splits: name -> (probabilities before, probabilities after, labels); after None
            draws the given probabilities alone.
    """
    from flannel.benchmarks.output import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 4), squeeze=False)
    for ax, (name, (before, after, labels)) in zip(axes[0], splits.items()):
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="calibrated")
        curves = (((before, "before", "o-"), (after, "after", "s-")) if after is not None
                  else ((before, "as given", "o-"),))
        for probs, label, style in curves:
            curve = reliability_curve(probs, labels)
            ece = expected_calibration_error(probs, labels)
            ax.plot([b["confidence"] for b in curve], [b["accuracy"] for b in curve], style,
                    ms=3, label=f"{label} (ECE {ece:.3f})")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1)", ylabel="accuracy",
               title=f"{name} ({len(labels)} images, {ECE_BINS} equal-mass bins)")
        ax.legend(fontsize=7, loc="upper left")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path.parent, path.name, title)
