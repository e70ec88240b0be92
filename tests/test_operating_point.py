"""Operating points: targets parsed or refused with the problem named, thresholds that meet
their targets through the decision rule itself (and are the tightest that do), the rule on
hand-made images, and patient-level bootstrap intervals checked against a brute-force loop."""
from __future__ import annotations

import dataclasses
import itertools
import json
import time

import numpy as np
import pytest

from fixtures_data import calibrated_sample

import flannel.operating_point as op_module
from flannel.operating_point import (OperatingPoint, Target, bootstrap_intervals,
                                     choose_operating_point, class_figures, parse_target,
                                     parse_targets)

CLASSES = ["Normal", "Bacterial", "Viral", "COVID-19"]


_calibrated = calibrated_sample


@pytest.fixture(scope="module")
def val():
    return _calibrated(1000, seed=0)


def _figure(point, p, labels, target):
    decisions, _ = point.decide(p)
    return class_figures(labels, decisions, point.class_names)[target.class_name][target.metric]


def _with_threshold(point, name, value):
    return dataclasses.replace(point, thresholds={**point.thresholds, name: float(value)})


def test_parse_targets_reads_the_stated_form_in_order():
    targets = parse_targets(["COVID-19:sensitivity>=0.95", " Normal : Specificity >= 0.9 "],
                            CLASSES)
    assert targets == [Target("COVID-19", "sensitivity", 0.95),
                       Target("Normal", "specificity", 0.9)]
    assert parse_targets("Viral:sensitivity>=1", CLASSES) == [Target("Viral", "sensitivity", 1.0)]
    assert [parse_target(str(t), CLASSES) for t in targets] == targets
    # The class is everything before the last colon.
    assert parse_target("a:b:specificity>=0.5", ["a:b", "c"]) == Target("a:b", "specificity", 0.5)


@pytest.mark.parametrize("texts, message", [
    (["Flu:sensitivity>=0.9"], "unknown class 'Flu'"),
    (["Viral:ppv>=0.9"], "unknown metric 'ppv'"),
    (["Viral:sensitivity>=0"], r"bound must lie in \(0, 1\]"),
    (["Viral:sensitivity>=1.5"], r"bound must lie in \(0, 1\]"),
    (["Viral:sensitivity>=nan"], r"bound must lie in \(0, 1\]"),
    (["Viral:sensitivity>=high"], "'high' is not a number"),
    (["Viral:sensitivity<=0.9"], "write CLASS:METRIC>=BOUND"),
    (["sensitivity>=0.9"], "write CLASS:METRIC>=BOUND"),
    ([":sensitivity>=0.9"], "write CLASS:METRIC>=BOUND"),
    (["Viral:sensitivity>=0.9", "Viral:specificity>=0.9"], "already has a target"),
])
def test_parse_errors_name_the_problem_on_one_line(texts, message):
    with pytest.raises(ValueError, match=message) as caught:
        parse_targets(texts, CLASSES)
    assert "\n" not in str(caught.value)


def test_no_targets_is_argmax_with_every_image_cleared(val):
    p, labels = val
    point = choose_operating_point(p, labels, CLASSES, [])
    decisions, cleared = point.decide(p)
    assert (decisions == p.argmax(axis=1)).all() and cleared.all()
    assert point.thresholds == dict.fromkeys(CLASSES, 0.0) and point.achieved == {}


def test_the_rule_on_hand_made_images():
    point = OperatingPoint(("Normal", "Pneumonia", "COVID-19"),
                           (Target("COVID-19", "sensitivity", 0.9),
                            Target("Normal", "specificity", 0.9)),
                           {"Normal": 0.6, "Pneumonia": 0.0, "COVID-19": 0.2})
    p = np.array([[0.50, 0.25, 0.25],    # 1: COVID-19 reaches 0.2, ruled in although least likely
                  [0.70, 0.25, 0.05],    # 2: Normal reaches 0.6 and is the most probable eligible
                  [0.55, 0.40, 0.05]])   # 2: Normal is below 0.6, so not eligible: Pneumonia
    decisions, cleared = point.decide(p)
    assert decisions.tolist() == [2, 0, 1] and cleared.all()
    # Every class with a target: an image where none is eligible falls back to the argmax.
    strict = OperatingPoint(("Normal", "Pneumonia", "COVID-19"),
                            (Target("COVID-19", "sensitivity", 0.9),
                             Target("Normal", "specificity", 0.9),
                             Target("Pneumonia", "specificity", 0.9)),
                            {"Normal": 0.6, "Pneumonia": 0.6, "COVID-19": 0.5})
    decisions, cleared = strict.decide(np.array([[0.45, 0.40, 0.15], [0.1, 0.2, 0.7]]))
    assert decisions.tolist() == [0, 2] and cleared.tolist() == [False, True]


def test_a_sensitivity_target_is_met_by_the_largest_threshold_that_meets_it(val):
    p, labels = val
    target = Target("COVID-19", "sensitivity", 0.95)
    point = choose_operating_point(p, labels, CLASSES, [target])
    assert _figure(point, p, labels, target) >= 0.95
    assert point.achieved == {str(target): _figure(point, p, labels, target)}
    raised = np.nextafter(point.thresholds["COVID-19"], 1.0)  # a hair above
    assert _figure(_with_threshold(point, "COVID-19", raised), p, labels, target) < 0.95


def test_a_specificity_target_is_met_by_the_smallest_threshold_that_meets_it(val):
    p, labels = val
    target = Target("Normal", "specificity", 0.95)
    point = choose_operating_point(p, labels, CLASSES, [target])
    threshold = point.thresholds["Normal"]
    assert threshold > 0 and _figure(point, p, labels, target) >= 0.95
    # Between two probabilities of the split a threshold changes nothing: the next lower one.
    lower = p[:, 0][p[:, 0] < threshold].max()
    assert _figure(_with_threshold(point, "Normal", lower), p, labels, target) < 0.95


@pytest.mark.parametrize("order", [0, 1])
def test_two_targets_are_both_met_through_decide(val, order):
    p, labels = val
    targets = [Target("COVID-19", "sensitivity", 0.95), Target("Normal", "specificity", 0.95)]
    targets = targets[::-1] if order else targets
    point = choose_operating_point(p, labels, CLASSES, targets)
    for target in targets:
        assert _figure(point, p, labels, target) == point.achieved[str(target)] >= target.bound
    # They cost something: more images go to COVID-19 than the argmax sends there.
    assert (point.decide(p)[0] == 3).sum() > (p.argmax(axis=1) == 3).sum()


def test_targets_on_every_class_hold_in_every_stated_order():
    # With a target on every class step 3 of the rule is in play, and a later threshold changes
    # which classes are eligible for the earlier ones.
    p, labels = _calibrated(300, seed=7, classes=3)
    names = ["A", "B", "C"]
    stated = [Target("A", "sensitivity", 0.8), Target("B", "specificity", 0.9),
              Target("C", "specificity", 0.85), Target("B", "sensitivity", 0.7)]
    orders = [c for c in itertools.permutations(stated, 3) if len({t.class_name for t in c}) == 3]
    assert len(orders) == 12
    for chosen in orders:
        point = choose_operating_point(p, labels, names, chosen)
        for target in chosen:
            assert _figure(point, p, labels, target) >= target.bound
        # The last target is tried with the finished rule: its threshold is the tightest of all.
        last = chosen[-1]
        column = p[:, names.index(last.class_name)]
        meeting = [t for t in np.unique(np.append(column, 0.0))
                   if _figure(_with_threshold(point, last.class_name, t), p, labels, last)
                   >= last.bound]
        tightest = max(meeting) if last.metric == "sensitivity" else min(meeting)
        assert point.thresholds[last.class_name] == tightest


def test_random_targets_are_met_through_decide_or_refused_with_a_reason():
    rng = np.random.default_rng(13)
    met = 0
    for trial in range(80):
        classes = int(rng.integers(3, 5))
        names = [f"c{i}" for i in range(classes)]
        p, labels = _calibrated(200, seed=100 + trial, classes=classes)
        targets = [Target(names[c], str(rng.choice(["sensitivity", "specificity"])),
                          float(rng.choice([0.6, 0.8, 0.9, 0.95])))
                   for c in rng.permutation(classes)[:rng.integers(2, classes + 1)]]
        try:
            point = choose_operating_point(p, labels, names, targets)
        except ValueError as error:
            assert "cannot be met" in str(error)
            continue
        met += 1
        assert all(_figure(point, p, labels, t) >= t.bound for t in targets)
    assert met >= 40


# Normal, Pneumonia, COVID-19. Image 0 is Pneumonia but looks most like COVID-19, then Normal.
_UNDONE_P = np.array([[0.35, 0.15, 0.50], [0.60, 0.10, 0.30], [0.10, 0.10, 0.80],
                      [0.05, 0.05, 0.90], [0.10, 0.80, 0.10]])
_UNDONE_LABELS = np.array([1, 0, 2, 2, 1])
_UNDONE_NAMES = ["Normal", "Pneumonia", "COVID-19"]


def test_a_target_undone_by_a_later_threshold_is_chosen_again_with_room_for_it():
    targets = parse_targets(["Normal:specificity>=1", "COVID-19:sensitivity>=1"], _UNDONE_NAMES)
    # First pass: Normal at 0 calls no sick image Normal while COVID-19 is still eligible; then
    # COVID-19 rises to 0.8, stops being eligible below it, and image 0 falls to Normal. The
    # second pass keeps COVID-19 out of step 2 while Normal is tried, so Normal rises to 0.6.
    point = choose_operating_point(_UNDONE_P, _UNDONE_LABELS, _UNDONE_NAMES, targets)
    assert point.thresholds == {"Normal": 0.6, "Pneumonia": 0.0, "COVID-19": 0.8}
    assert point.decide(_UNDONE_P)[0].tolist() == [1, 0, 2, 2, 1]
    assert point.achieved == {str(targets[0]): 1.0, str(targets[1]): 1.0}


def test_a_target_undone_in_both_passes_is_refused_with_both_reasons():
    p = _UNDONE_P.copy()
    p[0] = [0.45, 0.05, 0.50]  # now the most Normal-looking image of all, and sick
    p[1] = [0.40, 0.30, 0.30]
    targets = parse_targets(["Normal:specificity>=1", "COVID-19:sensitivity>=1"], _UNDONE_NAMES)
    with pytest.raises(ValueError, match=r"Normal:specificity>=1.0 is met when its threshold is "
                                         r"chosen but reaches 0\.7500 once the later thresholds "
                                         r"are chosen, and choosing with room for them fails: "
                                         r".*best specificity reachable is 0\.7500"):
        choose_operating_point(p, _UNDONE_LABELS, _UNDONE_NAMES, targets)


def test_an_unreachable_target_is_refused_with_the_best_reachable_value():
    # The most Normal-looking image is sick, so calling Normal at all costs specificity.
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
    labels = np.array([1, 0, 1])
    with pytest.raises(ValueError, match=r"cannot be met.*best specificity reachable is 0\.5000"):
        choose_operating_point(p, labels, ["Normal", "Sick"],
                               [Target("Normal", "specificity", 1.0)])
    # A first sensitivity target at threshold 0 rules everything in, leaving none for the second.
    p, labels = _calibrated(300, seed=8)
    with pytest.raises(ValueError, match="Viral:sensitivity>=0.9 cannot be met .* after the 1"):
        choose_operating_point(p, labels, CLASSES,
                               parse_targets(["COVID-19:sensitivity>=1", "Viral:sensitivity>=0.9"],
                                             CLASSES))


def test_a_class_absent_from_the_split_has_no_figure_to_meet():
    p, labels = _calibrated(100, seed=9)
    labels = np.where(labels == 3, 0, labels)
    with pytest.raises(ValueError, match="no images of COVID-19"):
        choose_operating_point(p, labels, CLASSES, [Target("COVID-19", "sensitivity", 0.9)])


def test_round_trip_through_json(val):
    p, labels = val
    point = choose_operating_point(p, labels, CLASSES, parse_targets(
        ["COVID-19:sensitivity>=0.95", "Normal:specificity>=0.9"], CLASSES))
    back = OperatingPoint.from_dict(json.loads(json.dumps(point.to_dict())))
    assert back == point
    assert all((a == b).all() for a, b in zip(back.decide(p), point.decide(p)))


def test_a_saved_operating_point_that_does_not_add_up_is_refused(val):
    p, labels = val
    saved = choose_operating_point(p, labels, CLASSES, parse_targets(
        ["COVID-19:sensitivity>=0.95"], CLASSES)).to_dict()
    for change, message in ((("targets", 0, "metric", "recall"), "use sensitivity or"),
                            (("targets", 0, "bound", 95), r"lie in \(0, 1\]"),
                            (("targets", 0, "class_name", "Flu"), "distinct classes"),
                            (("thresholds", "Flu", None, 0.5), "outside")):
        bad = json.loads(json.dumps(saved))
        key, index, field, value = change
        if field is None:
            bad[key][index] = value
        else:
            bad[key][index][field] = value
        with pytest.raises(ValueError, match=message):
            OperatingPoint.from_dict(bad)


def test_class_figures_on_known_decisions():
    labels = np.array([0, 0, 0, 1, 1, 2])
    decisions = np.array([0, 0, 1, 1, 0, 1])
    figures = class_figures(labels, decisions, ["a", "b", "c"])
    assert figures["a"] == {"sensitivity": 2 / 3, "specificity": 2 / 3, "ppv": 2 / 3,
                            "npv": 2 / 3, "support": 3}
    assert figures["b"] == {"sensitivity": 0.5, "specificity": 0.5, "ppv": 1 / 3, "npv": 2 / 3,
                            "support": 2}
    assert figures["c"] == {"sensitivity": 0.0, "specificity": 1.0, "ppv": None, "npv": 5 / 6,
                            "support": 1}


def _brute_force_intervals(labels, decisions, patient_ids, classes, n_boot, seed, level):
    patients = np.unique(patient_ids)
    draws = np.random.default_rng(seed).integers(0, len(patients), size=(n_boot, len(patients)))
    values = {(c, m): [] for c in range(classes) for m in ("sensitivity", "specificity")}
    for row in draws:
        images = np.concatenate([np.flatnonzero(patient_ids == patients[i]) for i in row])
        y, d = labels[images], decisions[images]
        for c in range(classes):
            if (y == c).any():
                values[c, "sensitivity"].append((d[y == c] == c).mean())
            if (y != c).any():
                values[c, "specificity"].append((d[y != c] != c).mean())
    tail = 50 * (1 - level)
    return {key: (np.percentile(v, [tail, 100 - tail]).tolist(), len(v)) if v else
            ([None, None], 0) for key, v in values.items()}


def test_bootstrap_equals_a_brute_force_loop_over_drawn_patients(monkeypatch):
    rng = np.random.default_rng(10)
    patient_ids = np.array([f"p{i:02d}" for i in rng.integers(0, 12, 40)])
    labels = np.where(patient_ids == "p00", 2, rng.integers(0, 2, 40))  # "c": one patient's
    decisions = np.where(rng.random(40) < 0.7, labels, rng.integers(0, 3, 40))
    monkeypatch.setattr(op_module, "DRAW_CELLS", 50)  # several blocks of draws, as on big splits
    got = bootstrap_intervals(labels, decisions, patient_ids, ["a", "b", "c"], n_boot=300,
                              seed=3, level=0.9)
    want = _brute_force_intervals(labels, decisions, patient_ids, 3, 300, 3, 0.9)
    for (c, metric), ((low, high), kept) in want.items():
        interval = got["abc"[c]][metric]
        assert interval["replicates"] == kept and kept > 0
        assert [interval["low"], interval["high"]] == pytest.approx([low, high], abs=1e-12)
    # Replicates that miss patient p00 hold no "c" image and are left out of its sensitivity.
    assert 0 < got["c"]["sensitivity"]["replicates"] < 300


def test_one_patient_with_many_images_widens_the_interval():
    rng = np.random.default_rng(11)
    # 200 COVID-19 images of one patient, all found; 100 of 100 other patients, 60% found.
    labels = np.full(300, 1)
    decisions = np.concatenate([np.ones(200, int), (rng.random(100) < 0.6).astype(int)])
    owner = np.concatenate([np.zeros(200, int), np.arange(1, 101)])
    names = ["Normal", "COVID-19"]
    by_patient = bootstrap_intervals(labels, decisions, owner, names)["COVID-19"]["sensitivity"]
    by_image = bootstrap_intervals(labels, decisions, np.arange(300),
                                   names)["COVID-19"]["sensitivity"]
    assert by_patient["value"] == by_image["value"]
    width = {k: v["high"] - v["low"] for k, v in (("patient", by_patient), ("image", by_image))}
    assert width["patient"] > 3 * width["image"], width


def test_bootstrap_values_are_class_figures_and_lie_inside_their_intervals(val):
    p, labels = val
    point = choose_operating_point(p, labels, CLASSES, [Target("COVID-19", "sensitivity", 0.9)])
    decisions, _ = point.decide(p)
    patients = np.random.default_rng(12).integers(0, 400, len(labels))
    start = time.perf_counter()
    intervals = bootstrap_intervals(labels, decisions, patients, CLASSES, n_boot=2000)
    assert time.perf_counter() - start < 1.0  # 2000 replicates of 1000 images, vectorised
    figures = class_figures(labels, decisions, CLASSES)
    for name in CLASSES:
        for metric in ("sensitivity", "specificity"):
            interval = intervals[name][metric]
            assert interval["value"] == figures[name][metric]
            assert interval["low"] <= interval["value"] <= interval["high"]
            assert interval["replicates"] == 2000
    json.dumps(intervals)


def test_bootstrap_is_deterministic_given_a_seed(val):
    p, labels = val
    decisions = p.argmax(axis=1)
    patients = np.arange(len(labels)) // 3
    first, again, other = (bootstrap_intervals(labels, decisions, patients, CLASSES, 200, seed)
                           for seed in (5, 5, 6))
    assert first == again and first != other


def test_bootstrap_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="one of each per image"):
        bootstrap_intervals([0, 1], [0, 1], [7], ["a", "b"])
    with pytest.raises(ValueError, match="level in"):
        bootstrap_intervals([0, 1], [0, 1], [7, 8], ["a", "b"], level=95)
    with pytest.raises(ValueError, match=r"decisions must be class indices in \[0, 2\)"):
        bootstrap_intervals([0, 1], [0, 2], [7, 8], ["a", "b"])
