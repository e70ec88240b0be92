"""Bad input changes nothing: each of the corpus's kinds (``bad_inputs.py``) is answered correctly
or refused with a 4xx naming the problem, alone, as JSON/base64, and mixed into one batch with good
items that get exactly the answers they get alone; and a bounded fuzz of decode + preprocess lets
no exception out but the project's typed input errors.

The same corpus goes through a real TorchServe over HTTP and gRPC in
``test_serving_integration.py``.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bad_inputs import UNPICKLED_MARKER, as_json, check, corpus
from flannel.decode import InputError, decode_image
from flannel.handlers import serving
from flannel.handlers.serving import load_served_model
from flannel.preprocess import PreprocessSpec, to_tensor
from flannel.samples import real_chest_dicom

CASES = corpus(real_chest_dicom())


@pytest.fixture(scope="module")
def served(exported_tiny_run):
    return load_served_model(exported_tiny_run / "export", {"intra_op_threads": 1})


def test_corpus_has_thirty_kinds_and_more():
    assert len({c.name for c in CASES}) == len(CASES) >= 30
    assert sum(c.status != 200 for c in CASES) >= 25


def test_each_kind_alone_raw_and_as_json(served):
    answered = {}
    for case in CASES:
        raw = serving.answer_batch(served, [case.body])[0]
        check(case, raw.status, raw.body, answered)
        answered[case.name] = raw.body
        wrapped = serving.answer_batch(served, [{"body": as_json(case)}])[0]
        check(case, wrapped.status, wrapped.body, answered)
        if wrapped.status == 200:
            assert wrapped.body == raw.body, case.name


def test_request_data_is_never_unpickled(served):
    """A pickle whose loading would create a file, sent raw and as JSON/base64: refused as not
    an image, and the file never appears."""
    UNPICKLED_MARKER.unlink(missing_ok=True)
    case = next(c for c in CASES if c.name == "python pickle")
    answers = serving.answer_batch(served, [case.body, {"body": as_json(case)}])
    assert [a.status for a in answers] == [400, 400]
    assert not UNPICKLED_MARKER.exists()


def test_one_batch_of_every_kind_answers_each_as_alone(served):
    """All kinds in one batch (good and bad interleaved, on the preparing threads): every good
    item gets exactly its answer alone, every bad one its own refusal, in order."""
    from dataclasses import replace

    alone = {c.name: serving.answer_batch(served, [c.body])[0] for c in CASES}
    pooled = replace(served, prepare_threads=2, _pool=None)
    order = CASES[::2] + CASES[1::2]
    together = serving.answer_batch(pooled, [c.body for c in order])
    assert len(together) == len(order)
    for case, answer in zip(order, together):
        assert answer.status == alone[case.name].status, case.name
        if answer.status == 200:
            np.testing.assert_allclose(list(answer.body["probabilities"].values()),
                                       list(alone[case.name].body["probabilities"].values()),
                                       atol=1e-6, err_msg=case.name)
        else:
            assert answer.body == alone[case.name].body, case.name


def test_strict_archives_refuse_what_others_answer_with_a_warning(served):
    """Out of distribution (a DICOM of another modality or body part): answered with a
    "warnings" field by default, refused with 422 naming the reason when served strict."""
    from dataclasses import replace

    doubtful = [c for c in CASES if c.warns]
    assert len(doubtful) >= 3
    strict = replace(served, strict_input=True)
    for case in doubtful:
        (answer,) = serving.answer_batch(strict, [case.body])
        assert answer.status == 422 and answer.phrase == "NotAChestRadiograph", case.name
        assert "served strict" in answer.body["error"]
    # The rest pass the header checks; strict refuses those whose ood_score fails, exactly.
    fine = [c for c in CASES if c.status == 200 and not c.warns]
    lenient = serving.answer_batch(served, [c.body for c in fine])
    for case, answer, plain in zip(fine, serving.answer_batch(strict, [c.body for c in fine]),
                                   lenient):
        if plain.body["ood_score"] > 1.0:
            assert answer.status == 422 and "ood_score" in answer.body["error"], case.name
        else:
            assert answer.status == 200 and answer.body == plain.body, case.name


def _seeds() -> list[bytes]:
    """Valid files of each accepted kind, the starting points of the fuzz."""
    good = {c.name: c.body for c in CASES if c.status == 200}
    return [good[n] for n in ("png 8-bit", "png 16-bit", "jpeg", "dicom", "dicom rle lossless")]


SEEDS = _seeds()
SPEC = PreprocessSpec.for_input_size(64)


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(("flip", "cut", "insert", "zero")))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[at:at + draw(st.integers(1, 512))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        else:
            data[at:at + draw(st.integers(1, 64))] = bytes(draw(st.integers(1, 64)))
    return bytes(data)


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated(), st.binary(max_size=2048)))
def test_fuzzed_files_raise_only_typed_input_errors(data):
    """Mutations of valid PNG, JPEG and DICOM files (flipped, cut, inserted, zeroed bytes) and
    random bytes: decode + preprocess either give a finite tensor in bounds or raise an
    ``InputError``; the pixel limit keeps each decode's memory bounded (a 64 MP declared size
    would be refused before decoding)."""
    try:
        image = decode_image(data, max_pixels=4096 * 4096)
    except InputError:
        return
    assert image.ndim == 2 and image.dtype == np.float32
    tensor = to_tensor(image, SPEC)
    assert tensor.shape == (3, 64, 64) and bool(tensor.isfinite().all())
