"""Calibration: temperature scaling repairs an overconfident model without changing a decision;
the ECE, Brier score and equal-mass bins give known answers on known inputs."""
from __future__ import annotations

import numpy as np
import pytest

from flannel.calibration import (ECE_BINS, Scaling, brier_score, calibrate,
                                 expected_calibration_error, fit_scaling, logits_of,
                                 reliability_curve, reliability_diagram, softmax)


def _calibrated_problem(n=3000, classes=3, seed=0):
    """Labels drawn from the softmax of known logits: those logits are calibrated by design."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (n, classes))
    labels = np.array([rng.choice(classes, p=p) for p in softmax(logits)])
    return logits, labels


def test_temperature_repairs_an_overconfident_model_and_keeps_every_decision():
    logits, labels = _calibrated_problem()
    overconfident = logits * 4.0  # the same ranking, four times too sure
    scaling, report = calibrate(overconfident[:1500], labels[:1500],
                                {"val": (overconfident[:1500], labels[:1500]),
                                 "test": (overconfident[1500:], labels[1500:])})
    assert scaling.kind == "temperature" and 3.3 < scaling.temperature < 4.8
    for split in ("val", "test"):
        before, after = report[split]["before"], report[split]["after"]
        assert after["ece"] < before["ece"] / 2 and after["brier"] < before["brier"]
        assert after["accuracy"] == before["accuracy"]
    test = overconfident[1500:]
    assert (scaling.probabilities(test).argmax(1) == test.argmax(1)).all()


def test_a_calibrated_model_keeps_a_temperature_near_one():
    logits, labels = _calibrated_problem(seed=1)
    assert 0.85 < fit_scaling(logits, labels).temperature < 1.15


def test_vector_scaling_repairs_per_class_bias_that_one_temperature_cannot():
    logits, labels = _calibrated_problem(seed=2)
    skewed = logits + np.array([2.0, 0.0, -1.0])  # class 0 said too often, class 2 too rarely
    nll = {}
    for kind in ("temperature", "vector"):
        s = fit_scaling(skewed, labels, kind)
        p = s.probabilities(skewed)
        nll[kind] = -np.log(p[np.arange(len(labels)), labels]).mean()
    assert nll["vector"] < nll["temperature"] - 0.05
    s = fit_scaling(skewed, labels, "vector")
    assert Scaling.from_dict(s.to_dict()) == s and len(s.scale) == 3
    with pytest.raises(ValueError, match="use one of"):
        fit_scaling(skewed, labels, "isotonic")


def test_ece_and_brier_on_known_inputs():
    # 80% confident and, in each of the 15 bins of 5 images, 80% right: calibrated
    labels = np.array([0, 0, 0, 0, 1] * ECE_BINS)
    sure = np.tile([0.8, 0.2], (len(labels), 1))
    assert expected_calibration_error(sure, labels) == pytest.approx(0.0)
    wrong_bins = np.array([0] * 40 + [1] * 35)  # the same counts, but bins of 100% and 0%
    assert expected_calibration_error(sure, wrong_bins) > 0.3
    certain = np.tile([1.0, 0.0], (10, 1))
    assert expected_calibration_error(certain, np.array([0, 1] * 5)) == pytest.approx(0.5)
    assert brier_score(np.eye(3)[[0, 1, 2]], np.array([0, 1, 2])) == 0.0
    assert brier_score(np.full((1, 3), 1 / 3), np.array([0])) == pytest.approx(2 / 3)


def test_bins_hold_equal_numbers_of_images():
    p = softmax(np.random.default_rng(3).normal(size=(301, 3)))
    counts = [b["images"] for b in reliability_curve(p, np.zeros(301, int))]
    assert len(counts) == ECE_BINS and sum(counts) == 301 and max(counts) - min(counts) <= 1


def test_probabilities_are_calibrated_through_their_log(tmp_path):
    probs = softmax(np.random.default_rng(4).normal(0, 3, (50, 3)))
    assert np.allclose(softmax(logits_of(probs)), probs)
    labels = probs.argmax(1)
    after = Scaling("temperature", 2.0).probabilities(logits_of(probs))
    path = reliability_diagram({"val": (probs, after, labels)}, tmp_path / "r.png", "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
