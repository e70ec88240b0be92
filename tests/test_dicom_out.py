"""DICOM results of served answers (``dicom_out``), through the serving functions.

    .venv/bin/pytest tests/test_dicom_out.py -q
"""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pydicom
import pytest

from flannel.dicom_results import from_part10, read_report
from flannel.handlers.dicom_out import DicomOutError, parse_dicom_out
from flannel.handlers.serving import answer_batch, load_served_model
from flannel.samples import real_chest_dicom


@pytest.fixture(scope="module")
def served(exported_tiny_run):
    return load_served_model(exported_tiny_run / "export", {"intra_op_threads": 1}, version="7")


@pytest.fixture(scope="module")
def chest() -> bytes:
    path = real_chest_dicom()
    if path is None:
        pytest.skip("pydicom-data (RG1_UNCR.dcm) is not installed (test extra)")
    return path.read_bytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)).save(
        buf, format="PNG")
    return buf.getvalue()


def v2_body(data: bytes, parameters: dict | None = None, option_input: str | None = None) -> bytes:
    inputs = [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(data)]}]
    if option_input is not None:
        inputs.append({"name": "dicom_out", "datatype": "BYTES", "shape": [1],
                       "data": [b64(option_input.encode())]})
    body = {"id": "r1", "inputs": inputs}
    if parameters:
        body["parameters"] = parameters
    return json.dumps(body).encode()


@pytest.mark.parametrize("value, kinds", [
    (None, ()), ("", ()), (False, ()), ("sr", ("sr",)), (" SR ", ("sr",)),
    ("sc,sr", ("sr", "sc")), (b"sr,sc", ("sr", "sc")), (bytearray(b"sr"), ("sr",)),
    (["sr"], ("sr",)), (["sc", "sr"], ("sr", "sc")),
])
def test_dicom_out_option_reads_every_form_it_arrives_in(value, kinds):
    assert parse_dicom_out(value) == kinds


@pytest.mark.parametrize("value, words", [
    ("pdf", "asks for 'pdf'; the kinds are sr: a Structured Report"),
    ("sr,seg", "asks for 'seg'"), (True, "must be a text"), ({"sr": 1}, "must be a text"),
    ([1], "must be a text"), ("sr," * 200, "must be one of sr, sc"), (["sr"] * 50, "must be a text"),
])
def test_a_bad_dicom_out_option_is_refused_naming_it(value, words):
    with pytest.raises(DicomOutError, match=words) as info:
        parse_dicom_out(value)
    assert info.value.status == 400 and len(str(info.value)) < 300


def sr_of(answer) -> pydicom.Dataset:
    assert answer.status == 200, answer.body
    body = answer.body
    if "dicom" in body:
        return from_part10(base64.b64decode(body["dicom"]["sr"]))
    (out,) = [o for o in body["outputs"] if o["name"] == "dicom_sr"]
    assert out["shape"] == [1]
    return from_part10(base64.b64decode(out["data"][0]))


def test_every_way_of_asking_returns_a_report_of_the_answer(served, chest):
    """A JSON field, a form field (or query parameter), a gRPC input, a v2 parameter and a v2
    option input each get a Structured Report that references the source and says what the
    plain answer says; a request that does not ask gets none, and its answer is unchanged."""
    items = [
        {"body": json.dumps({"image": b64(chest), "dicom_out": "sr"}).encode()},
        {"data": chest, "dicom_out": b"sr"},  # a form field, a query parameter, a gRPC input
        {"body": v2_body(chest, {"dicom_out": "sr"})},
        {"body": v2_body(chest, option_input="sr")},
        {"body": chest},
    ]
    answers = answer_batch(served, items)
    plain = answers[-1]
    assert plain.status == 200 and "dicom" not in plain.body
    source = pydicom.dcmread(io.BytesIO(chest), stop_before_pixels=True)
    for answer in answers[:-1]:
        sr = sr_of(answer)
        got = read_report(sr)
        assert got["prediction"] == plain.body["prediction"]
        assert got["probabilities"] == pytest.approx(plain.body["probabilities"], abs=1e-6)
        assert got["model_name"] == served.name and got["model_version"] == "7"
        assert got["artifact_sha256"] == served.artifact_sha256
        assert sr.StudyInstanceUID == source.StudyInstanceUID
        assert sr.SeriesInstanceUID != source.SeriesInstanceUID
        assert sr.PatientID == source.PatientID
        ref = sr.CurrentRequestedProcedureEvidenceSequence[0]
        assert ref.StudyInstanceUID == source.StudyInstanceUID
        series = ref.ReferencedSeriesSequence[0]
        assert series.SeriesInstanceUID == source.SeriesInstanceUID
        assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    # the same input and model give the same report, whatever carried the request
    assert len({sr_of(a).SOPInstanceUID for a in answers[:-1]}) == 1


def test_dicom_out_for_an_image_that_is_not_dicom_is_refused_alone(served, chest):
    items = [{"data": png(), "dicom_out": "sr"},
             {"body": v2_body(png(), {"dicom_out": "sr"})},
             {"data": chest, "dicom_out": "pdf"},
             {"data": chest, "dicom_out": "sr"}]
    answers = answer_batch(served, items)
    assert [a.status for a in answers] == [400, 400, 400, 200]
    assert "dicom_out needs DICOM images; image 0 is not a DICOM file" in answers[0].reason
    assert "dicom_out needs DICOM images" in answers[1].reason
    assert "asks for 'pdf'" in answers[2].reason
    assert read_report(sr_of(answers[3]))["prediction"] in served.class_names


def test_a_dicom_without_the_uids_a_report_references_is_422_naming_it(served, chest):
    ds = pydicom.dcmread(io.BytesIO(chest))
    del ds.SeriesInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf)
    answers = answer_batch(served, [{"data": buf.getvalue(), "dicom_out": "sr"},
                                    {"data": buf.getvalue()}])
    assert answers[0].status == 422
    assert "SeriesInstanceUID is missing" in answers[0].reason
    assert answers[1].status == 200  # the same image, not asking for a report, is answered


def test_a_secondary_capture_of_the_overlay_comes_with_its_report(served, chest):
    if not served.explainer.available:
        pytest.skip("the tiny export carries no eager weights")
    (answer,) = answer_batch(served, [{"data": chest, "dicom_out": "sr,sc"}])
    assert answer.status == 200, answer.body
    objects = {k: from_part10(base64.b64decode(v)) for k, v in answer.body["dicom"].items()}
    assert set(objects) == {"sr", "sc"}
    sc = objects["sc"]
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert sc.StudyInstanceUID == objects["sr"].StudyInstanceUID
    assert sc.SOPInstanceUID != objects["sr"].SOPInstanceUID
    side = served.spec.resize  # the overlay is drawn on the model's input
    assert sc.pixel_array.shape == (side, side, 3)
    assert "explanation" not in answer.body  # made for the capture only: not sent twice
    (both,) = answer_batch(served, [{"data": chest, "dicom_out": "sc", "explain": "true"}])
    assert both.status == 200 and both.body["explanation"]["image_png_base64"]
    assert set(both.body["dicom"]) == {"sc"}


def test_more_images_than_results_are_made_for_is_413_alone(served, chest):
    from flannel.benchmarks.decode_inputs import dicom_dataset, dicom_file, ramp
    from flannel.handlers.dicom_out import MAX_IMAGES

    small = dicom_file(dicom_dataset(ramp(64)))
    many = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES",
                                   "shape": [MAX_IMAGES + 1],
                                   "data": [b64(small)] * (MAX_IMAGES + 1)}],
                       "parameters": {"dicom_out": "sr"}}).encode()
    answers = answer_batch(served, [{"body": many}, {"data": chest, "dicom_out": "sr"}])
    assert answers[0].status == 413
    assert f"at most {MAX_IMAGES} images a request, got {MAX_IMAGES + 1}" in answers[0].reason
    assert answers[1].status == 200 and "sr" in answers[1].body["dicom"]


def test_a_failure_making_one_report_is_that_request_s_500(served, chest, monkeypatch):
    from flannel.handlers import dicom_out

    def broken(*args, **kwargs):
        raise RuntimeError("report writer failed")

    monkeypatch.setattr(dicom_out, "dicom_objects", broken)
    answers = answer_batch(served, [{"data": chest, "dicom_out": "sr"}, {"data": chest}])
    assert answers[0].status == 500 and "error id" in answers[0].reason
    assert answers[1].status == 200


def test_served_model_records_the_sha256_of_the_artifact_it_runs(served, exported_tiny_run):
    from flannel.artifacts import sha256_file
    from flannel.backends import backend_spec

    export = exported_tiny_run / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    entry = manifest["artifacts"][backend_spec(None).artifact]
    assert served.artifact_sha256 == entry["sha256"] == sha256_file(export / entry["path"])
