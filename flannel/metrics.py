"""Classification metrics for both reports' tables, computed from a confusion matrix.

    python -c "from flannel.metrics import classification_metrics as m; print(m([0,1],[0,1],['a','b']))"

Rows of the confusion matrix are true classes, columns predicted classes. Everything here is
plain numpy so the numbers can be checked by hand; seed 004's extra column, the number of sick
images called "Normal", is read off the Normal column.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """Counts ``cm[t, p]`` of items of true class t predicted as p."""
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{y_true.shape} true labels but {y_pred.shape} predictions")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # A class never predicted (or never present) gets 0, as scikit-learn's zero_division=0 does.
    return np.divide(num, den, out=np.zeros_like(num, dtype=float), where=den > 0)


def metrics_from_confusion(cm: np.ndarray, class_names: Sequence[str],
                           normal_class: str | None = "Normal") -> dict:
    """Accuracy, per-class precision/recall/F1/support, macro-F1 and "called Normal" counts.

    Macro-F1 is the mean F1 of the classes present in the split (support > 0); the classes absent
    are listed in ``absent_classes`` and ``macro_f1_all_classes`` counts them as 0.

    Args:
        cm: square confusion matrix (rows true, columns predicted).
        class_names: names in index order.
        normal_class: class whose column counts sick images called healthy; None to skip.

    Returns:
        A JSON-serialisable dict.
    """
    cm = np.asarray(cm, dtype=float)
    tp = np.diag(cm)
    precision = _safe_div(tp, cm.sum(axis=0))
    recall = _safe_div(tp, cm.sum(axis=1))
    f1 = _safe_div(2 * precision * recall, precision + recall)
    per_class = {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                        "f1": float(f1[i]), "support": int(cm[i].sum())}
                 for i, name in enumerate(class_names)}
    present = cm.sum(axis=1) > 0
    # A class with no images in the split has no F1: averaging in a 0 (scikit-learn's default when
    # it is predicted) would penalise a model for data that is not there. Macro-F1 averages the
    # present classes and the absent ones are named; the all-classes figure is kept beside it.
    out = {"accuracy": float(tp.sum() / cm.sum()) if cm.sum() else 0.0,
           "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
           "macro_f1_all_classes": float(f1.mean()),
           "absent_classes": [n for i, n in enumerate(class_names) if not present[i]],
           "per_class": per_class,
           "confusion": cm.astype(int).tolist(), "class_names": list(class_names)}
    if normal_class is not None and normal_class in class_names:
        j = list(class_names).index(normal_class)
        out["called_normal"] = {name: int(cm[i, j]) for i, name in enumerate(class_names) if i != j}
    return out


def roc_auc_ovr(y_true: Sequence[int], probs: np.ndarray, class_names: Sequence[str]) -> dict:
    """One-vs-rest ROC-AUC per class (None where a class has no positives or no negatives)."""
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true)
    out = {}
    for i, name in enumerate(class_names):
        positives = y_true == i
        out[name] = (float(roc_auc_score(positives, probs[:, i]))
                     if 0 < positives.sum() < len(y_true) else None)
    return out


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int],
                           class_names: Sequence[str], probs: np.ndarray | None = None,
                           normal_class: str | None = "Normal") -> dict:
    """All metrics for one split; adds ROC-AUC when probabilities are given."""
    cm = confusion_matrix(y_true, y_pred, len(class_names))
    out = metrics_from_confusion(cm, class_names, normal_class)
    if probs is not None:
        out["roc_auc"] = roc_auc_ovr(y_true, np.asarray(probs), class_names)
    return out
