"""Open Inference Protocol (v2) requests and Grad-CAM explanations in the handler, without a server.

    .venv/bin/pytest tests/test_open_inference.py -q
"""
from __future__ import annotations

import base64
import copy
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from flannel.artifacts import EAGER_FP32
from flannel.handlers.open_inference import MAX_ITEMS
from flannel.handlers.serving import answer_batch, load_served_model, payload_bytes, tensor_from_bytes

HTTP = {"Host": "127.0.0.1:8080", "Content-Type": "application/json"}


def png(seed: int, side: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def v2_bytes(*files: bytes, **extra) -> dict:
    return {"id": "req-1", "inputs": [{"name": "image", "datatype": "BYTES",
                                       "shape": [len(files)], "data": [b64(f) for f in files]}],
            **extra}


def outputs(body: dict) -> dict:
    return {o["name"]: o for o in body["outputs"]}


@pytest.fixture(scope="module")
def learner(exported_tiny_run):
    return load_served_model(exported_tiny_run / "export", {"explain_per_batch": 1})


@pytest.fixture(scope="module")
def ensemble(tiny_ensemble):
    return load_served_model(tiny_ensemble / "export", {"explain_per_batch": 2})


def test_v2_bytes_request_answers_each_image_as_it_is_answered_alone(learner):
    files = [png(1), png(2)]
    alone = [a.body for a in answer_batch(learner, files)]
    [got] = answer_batch(learner, [{"body": v2_bytes(*files)}], headers=[HTTP])
    assert got.status == 200
    assert (got.body["id"], got.body["model_name"], got.body["model_version"]) == \
        ("req-1", learner.name, learner.version)
    out = outputs(got.body)
    k = len(learner.class_names)
    assert out["probabilities"]["datatype"] == "FP32" and out["probabilities"]["shape"] == [2, k]
    probs = np.asarray(out["probabilities"]["data"]).reshape(2, k)
    for row, want in zip(probs, alone):
        np.testing.assert_array_equal(row, np.float32([want["probabilities"][c]
                                                       for c in learner.class_names]))
    assert out["prediction"] == {"name": "prediction", "datatype": "BYTES", "shape": [2],
                                 "data": [a["prediction"] for a in alone]}
    assert out["classes"] == {"name": "classes", "datatype": "BYTES",
                              "shape": [len(learner.class_names)], "data": learner.class_names}


def test_v2_fp32_request_of_the_preprocessed_tensor_answers_like_the_file(learner):
    files = [png(3), png(4)]
    tensors = np.stack([tensor_from_bytes(f, learner.spec).numpy() for f in files])
    side = learner.spec.resize
    fp32 = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [2, 1, side, side],
                        "data": tensors.tolist()}]}  # nested lists, as the protocol allows
    flat = copy.deepcopy(fp32)
    flat["inputs"][0]["data"] = [float(v) for v in tensors.ravel()]
    by_file, nested, flat = answer_batch(learner, [v2_bytes(*files), fp32, flat])
    assert by_file.status == nested.status == flat.status == 200
    assert outputs(nested.body)["probabilities"] == outputs(by_file.body)["probabilities"]
    assert outputs(flat.body)["probabilities"] == outputs(by_file.body)["probabilities"]
    assert nested.body["id"] == ""


def test_v2_ensemble_answer_carries_learner_weights(ensemble):
    [got] = answer_batch(ensemble, [v2_bytes(png(5), png(6), png(7))], headers=[HTTP])
    out = outputs(got.body)
    assert out["learner_weights"]["shape"] == [3, len(ensemble.member_names)]
    weights = np.asarray(out["learner_weights"]["data"]).reshape(3, -1)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-5)
    assert out["learners"]["data"] == list(ensemble.member_names)


def _fp32(shape, data, datatype="FP32"):
    return {"inputs": [{"name": "image", "datatype": datatype, "shape": shape, "data": data}]}


@pytest.mark.parametrize("request_body, status, words", [
    (_fp32([1, 1, 73, 73], [0.5], datatype="INT8"), 400,
     r"datatype 'INT8' is not accepted; expected one input tensor: BYTES with shape \[N\].*FP32 "
     r"with shape \[N, 1, SIDE, SIDE\]"),
    (_fp32([1, 3, 8, 8], [0.5] * 192), 400, r"FP32 input has shape \[1, 3, 8, 8\]; expected "
                                            r"\[N, 1, SIDE, SIDE\]"),
    (_fp32([1, 1, 7], [0.5] * 7), 400, r"expected \[N, 1, SIDE, SIDE\]"),
    (_fp32([2, 1, 1.5, "x"], []), 400, r'"shape" must be a list of 1 to 4 whole numbers'),
    (_fp32([1, 1, "SIDE", "SIDE"], [0.5] * 3), 400, r'needs SQ values in "data", got 3'),
    (_fp32([1, 1, "SIDE", "SIDE"], ["FILL2"]), 400,
     r"values span \[2, 2\]; this model's preprocessed input is in \[0, 1\]"),
    (_fp32([1, 1, "SIDE", "SIDE"], ["FILLNAN"]), 400, "NaN or infinity"),
    (_fp32([1, 1, "SIDE", "SIDE"], ["FILLSTR"]), 400, '"data" must hold numbers only'),
    (_fp32([2], ["a", "b"], datatype="BYTES"), 400, "BYTES element 0 is not valid base64"),
    (_fp32([2], [b64(png(1))], datatype="BYTES"), 400, r'needs 2 elements in "data", got 1'),
    (_fp32([1, 2], [b64(png(1))] * 2, datatype="BYTES"), 400, r"BYTES input has shape \[1, 2\]"),
    (_fp32([1], [7], datatype="BYTES"), 400, "BYTES element 0 must be a base64 string, got int"),
    (_fp32([MAX_ITEMS + 1], [b64(png(1))] * (MAX_ITEMS + 1), datatype="BYTES"), 413,
     f"1 to {MAX_ITEMS} images, got {MAX_ITEMS + 1}"),
    (_fp32([0], [], datatype="BYTES"), 400, f"1 to {MAX_ITEMS} images, got 0"),
    ({"inputs": []}, 400, '"inputs" must hold one input tensor.*got 0'),
    ({"inputs": "x"}, 400, '"inputs" must hold one input tensor.*got str'),
    ({**_fp32([1], [b64(png(1))], datatype="BYTES"), "parameters": [1]}, 400,
     '"parameters" must be an object'),
    (_fp32([2], [b64(png(1)), b64(b"not an image")], datatype="BYTES"), 400,
     "input element 1: DecodeError"),
])
def test_malformed_v2_request_gets_a_4xx_naming_the_expected_input(learner, request_body, status,
                                                                    words):
    side = learner.spec.resize
    text = json.dumps(request_body).replace('"SIDE"', str(side))
    body = json.loads(text)
    tensor = body["inputs"][0] if isinstance(body["inputs"], list) and body["inputs"] else {}
    fill = {"FILL2": 2.0, "FILLNAN": float("nan"), "FILLSTR": "s"}
    if tensor.get("data") and tensor["data"][0] in fill:
        tensor["data"] = [fill[tensor["data"][0]]] * (side * side)
    words = words.replace("SIDE", str(side)).replace("SQ", str(side * side))
    good = png(9)
    got, alone_ok = answer_batch(learner, [body, good], headers=[HTTP, HTTP])
    assert got.status == status, got.body
    assert list(got.body) == ["error", "code"]
    assert re.search(words, got.body["error"]), got.body["error"]
    # The good request of the same batch gets exactly its answer alone.
    assert alone_ok.body == answer_batch(learner, [good])[0].body


def test_v2_over_grpc_carries_its_error_inside_a_v2_body(learner):
    [got] = answer_batch(learner, [_fp32([1], ["%%"], datatype="BYTES")], headers=[{}])
    assert got.status == 400
    out = outputs(got.body)
    assert "not valid base64" in out["error"]["data"][0] and out["code"]["data"] == [400]
    assert got.reason == out["error"]["data"][0]
    [ok] = answer_batch(learner, [v2_bytes(png(1))], headers=[{}])
    assert "parameters" not in ok.body and outputs(ok.body)["probabilities"]["shape"][0] == 1
    [explained] = answer_batch(learner, [v2_bytes(png(1), parameters={"explain": True})],
                               headers=[{}])
    assert "parameters" not in explained.body and "explanation" in outputs(explained.body)


def _overlay(explanation: dict, side: int) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(explanation["image_png_base64"])))
    assert image.format == "PNG" and image.size == (side, side)
    return np.asarray(image)


def test_explanation_overlays_the_predicted_class_on_the_served_tensor(learner):
    image = png(11)
    explain = {"Host": "x", "explain": "True"}  # the /explanations route's header
    plain, explained = answer_batch(learner, [image, image], headers=[{"Host": "x"}, explain])
    assert "explanation" not in plain.body
    e = explained.body.pop("explanation")
    assert explained.body == plain.body  # the prediction is the served one
    assert e["method"] == "grad-cam" and e["explained"] == "learner"
    assert e["target"] == plain.body["prediction"]
    # The eager graph agrees with the backend on the explained class's probability.
    assert e["eager_probability"] == pytest.approx(plain.body["probabilities"][e["target"]],
                                                   abs=1e-4)
    _overlay(e, learner.spec.resize)


def test_explanation_target_and_learner_options(learner, ensemble):
    image = png(12)
    query = {"body": image, "explain": b"true", "target": b"1"}  # ?explain=true&target=1
    as_json = {"image": b64(image), "explain": True, "target": learner.class_names[2]}
    bad_target = {"image": b64(image), "explain": True, "target": "Flu"}
    ok, named, refused = answer_batch(learner, [query], headers=[{}]) + \
        answer_batch(learner, [as_json]) + answer_batch(learner, [bad_target])
    assert ok.body["explanation"]["target"] == learner.class_names[1]
    assert named.body["explanation"]["target"] == learner.class_names[2]
    assert refused.status == 400 and "unknown target class 'Flu'" in refused.body["error"]
    [maybe] = answer_batch(learner, [{"image": b64(image), "explain": "maybe"}])
    assert maybe.status == 400 and "explain must be true or false, got 'maybe'" in \
        maybe.body["error"]
    [one] = answer_batch(learner, [{"image": b64(image), "explain": True, "learner": "x"}])
    assert one.status == 400 and "unknown learner 'x'" in one.body["error"]

    member = ensemble.member_names[1]
    whole, single = answer_batch(ensemble, [
        {"image": b64(image), "explain": True},
        {"image": b64(image), "explain": True, "learner": member}])
    assert whole.body["explanation"]["explained"] == "ensemble"
    assert set(whole.body["explanation"]["layers"]) == set(ensemble.member_names)
    assert whole.body["explanation"]["learner_weights"] == pytest.approx(
        whole.body["learner_weights"], abs=1e-4)
    assert single.body["explanation"]["explained"] == member
    assert list(single.body["explanation"]["layers"]) == [member]


def test_explanations_per_batch_are_bounded_and_predictions_still_run(learner):
    ask = {"image": b64(png(13)), "explain": True}
    first, second, plain = answer_batch(learner, [ask, ask, png(13)])
    assert first.status == 200 and "explanation" in first.body
    assert second.status == 429 and "at most 1 images per batch; retry" in second.body["error"]
    assert plain.status == 200 and plain.body["prediction"] == first.body["prediction"]
    [too_many] = answer_batch(learner, [v2_bytes(png(1), png(2), parameters={"explain": True})],
                              headers=[HTTP])
    assert too_many.status == 429 and "at most 1 images per request, got 2" in \
        too_many.body["error"]


def test_v2_explanation_output(ensemble):
    [got] = answer_batch(ensemble, [v2_bytes(png(14), png(15),
                                             parameters={"explain": "true", "target": 0})],
                         headers=[HTTP])
    out = outputs(got.body)
    assert out["explanation"]["datatype"] == "BYTES" and out["explanation"]["shape"] == [2]
    for encoded in out["explanation"]["data"]:
        _overlay({"image_png_base64": encoded}, ensemble.spec.resize)
    meta = got.body["parameters"]["explanations"]
    assert [m["target"] for m in meta] == [ensemble.class_names[0]] * 2
    assert all("image_png_base64" not in m for m in meta)


def test_archive_without_eager_weights_answers_explanations_with_501(exported_tiny_run, tmp_path):
    import shutil

    from flannel.artifacts import read_manifest, write_manifest

    export = shutil.copytree(exported_tiny_run / "export", tmp_path / "export")
    manifest = read_manifest(export)
    (export / manifest["artifacts"].pop(EAGER_FP32)["path"]).unlink()
    write_manifest(export, manifest)
    model = load_served_model(export)
    ask, plain = answer_batch(model, [{"image": b64(png(1)), "explain": True}, png(1)])
    assert ask.status == 501 and "--no-explanations" in ask.body["error"]
    assert plain.status == 200


def test_payload_bytes_still_reads_json_images():
    assert payload_bytes({"body": json.dumps({"image": b64(b"abc")}).encode()}) == b"abc"
