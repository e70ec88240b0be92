"""Metrics against values computed by hand on a known confusion matrix."""
import numpy as np
import pytest

from flannel.metrics import classification_metrics, confusion_matrix, metrics_from_confusion

CLASSES = ["COVID-19", "Normal", "Pneumonia"]
# rows true, columns predicted
CM = np.array([[8, 1, 1],
               [0, 9, 1],
               [2, 3, 5]])


def test_confusion_matrix_counts_pairs():
    cm = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_metrics_match_hand_computation():
    m = metrics_from_confusion(CM, CLASSES)
    assert m["accuracy"] == pytest.approx(22 / 30)
    covid = m["per_class"]["COVID-19"]
    assert covid["precision"] == pytest.approx(8 / 10)
    assert covid["recall"] == pytest.approx(8 / 10)
    assert covid["f1"] == pytest.approx(0.8)
    normal = m["per_class"]["Normal"]
    assert normal["precision"] == pytest.approx(9 / 13)
    assert normal["recall"] == pytest.approx(9 / 10)
    assert normal["f1"] == pytest.approx(2 * (9 / 13) * 0.9 / (9 / 13 + 0.9))
    pneu = m["per_class"]["Pneumonia"]
    assert pneu["precision"] == pytest.approx(5 / 7)
    assert pneu["recall"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx(np.mean([0.8, normal["f1"], pneu["f1"]]))
    assert m["called_normal"] == {"COVID-19": 1, "Pneumonia": 3}
    assert [m["per_class"][c]["support"] for c in CLASSES] == [10, 10, 10]


def test_metrics_agree_with_scikit_learn():
    from sklearn.metrics import f1_score, precision_recall_fscore_support

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    m = classification_metrics(y, p, CLASSES)
    prec, rec, f1, _ = precision_recall_fscore_support(y, p, zero_division=0)
    assert [m["per_class"][c]["f1"] for c in CLASSES] == pytest.approx(f1.tolist())
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))


def test_class_never_predicted_scores_zero_not_nan():
    m = classification_metrics([0, 1, 2], [0, 0, 0], CLASSES)
    assert m["per_class"]["Normal"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_roc_auc_perfect_ranking_is_one():
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    m = classification_metrics([0, 1, 2], [0, 1, 2], CLASSES, probs=probs)
    assert m["roc_auc"] == {"COVID-19": 1.0, "Normal": 1.0, "Pneumonia": 1.0}


def test_macro_f1_averages_present_classes_and_names_the_absent_ones():
    # External sets often lack a class (no pneumonia radiographs, say); one wrong call into it.
    y = [0, 0, 0, 1, 1, 1]
    p = [0, 0, 2, 1, 1, 1]
    m = classification_metrics(y, p, ["COVID-19", "Normal", "Pneumonia"])
    assert m["absent_classes"] == ["Pneumonia"]
    covid_f1, normal_f1 = 2 * 1.0 * (2 / 3) / (1 + 2 / 3), 1.0
    assert m["macro_f1"] == pytest.approx((covid_f1 + normal_f1) / 2)
    assert m["macro_f1_all_classes"] == pytest.approx((covid_f1 + normal_f1 + 0.0) / 3)
