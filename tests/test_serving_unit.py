"""Serving functions and the TorchServe handler class, without a server.

    .venv/bin/pytest tests/test_serving_unit.py -q
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
from dataclasses import replace
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flannel.data.records import read_manifest
from flannel.data.torch_dataset import XrayDataset
from flannel.artifacts import LEARNER, ManifestError
from flannel.checkpoint import load_checkpoint
from flannel.graphs import learner_graph
from flannel import backends
from flannel.handlers import serving
from flannel.backends import make_session
from flannel.handlers.serving import BadRequest, load_served_model, payload_bytes
from flannel.preprocess import load_tensor


def png_bytes(side: int = 64, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def dicom_without_pixels() -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR image storage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def export_dir(exported_tiny_run) -> Path:
    return exported_tiny_run / "export"


@pytest.fixture(scope="module")
def served(export_dir):
    return load_served_model(export_dir, {"intra_op_threads": 1}, version="7")


def offline_probs(export_dir: Path, spec, images: list[bytes]) -> np.ndarray:
    """Reference: the shared spec's load_tensor and a plain ORT session, outside serving.py."""
    batch = torch.stack([load_tensor(b, spec) for b in images]).numpy()
    session = make_session(export_dir / "model.onnx", intra_op_threads=1)
    return session.run([LEARNER.decision_output], {LEARNER.input_names[0]: batch})[0]


# --- request payloads ---------------------------------------------------------------------------

def test_payload_forms_all_give_the_same_bytes():
    raw = png_bytes()
    b64 = base64.b64encode(raw).decode()
    forms = [raw, bytearray(raw), {"body": raw}, {"data": bytearray(raw)}, {"file": raw},
             {"body": {"image": b64}}, {"body": json.dumps({"image": b64}).encode()},
             {"data": json.dumps({"image": b64})}, {"image": b64}]
    for form in forms:
        assert payload_bytes(form) == raw, form if not isinstance(form, (bytes, bytearray)) else "raw"


@pytest.mark.parametrize("item, words", [
    ({"body": {"image": "!!not base64!!"}}, "base64"),
    ({"body": b'{"image": '}, "not valid JSON"),
    ({"body": {"picture": "abc"}}, '"image"'),
    ({"body": {"image": 12}}, "base64 string"),
    ({"body": 12}, "unsupported payload type"),
    ({}, "no payload"),
    ({"body": None, "data": None}, "no payload"),
])
def test_malformed_requests_are_400_with_a_reason(item, words):
    with pytest.raises(BadRequest, match=words) as err:
        payload_bytes(item)
    assert err.value.status == 400


# --- one spec: the served input, cropped and normalised in the graph == the training tensor -----

def _training_tensors(run_dir: Path, spec_change: dict | None = None):
    """Validation rows, the learner graph's preprocessing, and the training-evaluation dataset."""
    ckpt = load_checkpoint(run_dir / "best.pt")
    spec = dataclasses.replace(ckpt.preprocess, **(spec_change or {}))
    config = json.loads((run_dir / "config.json").read_text())
    rows = read_manifest(config["manifest"], split="val")
    assert rows, "the tiny run has validation images"
    graph = learner_graph(dataclasses.replace(ckpt, preprocess=spec))
    return rows, graph.preprocess, XrayDataset(rows, ckpt.class_names, spec)


def test_server_tensor_becomes_the_training_evaluation_tensor(exported_tiny_run, served):
    rows, in_graph, dataset = _training_tensors(exported_tiny_run)
    for i, row in enumerate(rows):
        served_tensor = serving.tensor_from_bytes(Path(row.path).read_bytes(), served.spec)
        assert served_tensor.shape == (1, 73, 73) and 0 <= served_tensor.min() <= 1
        assert torch.equal(in_graph(served_tensor[None])[0], dataset[i][0]), row.path
        json_item = {"body": {"image": base64.b64encode(Path(row.path).read_bytes()).decode()}}
        from_json = serving.prepare_item(json_item, served.spec)[None]
        assert torch.equal(in_graph(from_json)[0], dataset[i][0])


def test_equalised_spec_gives_the_server_the_training_tensor(exported_tiny_run, served):
    rows, in_graph, dataset = _training_tensors(exported_tiny_run, {"intensity": "equalize"})
    spec = dataclasses.replace(served.spec, intensity="equalize")
    for i, row in enumerate(rows[:3]):
        data = Path(row.path).read_bytes()
        served_tensor = serving.tensor_from_bytes(data, spec)
        assert torch.equal(in_graph(served_tensor[None])[0], dataset[i][0]), row.path
        assert not torch.equal(served_tensor, serving.tensor_from_bytes(data, served.spec))


# --- loading ------------------------------------------------------------------------------------

def test_load_reads_spec_classes_and_threads(served, export_dir):
    manifest = json.loads((export_dir / "manifest.json").read_text())
    assert served.name == manifest["model_name"]
    assert served.class_names == manifest["class_names"]
    assert served.spec.to_dict() == manifest["input"]["spec"]
    assert served.kind == "learner" and served.member_names == ("resnet18",)
    assert served.weights_output is None
    assert served.version == "7"
    assert [o.name for o in served.backend.session.get_outputs()] == list(LEARNER.output_names)
    assert served.ood_output == "ood_score" and served.policy is not None
    assert served.backend.name == "ort-fp32" and served.backend.intra_op_threads == 1
    assert served.backend.output_names == list(LEARNER.served_outputs)  # probabilities, ood_score


def test_tampered_artifact_is_refused_before_loading(export_dir, tmp_path, monkeypatch):
    copy = shutil.copytree(export_dir, tmp_path / "export")
    spec = json.loads((copy / "input_spec.json").read_text())
    spec["crop"] = spec["resize"] = spec["crop"] - 8
    (copy / "input_spec.json").write_text(json.dumps(spec))

    def must_not_load(*args, **kwargs):
        raise AssertionError("a session was created for a tampered export")

    monkeypatch.setattr(backends, "make_session", must_not_load)
    with pytest.raises(ManifestError, match="input_spec.*sha256"):
        load_served_model(copy)


def test_threads_are_decided_by_the_worker_from_its_usable_cores(monkeypatch):
    from flannel import cpus

    monkeypatch.setattr(cpus, "affinity_cores", lambda: 4)
    monkeypatch.setattr(cpus, "quota_cores", lambda root=None: None)
    assert [serving.resolve_threads({"workers": w}) for w in (1, 2, 3, 8)] == [4, 2, 1, 1]
    assert serving.resolve_threads({"workers": 2, "intra_op_threads": 3}) == 3  # the user's
    monkeypatch.setattr(cpus, "quota_cores", lambda root=None: 1.5)  # docker --cpus 1.5
    assert serving.resolve_threads({"workers": 1}) == 2


def test_unknown_backend_is_refused_naming_the_known_ones(export_dir):
    with pytest.raises(backends.BackendError, match=r"unknown backend 'ort-int9'.*ort-fp32"):
        load_served_model(export_dir, {"backend": "ort-int9"})
    # archives written before backends had names say "onnxruntime"
    assert backends.backend_spec("onnxruntime").name == "ort-fp32"


# --- batches ------------------------------------------------------------------------------------

def test_batch_answers_each_item_in_order(served, export_dir):
    good = [png_bytes(64, seed=s) for s in range(3)]
    too_large = dataclasses.replace(served, max_pixels=80 * 80)
    items = [{"body": good[0]}, {"body": b"not an image at all"}, {"body": good[1]},
             {"body": b""}, {"body": dicom_without_pixels()},
             {"body": {"image": base64.b64encode(good[2]).decode()}}, {"body": {"image": "%%"}},
             {"body": png_bytes(96)}]
    answers = serving.answer_batch(too_large, items)
    assert [a.status for a in answers] == [200, 400, 200, 400, 415, 200, 400, 413]
    assert [a.phrase for a in answers if a.status != 200] == [
        "DecodeError", "EmptyInput", "UnsupportedImage", "BadRequest", "ImageTooLarge"]
    for a in answers:
        if a.status != 200:
            assert a.body["code"] == a.status and a.body["error"].startswith(a.phrase)
    assert "PixelData" in answers[4].body["error"]
    expected = offline_probs(export_dir, served.spec, good)
    for answer, probs in zip([answers[0], answers[2], answers[5]], expected):
        body = answer.body
        assert body["model"] == served.name and body["version"] == "7"
        got = np.array([body["probabilities"][c] for c in served.class_names])
        np.testing.assert_allclose(got, probs, atol=1e-6)
        assert body["prediction"] == served.class_names[int(np.argmax(probs))]
        assert abs(sum(body["probabilities"].values()) - 1.0) < 1e-5
        assert json.loads(answer.to_json()) == body


def test_batch_runs_good_items_as_one_inference(served, monkeypatch):
    calls = []
    real = served.backend.run
    monkeypatch.setattr(served.backend, "run", lambda batch: calls.append(len(batch)) or real(batch))
    serving.answer_batch(served, [png_bytes(seed=1), b"junk", png_bytes(seed=2), png_bytes(seed=3)])
    assert calls == [3]
    all_bad = serving.answer_batch(served, [b"junk", b""])
    assert calls == [3] and [a.status for a in all_bad] == [400, 400]


def test_items_prepared_on_threads_answer_exactly_as_one_by_one(served):
    """Concurrent decoding changes nothing: each answer equals the one the item gets alone, in
    order, with bad items refused in place."""
    items = [png_bytes(seed=s) for s in range(6)] + [b"junk"]
    alone = [serving.answer_batch(served, [item])[0] for item in items]
    pooled = replace(served, prepare_threads=3, _pool=None)
    together = serving.answer_batch(pooled, items[::-1])[::-1]
    assert [a.status for a in together] == [200] * 6 + [400]
    for a, b in zip(alone, together):
        assert a.status == b.status
        if a.status == 200:
            np.testing.assert_allclose(list(a.body["probabilities"].values()),
                                       list(b.body["probabilities"].values()), atol=1e-6)


def test_serving_pixel_limit_is_a_server_setting_not_the_spec(export_dir, monkeypatch):
    """The server's environment beats the archive's model-config.yaml, which beats the default;
    the exported spec (and so the pins) is untouched, and nonsense is refused by name."""
    from flannel.decode import DEFAULT_MAX_PIXELS

    monkeypatch.delenv(serving.MAX_PIXELS_ENV, raising=False)
    assert serving.serving_max_pixels({}) == DEFAULT_MAX_PIXELS
    assert serving.serving_max_pixels({"max_pixels": 4096}) == 4096
    assert serving.serving_max_pixels({"max_pixels": 4096}, {"FLANNEL_MAX_PIXELS": "900"}) == 900
    for bad in ("lots", "0"):
        with pytest.raises(ValueError, match="FLANNEL_MAX_PIXELS must be"):
            serving.serving_max_pixels({}, {"FLANNEL_MAX_PIXELS": bad})
    monkeypatch.setenv(serving.MAX_PIXELS_ENV, str(70 * 70))
    limited = load_served_model(export_dir, {"intra_op_threads": 1, "max_pixels": 10 ** 6})
    assert limited.max_pixels == 70 * 70 and limited.spec.max_pixels == DEFAULT_MAX_PIXELS
    answers = serving.answer_batch(limited, [png_bytes(64), png_bytes(72)])
    assert [a.status for a in answers] == [200, 413]
    assert "above the limit of 4900" in answers[1].body["error"]


def flat_png(side: int) -> bytes:
    """A worst case for memory: a few KB of PNG that decodes to side x side pixels."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 90).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@pytest.mark.slow
def test_a_batch_of_worst_case_images_holds_one_full_resolution_image_per_thread(served):
    """Eight 6000 x 6000 flat PNGs (tens of KB each, 144 MB each once decoded to float32): each
    item is resized right after decoding, so the batch's peak numpy memory stays near one
    decoded image per preparing thread instead of all eight."""
    import tracemalloc

    side = 6000
    items = [flat_png(side) for _ in range(8)]
    assert max(map(len, items)) < 200_000
    one_image = side * side * 4
    model = replace(served, prepare_threads=1, _pool=None)
    tracemalloc.start()
    try:
        answers = serving.answer_batch(model, items)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [a.status for a in answers] == [200] * 8
    assert peak < 2.5 * one_image, f"peak {peak / 2**20:.0f} MB for {one_image / 2**20:.0f} MB images"


# --- the TorchServe handler class with TorchServe's own Context ---------------------------------

class MetricsRecorder:
    """Stands in for TorchServe's metric cache: records (kind, name, value, dimensions)."""

    def __init__(self):
        self.calls = []

    def _add(self, kind, name, value, dimensions):
        self.calls.append((kind, name, value, {d.name: d.value for d in dimensions or []}))

    def add_counter(self, name, value, idx=None, dimensions=None):
        self._add("counter", name, value, dimensions)

    def add_metric(self, name, value, unit, idx=None, dimensions=None, metric_type=None):
        self._add(metric_type.value, name, value, dimensions)

    def add_time(self, name, value, idx=None, unit="ms", dimensions=None, metric_type=None):
        self._add(metric_type.value, name, value, dimensions)


def make_context(model_dir: Path, n: int):
    from ts.context import Context, RequestProcessor

    ctx = Context("resnet18", str(model_dir), {"model": {"modelVersion": "2.0"}}, n, None,
                  "0.12.0", metrics=MetricsRecorder(),
                  model_yaml_config={"handler": {"intra_op_threads": 1}})
    ctx.request_processor = [RequestProcessor({}) for _ in range(n)]
    return ctx


@pytest.fixture(scope="module")
def unpacked_archive(exported_tiny_run, tmp_path_factory) -> tuple[Path, Path]:
    """(folder, trust list): a version 2.0 archive unpacked as TorchServe unpacks it, and the
    trust list `flannel archive` wrote for it."""
    import zipfile

    from flannel.export.parity import run_parity
    from flannel.handlers.archive import ArchiveSettings, build_archive

    root = tmp_path_factory.mktemp("handler")
    run = shutil.copytree(exported_tiny_run, root / "run")
    run_parity(run)
    mar = build_archive(run, root / "store", version="2.0",
                        settings=ArchiveSettings(intra_op_threads=1))
    with zipfile.ZipFile(mar) as zf:
        zf.extractall(root / "model")
    return root / "model", root / "trusted_archives.json"


def test_handler_sets_per_item_status_and_json(unpacked_archive, monkeypatch):
    from flannel.handlers.image_classifier import ImageClassifier
    from flannel.handlers.trust import TRUST_LIST_ENV

    model_dir, trust_list = unpacked_archive
    monkeypatch.setenv(TRUST_LIST_ENV, str(trust_list))  # as `flannel serve start` sets it
    handler = ImageClassifier()
    handler.initialize(make_context(model_dir, 1))
    assert handler.initialized and handler.served.version == "2.0"
    ctx = make_context(model_dir, 3)
    out = handler.handle([{"body": png_bytes()}, {"body": b"junk"}, {"data": bytearray(png_bytes())}], ctx)
    assert len(out) == 3 and all(isinstance(o, str) for o in out)
    assert [ctx.get_response_status(i)[0] for i in range(3)] == [200, 400, 200]
    assert ctx.get_response_status(1)[1] == "DecodeError"
    assert all(ctx.get_response_content_type(i) == "application/json" for i in range(3))
    assert json.loads(out[0]) == json.loads(out[2])
    assert json.loads(out[1])["code"] == 400
    calls = {(kind, name, tuple(dims.items())): value for kind, name, value, dims in ctx.metrics.calls}
    assert calls[("counter", "FlannelItems", (("Status", "200"),))] == 2
    assert calls[("counter", "FlannelItems", (("Status", "400"),))] == 1
    assert calls[("counter", "FlannelItemsRefused", (("Reason", "DecodeError"),))] == 1
    assert calls[("histogram", "FlannelBatchSize", ())] == 3
    assert calls[("histogram", "FlannelInferenceMs", ())] > 0
    assert calls[("histogram", "FlannelDecodeMs", ())] > 0
    assert calls[("histogram", "FlannelPreprocessMs", ())] > 0


# --- pins: the handler refuses to serve through preprocessing code other than the exporter's ----

def test_changed_preprocessing_code_is_refused_naming_both_digests(export_dir, monkeypatch):
    from flannel import pins

    real = pins.reference_tensor
    monkeypatch.setattr(pins, "reference_tensor", lambda spec: real(spec) * 0.98)
    recorded = json.loads((export_dir / "manifest.json").read_text())["pins"]
    with pytest.raises(pins.PinMismatch) as err:
        load_served_model(export_dir)
    message = str(err.value)
    assert recorded["reference_tensor_sha256"] in message and "refusing to serve" in message
    computed = pins.tensor_digest(real(served_spec(export_dir)) * 0.98)
    assert computed in message


def test_float_rounding_of_the_reference_tensor_is_tolerated(export_dir, monkeypatch):
    from flannel import pins

    real = pins.reference_tensor
    monkeypatch.setattr(pins, "reference_tensor", lambda spec: real(spec) + 1e-7)
    loaded = load_served_model(export_dir)
    assert loaded.kind == "learner"
    result = pins.check_pins(json.loads((export_dir / "manifest.json").read_text())["pins"],
                             loaded.spec, np.load(export_dir / "reference_input.npy"))
    assert not result.exact and 0 < result.max_abs_diff <= pins.REFERENCE_ATOL


def test_a_swapped_reference_tensor_is_refused(export_dir, tmp_path):
    from flannel.artifacts import artifact_entry, read_manifest, write_manifest
    from flannel import pins

    copy = shutil.copytree(export_dir, tmp_path / "export")
    np.save(copy / "reference_input.npy", np.zeros((1, 73, 73), dtype=np.float32))
    manifest = read_manifest(copy)
    manifest["artifacts"]["reference_input"] = artifact_entry(copy, copy / "reference_input.npy")
    write_manifest(copy, manifest)  # consistently re-signed: only the pin can catch it
    with pytest.raises(pins.PinMismatch, match="shipped reference tensor"):
        load_served_model(copy)


def served_spec(export_dir: Path):
    from flannel.preprocess import PreprocessSpec
    return PreprocessSpec.load(export_dir / "input_spec.json")


def test_an_expired_key_without_an_api_key_is_reported_with_its_time(tmp_path):
    from flannel.handlers.keys import TokenExpired, current_token, token_expiry
    from flannel.handlers.ts_config import server_info

    config = tmp_path / "config.properties"
    config.write_text("inference_address=http://127.0.0.1:9\n")
    info = server_info(config)
    with pytest.raises(Exception, match="no .*key_file.json: is TorchServe running"):
        current_token(info)
    keys = {"inference": {"key": "abc", "expiration time": "2030-01-01T00:00:00.5Z"},
            "management": {"key": "def", "expiration time": "2030-01-01T00:00:00Z"}}
    info.key_file.write_text(json.dumps(keys))
    assert token_expiry(info.key_file).isoformat() == "2030-01-01T00:00:00.500000+00:00"
    assert current_token(info) == "abc"  # not yet expired: read as is, no server needed
    import datetime as dt
    later = dt.datetime(2030, 1, 1, 0, 0, 30, tzinfo=dt.timezone.utc)
    with pytest.raises(TokenExpired, match=r"expired at 2030-01-01T00:00:00.5.*no API key.*"
                                           r"/token\?type=inference"):
        current_token(info, now=later)
