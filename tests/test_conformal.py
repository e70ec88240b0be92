"""Conformal prediction sets: coverage within sampling error on exchangeable calibrated data, an
exact hand-computed qhat and sets for both scores, the every-class case, and input errors."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fixtures_data import calibrated_sample

from flannel.conformal import (SCORES, Conformal, conformal_rank, conformity_scores,
                               fit_conformal, set_figures)

CLASSES = ["Normal", "Bacterial", "Viral", "COVID-19"]
N_CAL, N_TEST = 1000, 5000


_calibrated = calibrated_sample


@pytest.fixture(scope="module")
def splits():
    return _calibrated(N_CAL, seed=0), _calibrated(N_TEST, seed=1)


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("coverage", [0.8, 0.9, 0.95])
def test_coverage_on_fresh_images_is_the_target_within_sampling_error(splits, score, coverage):
    (p_cal, y_cal), (p_test, y_test) = splits
    # The premise that keeps APS off its atom at 0: the top class is right less often than 0.8.
    assert (p_test.argmax(axis=1) == y_test).mean() < 0.75
    model = fit_conformal(p_cal, y_cal, coverage, score)
    measured = set_figures(model.sets(p_test), y_test, CLASSES)["coverage"]
    # Given the calibration split, coverage is Beta-distributed around the target with variance
    # about a(1-a)/(n_cal+2); the test split adds a(1-a)/n_test. Three standard deviations of
    # both either side, and the finite-sample correction may lift the mean by up to 1/(n_cal+1).
    a = 1.0 - coverage
    sd = math.sqrt(a * (1 - a) / (N_CAL + 2) + a * (1 - a) / N_TEST)
    assert coverage - 3 * sd <= measured <= coverage + 3 * sd + 1 / (N_CAL + 1), measured


def test_hand_computed_qhat_and_sets_for_both_scores():
    p = np.array([[0.7, 0.2, 0.1],    # label 0: LAC 0.3, APS 0 (top class)
                  [0.5, 0.3, 0.2],    # label 1: LAC 0.7, APS 0.5
                  [0.6, 0.3, 0.1],    # label 2: LAC 0.9, APS 0.9
                  [0.2, 0.5, 0.3]])   # label 1: LAC 0.5, APS 0
    labels = np.array([0, 1, 2, 1])
    assert conformity_scores(p, labels, "lac") == pytest.approx([0.3, 0.7, 0.9, 0.5])
    assert conformity_scores(p, labels, "aps") == pytest.approx([0.0, 0.5, 0.9, 0.0])
    # n = 4, coverage 0.6: rank ceil(5 * 0.6) = 3, the third smallest score.
    lac, aps = (fit_conformal(p, labels, 0.6, s) for s in ("lac", "aps"))
    assert lac.qhat == pytest.approx(0.7) and aps.qhat == pytest.approx(0.5)
    assert lac.n == aps.n == 4 and not lac.every_class
    probes = np.array([[0.55, 0.35, 0.10],   # LAC: p >= 0.3 twice; APS: 0.55 already above 0.5
                       [0.35, 0.32, 0.33],   # LAC: all three; APS: 0.35, then 0.68 > 0.5
                       [0.10, 0.10, 0.80]])  # both: the top class alone
    assert lac.sets(probes).tolist() == [[True, True, False], [True, True, True],
                                         [False, False, True]]
    assert aps.sets(probes).tolist() == [[True, False, False], [True, False, True],
                                         [False, False, True]]


def test_every_fitted_image_whose_score_is_qhat_is_in_its_own_set():
    p, labels = _calibrated(50, seed=3)
    for score in SCORES:
        model = fit_conformal(p, labels, 0.9, score)
        on_boundary = np.isclose(conformity_scores(p, labels, score), model.qhat)
        assert on_boundary.any()
        assert model.sets(p)[np.arange(len(p)), labels][on_boundary].all()


def test_aps_sets_are_never_empty_and_lac_sets_are_upper_level_sets(splits):
    (p_cal, y_cal), _ = splits
    p, _ = _calibrated(2000, seed=4)
    p = np.vstack([p, np.full((1, 4), 0.25)])  # last: an image the model cannot tell apart
    aps = fit_conformal(p_cal, y_cal, 0.8, "aps").sets(p)
    assert aps.sum(axis=1).min() >= 1 and aps[np.arange(len(p)), p.argmax(axis=1)].all()
    lac_model = fit_conformal(p_cal, y_cal, 0.8, "lac")
    lac = lac_model.sets(p)
    # A class is in a LAC set only with every more probable class: a set is {c : p_c >= floor}.
    floor = np.where(lac, p, np.inf).min(axis=1)
    assert (lac == (p >= floor[:, None])).all()
    # LAC leaves the unsure image with no class when no p reaches 1 - qhat; APS cannot.
    assert lac_model.qhat < 0.75 and not lac[-1].any() and aps[-1].sum() >= 2


def test_lac_sets_are_never_empty_once_qhat_reaches_one_minus_one_over_classes(splits):
    (p_cal, y_cal), _ = splits
    model = fit_conformal(p_cal, y_cal, 0.95, "lac")
    assert model.qhat >= 1 - 1 / len(CLASSES)  # the top class of any image has p >= 1/C
    p, _ = _calibrated(2000, seed=5, spread=0.3)  # near-uniform: the hardest case
    assert model.sets(p).sum(axis=1).min() >= 1


def test_a_confident_well_separated_image_gets_exactly_its_class(splits):
    (p_cal, y_cal), _ = splits
    sure = np.full((4, 4), 0.001) + np.eye(4) * 0.996
    for score in SCORES:
        for coverage in (0.8, 0.9):
            assert (fit_conformal(p_cal, y_cal, coverage, score).sets(sure) == np.eye(4)).all()


def test_sets_grow_with_the_coverage(splits):
    (p_cal, y_cal), (p_test, _) = splits
    for score in SCORES:
        smaller, larger = (fit_conformal(p_cal, y_cal, c, score).sets(p_test) for c in (0.8, 0.95))
        assert (larger | ~smaller).all() and larger.sum() > smaller.sum()


def test_too_few_images_for_the_coverage_gives_every_class_and_says_so():
    p, labels = _calibrated(9, seed=6)
    # ceil(9 * 0.9) = 9 > 8 images: no finite quantile promises 0.9.
    model = fit_conformal(p[:8], labels[:8], 0.9, "aps")
    assert model.every_class and math.isinf(model.qhat)
    assert model.sets(p).all()
    saved = json.loads(json.dumps(model.to_dict()))
    assert saved["qhat"] is None and saved["every_class"] is True
    assert Conformal.from_dict(saved) == model
    # With 9 images, rank ceil(10 * 0.9) = 9: qhat is the largest score.
    nine = fit_conformal(p, labels, 0.9, "lac")
    assert nine.qhat == conformity_scores(p, labels, "lac").max()


def test_a_whole_rank_written_a_hair_high_is_not_rounded_up():
    assert 100 * 0.56 > 56  # what binary floating point does with (n + 1) * coverage
    assert conformal_rank(99, 0.56) == 56
    assert conformal_rank(1000, 0.9) == 901 and conformal_rank(9, 0.9) == 9


def test_round_trip_through_json(splits):
    (p_cal, y_cal), (p_test, _) = splits
    for score in SCORES:
        model = fit_conformal(p_cal, y_cal, 0.9, score)
        back = Conformal.from_dict(json.loads(json.dumps(model.to_dict())))
        assert back == model and (back.sets(p_test) == model.sets(p_test)).all()


def test_a_saved_predictor_that_does_not_add_up_is_refused():
    saved = Conformal("aps", 0.9, 0.5, 100).to_dict()
    for field, value, message in (("score", "raps", "use one of"), ("coverage", 90, "coverage"),
                                  ("n", 0, "n >= 1")):
        with pytest.raises(ValueError, match=message):
            Conformal.from_dict(saved | {field: value})


def test_set_figures_on_known_sets():
    sets = np.array([[True, False, False], [True, True, False], [False, False, False],
                     [True, True, True]])
    labels = np.array([0, 2, 1, 1])
    figures = set_figures(sets, labels, ["a", "b", "c"])
    assert figures == {"coverage": 0.5, "mean_size": 1.5, "empty_rate": 0.25,
                       "multi_class_rate": 0.5, "size_histogram": {0: 1, 1: 1, 2: 1, 3: 1},
                       "images": 4,
                       "per_class": {"a": {"coverage": 1.0, "images": 1},
                                     "b": {"coverage": 0.5, "images": 2},
                                     "c": {"coverage": 0.0, "images": 1}}}
    json.dumps(figures)


@pytest.mark.parametrize("kwargs, message", [
    ({"coverage": 1.0}, "strictly between 0 and 1"),
    ({"coverage": 0.0}, "strictly between 0 and 1"),
    ({"score": "raps"}, "use one of"),
    ({"labels": np.array([0, 1])}, "labels for 3 images"),
    ({"labels": np.array([0, 1, 3])}, r"lie in \[0, 3\)"),
    ({"labels": np.array([0, -1, 2])}, r"lie in \[0, 3\)"),
    ({"labels": np.array([0.0, 1.0, 2.0])}, "integers"),
    ({"probabilities": np.zeros((0, 3)), "labels": np.array([], dtype=int)}, "at least one"),
    ({"probabilities": np.ones(3) / 3}, "images, classes"),
    ({"probabilities": np.full((3, 3), np.nan)}, "finite"),
])
def test_bad_inputs_are_refused_with_the_problem_named(kwargs, message):
    args = {"probabilities": np.full((3, 3), 1 / 3), "labels": np.array([0, 1, 2]),
            "coverage": 0.9, "score": "lac"} | kwargs
    with pytest.raises(ValueError, match=message):
        fit_conformal(**args)
