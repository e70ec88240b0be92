"""What a served answer says beside its probabilities: calibration inside the graph, the OOD
score, the decision at the operating point, prediction sets and ``refer``, offline and served."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flannel.artifacts import read_manifest
from flannel.backends import make_session
from flannel.calibration import Scaling
from flannel.conformal import Conformal
from flannel.data.records import read_manifest as read_split
from flannel.export.answer_policy import PolicyConfig
from flannel.export.sources import load_source
from flannel.graphs import LogitScaling, served_graph
from flannel.handlers import serving
from flannel.handlers.answer_fields import ServedPolicy
from flannel.ood import MahalanobisDistance, fit_mahalanobis, threshold_for
from flannel.operating_point import OperatingPoint, Target
from flannel.preprocess import PreprocessSpec, load_tensor

CLASSES = ["COVID-19", "Normal", "Pneumonia"]


# --- the pieces ----------------------------------------------------------------------------------

def test_temperature_in_the_graph_calibrates_and_keeps_every_decision():
    spec = PreprocessSpec(resize=40, crop=32).to_dict()
    graph = served_graph("learner", [{"name": "resnet18", "arch": "resnet18", "preprocess": spec}],
                         3, 40)
    x = torch.rand(6, 1, 40, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, plain, _ = graph(x)
        graph.calibration.load_scaling(Scaling("temperature", temperature=4.0))
        _, calibrated, _ = graph(x)
    torch.testing.assert_close(plain, torch.softmax(logits, 1))
    torch.testing.assert_close(calibrated, torch.softmax(logits / 4.0, 1))
    assert torch.equal(plain.argmax(1), calibrated.argmax(1))
    assert (calibrated.max(1).values < plain.max(1).values).all()  # T > 1 softens


def test_vector_scaling_sets_a_scale_and_a_bias_per_class():
    scaling = LogitScaling(3)
    scaling.load_scaling(Scaling("vector", scale=(2.0, 1.0, 0.5), bias=(0.1, 0.0, -0.1)))
    z = torch.tensor([[1.0, 2.0, 3.0]])
    torch.testing.assert_close(scaling(z), torch.tensor([[2.1, 2.0, 1.4]]))


def test_mahalanobis_distance_in_the_graph_equals_the_textbook_formula():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    features = rng.normal(size=(300, 8)) + 3.0 * np.eye(3, 8)[labels]
    means, whitening, shrinkage = fit_mahalanobis(features, labels, 3)
    distance = MahalanobisDistance(3, 8)
    distance.load_fit(means, whitening)
    precision = whitening @ whitening.T
    probe = rng.normal(size=(5, 8)) * 2
    want = np.min([np.einsum("nd,de,ne->n", probe - m, precision, probe - m) for m in means],
                  axis=0) / 8
    got = distance(torch.from_numpy(probe).float()).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert 0.0 <= shrinkage <= 1.0
    far = distance(torch.full((1, 8), 30.0)).item()
    assert far > 10 * got.max()


def test_the_threshold_lets_the_target_share_pass_with_room_on_both_sides():
    scores = np.random.default_rng(1).exponential(size=113)
    for rate in (0.9, 0.95, 0.99, 1.0):
        t = threshold_for(scores, rate)
        passing = int(np.ceil(rate * len(scores)))
        assert np.sum(scores <= t) == passing and passing / len(scores) >= rate
        # No score sits on the threshold, where a backend's rounding could move it across.
        assert np.min(np.abs(scores - t)) > 1e-6 * t


def _policy(targets=(), qhat=0.6) -> ServedPolicy:
    point = OperatingPoint(tuple(CLASSES), tuple(targets),
                           {t.class_name: 0.2 for t in targets})
    return ServedPolicy(point, Conformal("lac", 0.9, qhat, 100))  # sets: p >= 1 - qhat


def test_served_fields_decide_at_the_operating_point_and_refer_when_unsure():
    policy = _policy([Target("COVID-19", "sensitivity", 0.95)])
    probs = np.array([[0.25, 0.70, 0.05],    # COVID-19 clears 0.2: ruled in, not the argmax
                      [0.05, 0.90, 0.05],    # clear Normal
                      [0.10, 0.45, 0.45]])   # two classes in the set
    fields = policy.fields(probs, np.array([0.5, 0.2, 0.9]))
    assert [f["decision"] for f in fields] == ["COVID-19", "Normal", "Normal"]
    assert fields[1] == {"decision": "Normal", "prediction_set": ["Normal"], "refer": False,
                         "refer_reasons": [], "ood_score": pytest.approx(0.2)}
    assert fields[0]["prediction_set"] == ["Normal"] and not fields[0]["refer"]
    assert fields[2]["prediction_set"] == ["Normal", "Pneumonia"] and fields[2]["refer"]
    out = policy.fields(probs[1:2], np.array([3.0]))[0]
    assert out["refer"] and out["refer_reasons"] == ["not like the training images"]


def test_a_policy_for_other_classes_is_refused():
    data = json.dumps({"class_names": ["a", "b"], "operating_point": {}, "conformal": {}})
    with pytest.raises(ValueError, match="classes"):
        ServedPolicy.from_json(data, CLASSES)


# --- the export ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def policy(exported_tiny_run) -> dict:
    return json.loads((exported_tiny_run / "export" / "answer_policy.json").read_text())


def test_the_export_records_its_policy_and_the_served_probabilities_are_calibrated(
        exported_tiny_run, policy):
    export = exported_tiny_run / "export"
    manifest = read_manifest(export)
    assert manifest["answer_policy"]["probabilities"].startswith("calibrated: temperature")
    assert manifest["answer_policy"]["temperature"] == policy["calibration"]["temperature"] > 0
    for split in ("val", "test"):
        figures = policy["calibration"]["figures"][split]
        assert set(figures) == {"before", "after"}
        assert {"ece", "brier", "nll"} <= set(figures["after"])
    assert (export / "answer_report.md").read_text().count("| COVID-19 |") == 2
    assert (export / "reliability.png").stat().st_size > 1000
    # The graph's probabilities are softmax(log p / T) of the uncalibrated fused ones.
    source = load_source(exported_tiny_run)
    raw = source.module
    x = torch.rand(4, 1, 73, 73, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        uncalibrated = raw.parts(x)[0].numpy()
    session = make_session(export / "model.onnx", intra_op_threads=1)
    served = session.run(["probabilities"], {"image": x.numpy()})[0]
    t = policy["calibration"]["temperature"]
    want = Scaling("temperature", temperature=t).probabilities(np.log(uncalibrated))
    np.testing.assert_allclose(served, want, atol=1e-5)


def test_ood_threshold_passes_the_validation_split_and_fails_photographs(exported_tiny_run,
                                                                         policy):
    ood = policy["ood"]
    assert ood["val_pass_rate"] >= 0.95 and ood["target_pass_rate"] == 0.95
    sets = ood["evaluation"]["sets"]
    assert {"photographs", "ct", "mr", "extremity-radiograph", "documents", "noise"} <= set(sets)
    # Even the tiny random-weights network tells these apart from its synthetic radiographs.
    print({name: (s["auroc"], s["pass_rate"]) for name, s in sets.items()})
    assert sets["photographs"]["auroc"] >= 0.9 and sets["noise"]["auroc"] >= 0.9
    assert sets["photographs"]["pass_rate"] <= 0.2
    # The served score of the validation images: what the threshold was set on.
    export = exported_tiny_run / "export"
    spec = PreprocessSpec.load(export / "input_spec.json")
    config = json.loads((exported_tiny_run / "config.json").read_text())
    rows = read_split(config["manifest"], split="val")
    batch = torch.stack([load_tensor(r.path, spec) for r in rows]).numpy()
    scores = make_session(export / "model.onnx", intra_op_threads=1).run(
        ["ood_score"], {"image": batch})[0]
    assert np.mean(scores <= 1.0) == pytest.approx(ood["val_pass_rate"])


@pytest.mark.slow
def test_the_operating_point_meets_its_target_on_val_and_reports_test_intervals(
        exported_run_dir, tmp_path):
    from flannel.export.onnx_export import export_onnx
    from flannel.export.parity import run_parity
    from flannel.handlers.archive import build_archive
    from flannel.model_card import read_card

    export_onnx(exported_run_dir, policy=PolicyConfig(
        operating_point=["Normal:specificity>=0.75"], coverage=0.8, ood_sets=False))
    policy = json.loads((exported_run_dir / "export" / "answer_policy.json").read_text())
    point = policy["operating_point"]
    assert point["achieved"]["Normal:specificity>=0.75"] >= 0.75
    assert point["val"]["Normal"]["specificity"] >= 0.75
    normal = point["test"]["per_class"]["Normal"]["sensitivity"]
    assert normal["low"] <= normal["value"] <= normal["high"]
    assert point["test"]["bootstrap"]["unit"] == "patient"
    assert policy["conformal"]["coverage"] == 0.8 and "evaluation" not in policy["ood"]
    # The archive's card names the point and its measured test figures.
    run_parity(exported_run_dir)
    card = read_card(build_archive(exported_run_dir, tmp_path / "store"))
    assert "targets Normal:specificity>=0.75; thresholds" in card
    assert f"test Normal sensitivity {normal['value']:.4f}" in card


# --- served -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(exported_tiny_run):
    return serving.load_served_model(exported_tiny_run / "export", {"intra_op_threads": 1})


def _offline(export: Path, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    spec = PreprocessSpec.load(export / "input_spec.json")
    batch = torch.stack([load_tensor(p, spec) for p in paths]).numpy()
    return tuple(make_session(export / "model.onnx", intra_op_threads=1).run(
        ["probabilities", "ood_score"], {"image": batch}))


def _photo() -> Path:
    from flannel.export.answer_policy import ood_set_paths, ood_sets_folder

    return ood_set_paths(ood_sets_folder())["photographs"][0]


def test_answers_carry_the_policy_fields_equal_to_offline(exported_tiny_run, served):
    export = exported_tiny_run / "export"
    config = json.loads((exported_tiny_run / "config.json").read_text())
    paths = [Path(r.path) for r in read_split(config["manifest"], split="test")] + [_photo()]
    probs, ood = _offline(export, paths)
    want = ServedPolicy.from_json((export / "answer_policy.json").read_text(),
                                  served.class_names).fields(probs, ood)
    answers = serving.answer_batch(served, [p.read_bytes() for p in paths])
    for answer, expected in zip(answers, want):
        assert answer.status == 200, answer.body
        for key in ("decision", "prediction_set", "refer", "refer_reasons"):
            assert answer.body[key] == expected[key]
        assert answer.body["ood_score"] == pytest.approx(expected["ood_score"], rel=1e-5)
    photo = answers[-1].body
    assert photo["ood_score"] > 1 and photo["refer"]
    assert any("not like the chest radiographs" in w for w in photo["warnings"])
    # v2: the same fields as output tensors.
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(paths)],
                        "data": [base64.b64encode(p.read_bytes()).decode() for p in paths]}]}
    (v2,) = serving.answer_batch(served, [{"body": body}])
    outputs = {o["name"]: o for o in v2.body["outputs"]}
    assert outputs["decision"]["data"] == [w["decision"] for w in want]
    assert outputs["refer"]["datatype"] == "BOOL"
    assert outputs["refer"]["data"] == [w["refer"] for w in want]
    sets = np.array(outputs["prediction_set"]["data"]).reshape(outputs["prediction_set"]["shape"])
    assert [[c for c, m in zip(served.class_names, row) if m] for row in sets] == [
        w["prediction_set"] for w in want]
    np.testing.assert_allclose(outputs["ood_score"]["data"], ood, rtol=1e-5)


def test_strict_input_refuses_what_is_not_a_chest_radiograph_alone(exported_tiny_run, served):
    import dataclasses

    strict = dataclasses.replace(served, strict_input=True)
    config = json.loads((exported_tiny_run / "config.json").read_text())
    val = [Path(r.path) for r in read_split(config["manifest"], split="val")]
    chest = val[int(np.argmin(_offline(exported_tiny_run / "export", val)[1]))]
    answers = serving.answer_batch(strict, [_photo().read_bytes(), chest.read_bytes()])
    assert answers[0].status == 422
    assert "ood_score" in answers[0].body["error"] and "not like" in answers[0].body["error"]
    assert answers[1].status == 200 and answers[1].body["ood_score"] <= 1.0


@pytest.mark.slow
def test_the_ood_sets_cache_is_read_back_and_built_again_when_unreadable(tmp_path):
    from flannel.export.answer_policy import ood_set_paths
    from flannel.ood_sets import OOD_SETS

    (tmp_path / "ood_sets.json").write_text("{not json")
    paths = ood_set_paths(tmp_path)
    assert set(paths) == set(OOD_SETS) and all(p.is_file() for v in paths.values() for p in v)
    first = next(iter(paths.values()))[0]
    built = first.stat().st_mtime_ns
    assert ood_set_paths(tmp_path) == paths and first.stat().st_mtime_ns == built  # read back
