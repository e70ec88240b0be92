"""One request never changes another's answer: hostile and careless requests, each in a batch
with good items, over the whole request path (payload and option parsing, v2 parsing, decoding,
preprocessing, the model, explanations, the answer's size), without a server.

    .venv/bin/pytest tests/test_item_isolation.py -q
    FLANNEL_FUZZ_EXAMPLES=2000 .venv/bin/pytest tests/test_item_isolation.py -q -k property

The same kinds of request go through a real TorchServe in ``test_serving_integration.py``.
"""
from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flannel.handlers import serving
from flannel.handlers import open_inference as v2
from flannel.handlers.request_json import MAX_CONTAINERS, MAX_DEPTH
from flannel.handlers.serving import MAX_ANSWER_BYTES, answer_batch, load_served_model
from flannel.quoting import MESSAGE_CHARS
from flannel.samples import real_chest_dicom
from test_open_inference import b64, png

# Hypothesis examples per property: CI-sized; raise it for a longer hunt.
EXAMPLES = int(os.environ.get("FLANNEL_FUZZ_EXAMPLES", "40"))
# An error message quotes at most ~100 characters of input; with its own words and the kind's
# name it stays under MESSAGE_CHARS plus the "... (N characters)" tail.
MAX_ERROR_CHARS = MESSAGE_CHARS + 40
HTTP = {"Host": "127.0.0.1"}


GOOD = [png(1), png(2), real_chest_dicom().read_bytes()]


@pytest.fixture(scope="module")
def served(exported_tiny_run):
    return load_served_model(exported_tiny_run / "export", {"intra_op_threads": 1})


@pytest.fixture(scope="module")
def alone(served):
    """Each good item's answer when it is sent alone."""
    return [answer_batch(served, [g])[0] for g in GOOD]


def assert_same_answer(got, lone, what=""):
    """A good item's answer in a batch is its answer alone: status, decision and every field;
    probabilities within 1e-6 (the backend's float rounding can depend on the batch size)."""
    assert got.status == lone.status == 200, (what, got.body)
    assert set(got.body) == set(lone.body), what
    assert got.body["prediction"] == lone.body["prediction"], what
    np.testing.assert_allclose(list(got.body["probabilities"].values()),
                               list(lone.body["probabilities"].values()), atol=1e-6,
                               err_msg=str(what))
    assert {k: v for k, v in got.body.items() if k != "probabilities"} == \
        {k: v for k, v in lone.body.items() if k != "probabilities"}, what


def assert_bounded(answer):
    text = answer.to_json()
    assert len(text) <= MAX_ANSWER_BYTES
    json.loads(text)
    if answer.status != 200:
        reason = answer.reason
        assert len(reason) <= MAX_ERROR_CHARS, reason[:200]
        assert reason.isprintable(), reason[:200]


def in_a_batch(served, alone, hostile, *, headers=None, position=1):
    """``hostile`` among the good items at ``position``; the good ones must answer as alone."""
    items = list(GOOD)
    items.insert(position, hostile)
    heads = [HTTP] * len(items)
    if headers is not None:
        heads[position] = headers
    answers = answer_batch(served, items, headers=heads)
    assert len(answers) == len(items)
    got = answers.pop(position)
    for answer, lone, i in zip(answers, alone, range(len(alone))):
        assert_same_answer(answer, lone, f"good item {i} beside {str(hostile)[:80]!r}")
    assert_bounded(got)
    return got


def deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


LONG = "x" * 2_000_000
IMAGE = b64(GOOD[0])

# (name, the item as TorchServe hands it to the handler, expected status, words in the error)
HOSTILE = [
    ("5000-digit integer in JSON", json.dumps({"image": IMAGE}).encode()[:-1] + b', "n": '
     + b"9" * 5000 + b"}", 400, "JSON number has 5000 characters"),
    ("5000-digit integer in a form field's JSON", {"data": (b'{"image": "' + IMAGE.encode()
                                                             + b'", "target": ' + b"1" * 5000
                                                             + b"}")}, 400, "JSON number"),
    ("superscript digit as target", {"body": json.dumps(
        {"image": IMAGE, "explain": True, "target": "\u00b2"}).encode()}, 400,
     "unknown target class"),
    ("2 MB explain value", {"body": json.dumps({"image": IMAGE, "explain": LONG}).encode()},
     400, "explain must be true or false"),
    ("learner as a list", {"body": json.dumps({"image": IMAGE, "learner": []}).encode()}, 400,
     "learner must be a learner's name"),
    ("target as an object", {"body": json.dumps({"image": IMAGE, "target": {"a": 1}}).encode()},
     400, "target must be a class name or index"),
    ("JSON nested 100,000 deep", deep(100_000), 413, f"at most {MAX_CONTAINERS}"),
    ("JSON nested 100,000 deep as text", {"body": deep(100_000).decode()}, 413, "arrays"),
    ("JSON nested 500 deep", deep(500), 400, f"deeper than {MAX_DEPTH}"),
    ("JSON nested 50 deep in an object", b'{"image": ' + deep(50) + b"}", 400, "deeper"),
    ("a million empty lists", b"[" + b"[]," * 1_000_000 + b"[]]", 413, "arrays and objects"),
    ("NaN in JSON", b'{"image": NaN}', 400, "NaN is not valid JSON"),
    ("JSON that is not UTF-8", b'{"image": "\xff\xfe"}', 400, "not UTF-8"),
    ("JSON in UTF-16", json.dumps({"image": IMAGE}).encode("utf-16"), 400, "UTF-16; send it as"),
    ("v2 datatype a list", {"body": json.dumps({"inputs": [{"name": "x", "datatype": [],
                                                            "shape": [1], "data": [IMAGE]}]}
                                               ).encode()}, 400, "datatype a list"),
    ("v2 shape of 300,000 elements", {"body": json.dumps(
        {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1] * 300_000,
                     "data": [IMAGE]}]}).encode()}, 413, "values; at most"),
    ("v2 shape of 100,000 elements", {"body": json.dumps(
        {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1] * 100_000,
                     "data": [IMAGE]}]}).encode()}, 400, "a list of 100000 items"),
    ("v2 shape with a huge number", {"body": json.dumps(
        {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [10 ** 40],
                     "data": [IMAGE]}]}).encode()}, 400, "whole numbers"),
    ("v2 id of 2 MB", {"body": json.dumps({"id": LONG, "inputs": [
        {"name": "x", "datatype": "BYTES", "shape": [1], "data": [IMAGE]}]}).encode()}, 400,
     '"id" must be a string'),
    ("v2 id an object", {"body": json.dumps({"id": {"a": [1]}, "inputs": [
        {"name": "x", "datatype": "BYTES", "shape": [1], "data": [IMAGE]}]}).encode()}, 400,
     '"id" must be a string'),
    ("v2 parameters a list", {"body": json.dumps({"parameters": [1], "inputs": [
        {"name": "x", "datatype": "BYTES", "shape": [1], "data": [IMAGE]}]}).encode()}, 400,
     '"parameters" must be an object'),
    ("v2 target of control characters", {"body": json.dumps({"parameters": {
        "explain": True, "target": "\x1b[31m\nFORGED LOG LINE" * 1000}, "inputs": [
        {"name": "x", "datatype": "BYTES", "shape": [1], "data": [IMAGE]}]}).encode()}, 400,
     "unknown target class"),
    ("form field explain of 2 MB", {"data": GOOD[0], "explain": LONG.encode()}, 400,
     "explain must be true or false"),
    ("form field learner of bytes", {"data": GOOD[0], "explain": b"true",
                                     "learner": b"\x00\xff" * 1000}, 400, "unknown learner"),
    ("image not base64", {"body": json.dumps({"image": "%%%" * 100_000}).encode()}, 400,
     "not valid base64"),
    ("image a number", {"body": b'{"image": 12}'}, 400, "must be a base64 string"),
    ("JSON array body", {"body": b"[1, 2, 3]"}, 400, "got a list"),
    ("no payload", {}, 400, "no payload"),
    ("payload an int", {"body": 7}, 400, "unsupported payload type"),
]


@pytest.mark.parametrize("name,item,status,words", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_request_gets_its_own_short_refusal(served, alone, name, item, status, words):
    got = in_a_batch(served, alone, item)
    assert got.status == status, (name, got.body)
    assert words in got.reason, (name, got.reason)


def test_json_after_a_byte_order_mark_is_read(served, alone):
    body = b"\xef\xbb\xbf" + json.dumps({"image": b64(GOOD[1])}).encode()
    assert_same_answer(in_a_batch(served, alone, {"body": body}), alone[1])


def test_options_of_a_good_image_are_checked_even_without_an_explanation(served, alone):
    ok = in_a_batch(served, alone, {"body": json.dumps({"image": IMAGE, "target": 1}).encode()})
    assert ok.status == 200
    for explain in (True, "true", 1):
        body = json.dumps({"image": IMAGE, "explain": explain, "target": "1"}).encode()
        assert in_a_batch(served, alone, {"body": body}).status == 200


def test_a_fault_of_the_server_on_one_item_is_that_items_500(served, alone, monkeypatch, caplog):
    """A bug met by one item (here: preprocessing raising on one image size) answers that item
    500 with a short error id, logged with the traceback; the batch is otherwise untouched."""
    real = serving.to_tensor

    def failing(image, spec):
        if image.levels is not None and image.levels.shape == (80, 80):
            raise KeyError("internal bookkeeping went wrong")
        return real(image, spec)

    monkeypatch.setattr(serving, "to_tensor", failing)
    with caplog.at_level(logging.ERROR, logger="flannel.handlers.serving"):
        got = in_a_batch(served, alone, png(3, side=80))
    assert got.status == 500 and got.phrase == "InternalError"
    error_id = got.body["error_id"]
    assert len(error_id) == 8 and error_id in got.reason
    assert any(error_id in r.getMessage() and "KeyError" in r.getMessage()
               for r in caplog.records)


def test_a_backend_failure_stays_with_the_request_that_causes_it(served, alone, monkeypatch):
    """When the backend call over the batch fails, each request runs alone: only the request
    whose input makes the backend fail gets a 500."""
    backend = served.backend
    poison = png(4, side=96)

    class Fussy:
        def __getattr__(self, name):
            return getattr(backend, name)

        def run(self, batch):
            if (batch == bad_tensor).all(axis=(1, 2, 3)).any():
                raise RuntimeError("backend refused this input")
            return backend.run(batch)

    bad_tensor = serving.tensor_from_bytes(poison, served.spec).numpy()
    fussy = replace(served, backend=Fussy())
    items = [GOOD[0], poison, GOOD[1]]
    answers = answer_batch(fussy, items)
    assert [a.status for a in answers] == [200, 500, 200]
    assert_same_answer(answers[0], alone[0])
    assert_same_answer(answers[2], alone[1])


def test_a_backend_answer_that_is_not_json_stays_with_its_request(served, alone):
    """NaN probabilities for one request's image (a broken backend or graph) make that answer
    a 500: JSON has no NaN, and the other answers are written as before."""
    backend = served.backend
    poison = png(5, side=88)
    bad_tensor = serving.tensor_from_bytes(poison, served.spec).numpy()

    class NaNs:
        def __getattr__(self, name):
            return getattr(backend, name)

        def run(self, batch):
            outputs = dict(backend.run(batch))
            rows = (batch == bad_tensor).all(axis=(1, 2, 3))
            probs = np.array(outputs[served.output_name], dtype=np.float32)
            probs[rows] = np.nan
            outputs[served.output_name] = probs
            return outputs

    answers = answer_batch(replace(served, backend=NaNs()), [GOOD[0], poison, GOOD[1]])
    assert [a.status for a in answers] == [200, 500, 200]
    assert_same_answer(answers[0], alone[0])
    assert_same_answer(answers[2], alone[1])


def test_a_call_takes_at_most_its_image_bound_and_the_rest_retry(served):
    """Three v2 requests of 32 images: the first two fill the call's bound, the third is
    answered 503 naming the bound (a retry gets it answered)."""
    files = [png(10 + i) for i in range(v2.MAX_ITEMS)]
    request = {"body": json.dumps({"inputs": [{"name": "image", "datatype": "BYTES",
                                               "shape": [len(files)],
                                               "data": [b64(f) for f in files]}]}).encode()}
    answers = answer_batch(served, [request, request, request], headers=[HTTP] * 3)
    assert [a.status for a in answers] == [200, 200, 503]
    assert f"at most {serving.MAX_IMAGES_PER_CALL} per call; retry" in answers[2].reason
    assert answer_batch(served, [request], headers=[HTTP])[0].status == 200


def test_decoding_past_the_calls_budget_is_answered_503(served, monkeypatch):
    monkeypatch.setattr(serving, "PREPARE_BUDGET_S", -1.0)
    answers = answer_batch(served, [GOOD[0], GOOD[1]])
    assert [a.status for a in answers] == [503, 503]
    assert "decoding before this image; retry" in answers[0].reason


def test_the_explanation_budget_goes_to_items_that_decoded(exported_tiny_run):
    """An explanation request whose image does not decode does not use the batch's one
    explanation: the next explanation request gets it."""
    model = load_served_model(exported_tiny_run / "export", {"intra_op_threads": 1})
    bad = {"body": json.dumps({"image": b64(b"not an image"), "explain": True}).encode()}
    good = {"body": json.dumps({"image": IMAGE, "explain": True}).encode()}
    answers = answer_batch(model, [bad, good, good])
    assert [a.status for a in answers] == [400, 200, 429]
    assert "explanation" in answers[1].body


def test_no_answer_exceeds_the_fixed_size(exported_tiny_run, monkeypatch):
    """An answer over MAX_ANSWER_BYTES (here an explanation, with the limit lowered) becomes a
    short 500; the plain answers beside it are untouched."""
    model = load_served_model(exported_tiny_run / "export", {"intra_op_threads": 1})
    monkeypatch.setattr(serving, "MAX_ANSWER_BYTES", 2000)
    explained = {"body": json.dumps({"image": IMAGE, "explain": True}).encode()}
    answers = answer_batch(model, [GOOD[1], explained])
    assert [a.status for a in answers] == [200, 500]
    assert "over the limit of 2000" not in answers[1].reason  # the cause stays in the log
    assert len(answers[1].to_json()) < 2000


PHI = {"PatientName": "Secretname^Marker", "PatientID": "PHIMARK-4711",
       "PatientBirthDate": "19000101", "AccessionNumber": "ACCPHI0815",
       "InstitutionName": "Hospital Of The Marker"}


def _phi_dicoms() -> dict[str, bytes]:
    """The real radiograph with patient identifiers set, broken in the ways that make pydicom
    and the decoder complain."""
    import pydicom

    def with_phi(**changes) -> bytes:
        ds = pydicom.dcmread(real_chest_dicom())
        for k, v in {**PHI, **changes}.items():
            setattr(ds, k, v)
        buf = io.BytesIO()
        ds.save_as(buf)
        return buf.getvalue()

    whole = with_phi()
    pixels_at = whole.rindex(b"\xe0\x7f\x10\x00")
    return {"intact": whole, "other modality": with_phi(Modality="CT"),
            "body part": with_phi(BodyPartExamined="HAND"),
            "pixels cut": whole[:pixels_at + 200],
            "bad date value": with_phi(PatientBirthDate="PHIMARK-notadate"),
            "rows too large": with_phi(Rows=60_000), "bits 12 of 8": with_phi(BitsAllocated=8)}


def test_patient_identifiers_never_reach_logs_or_answers(served, caplog, capfd):
    dicoms = _phi_dicoms()
    capfd.readouterr()  # what writing the test files printed
    with caplog.at_level(logging.DEBUG):
        answers = answer_batch(served, list(dicoms.values()))
        strict = answer_batch(replace(served, strict_input=True), list(dicoms.values()))
    assert answers[0].status == 200 and strict[1].status == 422
    markers = ["Secretname", "PHIMARK", "ACCPHI", "Of The Marker"]
    logged = "\n".join(r.getMessage() for r in caplog.records) + "".join(capfd.readouterr())
    sent = "\n".join(a.to_json() for a in answers + strict)
    for marker in markers:
        assert marker not in logged, marker
        assert marker not in sent, marker


def test_log_lines_quote_requests_shortly_and_escaped(served, alone, caplog):
    forged = "\x1b[31m\nFORGED LOG LINE " * 50_000
    items = [{"body": json.dumps({"image": IMAGE, "target": forged, "explain": True}).encode()},
             {"body": json.dumps({"inputs": [{"name": "x", "datatype": forged, "shape": [1],
                                             "data": [IMAGE]}]}).encode()}]
    with caplog.at_level(logging.DEBUG):
        for item in items:
            in_a_batch(served, alone, item)
    for record in caplog.records:
        message = record.getMessage()
        assert "\nFORGED" not in message and "\x1b" not in message
        assert len(message) < 4000


# --- properties over the whole request path ---------------------------------------------------

KEYS = st.sampled_from(["image", "explain", "target", "learner", "inputs", "id", "parameters",
                        "datatype", "shape", "data", "name", "body", "x"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 30, 10 ** 30),
                    st.floats(allow_nan=False), st.text(max_size=40),
                    st.just(IMAGE), st.just("true"), st.sampled_from(["BYTES", "FP32", "INT8"]))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(KEYS, inner, max_size=6)), max_leaves=30)


@st.composite
def v2_requests(draw):
    tensor = draw(st.fixed_dictionaries({}, optional={
        "name": JSON_VALUES, "datatype": st.one_of(st.sampled_from(["BYTES", "FP32"]),
                                                   JSON_VALUES),
        "shape": st.one_of(st.lists(st.integers(-2, 40), max_size=5), JSON_VALUES),
        "data": st.one_of(st.lists(st.one_of(st.just(IMAGE), st.floats(0, 1)), max_size=40),
                          JSON_VALUES)}))
    body = {"inputs": draw(st.one_of(st.just([tensor]), JSON_VALUES))}
    body.update(draw(st.fixed_dictionaries({}, optional={
        "id": JSON_VALUES, "parameters": st.one_of(JSON_VALUES, st.fixed_dictionaries(
            {}, optional={"explain": JSON_VALUES, "target": JSON_VALUES,
                          "learner": JSON_VALUES}))})))
    return body


def _seed_files() -> list[bytes]:
    from bad_inputs import corpus

    good = {c.name: c.body for c in corpus(real_chest_dicom()) if c.status == 200}
    return [good[n] for n in ("png 8-bit", "png 16-bit", "jpeg", "dicom", "dicom rle lossless")]


@st.composite
def mutated_files(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEED_FILES)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        op = draw(st.sampled_from(("flip", "cut", "insert")))
        if op == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[at:at + draw(st.integers(1, 512))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
    return bytes(data)


SEED_FILES = _seed_files()
ENCODED = st.one_of(JSON_VALUES.map(lambda v: json.dumps(v).encode()),
                    v2_requests().map(lambda v: json.dumps(v).encode()),
                    st.binary(max_size=256), mutated_files())
ITEMS = st.one_of(
    ENCODED,
    ENCODED.map(lambda b: {"body": b}),
    ENCODED.map(lambda b: {"data": b.decode("latin-1")}),
    st.dictionaries(st.sampled_from(["data", "body", "explain", "target", "learner", "file",
                                     "other"]),
                    st.one_of(ENCODED, st.text(max_size=20), st.none()), max_size=4),
    mutated_files().map(lambda f: {"body": json.dumps({"image": b64(f), "explain": True})
                                   .encode()}),
    v2_requests(), JSON_VALUES)
HEADERS = st.sampled_from([HTTP, {}, {"Host": "x", "explain": "True"}])


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(item=ITEMS, headers=HEADERS, position=st.integers(0, len(GOOD)))
def test_property_any_item_leaves_the_good_items_of_its_batch_alone(served, alone, item,
                                                                     headers, position):
    """Whatever one item holds (random JSON, v2 requests with random fields, form fields, raw
    and mutated PNG/JPEG/DICOM bytes), answer_batch raises nothing, the item gets one bounded
    answer, and the good items of its batch get their lone answers."""
    got = in_a_batch(served, alone, item, headers=headers, position=position)
    assert 200 <= got.status < 600
    if got.status >= 500:
        assert got.status == 503 or got.body.get("error_id") or "error id" in got.reason
