"""A real TorchServe on loopback serving tiny archives: HTTP, gRPC, tokens, batching, metrics.

    .venv/bin/pytest tests/test_serving_integration.py -q

One server per module (start-up takes ~15 s) with two models: a tiny learner run and a tiny
ensemble of three learners, each through export_onnx -> run_parity -> build_archive; a copy of
the repo's config.properties on free ports -> start_server. The last
test stops it and checks that no TorchServe process is left; teardown stops it in any case.
"""
from __future__ import annotations

import base64

import json

import re
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image
import pytest
import requests
import torch
from flannel.artifacts import FP32, LEARNER
from flannel.handlers import grpc_stubs
from flannel import hardware
from flannel.handlers.archive import ArchiveSettings, build_archive
from flannel.handlers.client import (NO_RETRY, Client, RetryPolicy, predict_grpc, predict_http,
                                     predict_v2, predict_v2_grpc)
from flannel.handlers.keys import read_tokens
from flannel.handlers.management import worker_pids
from flannel.handlers.ts_config import loopback_config
from flannel.handlers.ts_process import server_status, start_server, stop_server
from flannel.backends import make_session
from run_fixtures import add_tiny_external_evaluation, make_archivable_run
from test_dicomweb import orthanc, pacs_corpus  # noqa: F401 (fixtures: a private Orthanc)

from flannel.cli import main as flannel_main
from flannel.preprocess import PreprocessSpec, load_tensor
from flannel.samples import real_chest_dicom

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("java") is None,
                                 reason="TorchServe needs Java 17 and `java` is not on PATH")]

REPO = Path(__file__).resolve().parents[1]
MODEL = "resnet18"
ENSEMBLE_MODEL = "ensemble"
INT8_MODEL = "resnet18_int8"
COMPILED_MODEL = "resnet18_compiled"
# The compiled backend this host can serve: bf16 where the CPU has native bf16, else fp32.
COMPILED_PRECISION = "fp32" if hardware.bf16_problem() else "bf16"
# Served vs offline ONNX Runtime on the same file: same session options and input tensor, so only
# the JSON float round-trip differs; the learner spec's fp32 tolerance bounds it.
ATOL = FP32.atol
# Long enough that requests sent together are batched even on 2 busy cores; each lone request
# pays it once, which keeps this module well under its time budget.
MAX_BATCH_DELAY_MS = 1000
START_TIMEOUT_S = 150


def write_test_config(dest: Path, store: Path) -> Path:
    """The repo's config.properties with free loopback ports and the test model store."""
    return loopback_config(dest, store, REPO / "config.properties")


def png_file(path: Path, seed: int, side: int = 72) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def served_ensemble(tiny_ensemble, tmp_path_factory):
    """A private copy of the tiny ensemble folder, parity-checked (archives need a passed gate)."""
    from flannel.export.parity import run_parity

    copy = shutil.copytree(tiny_ensemble.parent, tmp_path_factory.mktemp("ens") / "copy")
    run_parity(copy / "ensemble")
    add_tiny_external_evaluation(copy / "ensemble")
    return copy / "ensemble"


@pytest.fixture(scope="module")
def server(tmp_path_factory, served_ensemble):
    """Yields (ServerInfo, run_dir, files dir); always stops the server."""
    root = tmp_path_factory.mktemp("srv")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(grpc_stubs.CACHE_ENV, str(root / "grpc"))
        run = make_archivable_run(root, arch=MODEL, crop=64)
        settings = ArchiveSettings(batch_size=8, max_batch_delay_ms=MAX_BATCH_DELAY_MS, workers=1)
        build_archive(run, root / "store", settings=settings)
        build_archive(served_ensemble, root / "store", settings=settings)
        from dataclasses import replace

        from flannel.export.int8 import Int8Config, export_int8
        assert export_int8(run, Int8Config(calibration_images=6, batch_size=3))["passed"]
        build_archive(run, root / "store", model_name=INT8_MODEL,
                      settings=replace(settings, backend="ort-int8"))
        from flannel.export.compiled import TARGETS, export_compiled
        assert export_compiled(run, COMPILED_PRECISION, max_batch=8)["passed"]
        build_archive(run, root / "store", model_name=COMPILED_MODEL, settings=replace(
            settings, backend=TARGETS[COMPILED_PRECISION].backend))
        config = write_test_config(root / "config.properties", root / "store")
        try:
            info = start_server(config, timeout=START_TIMEOUT_S)
            yield info, run, root
        finally:
            stop_server(config)


class Offline:
    """Offline ORT answers for a file, with the export's spec and policy (not the server's code
    path): ``offline(path)`` the probabilities, ``offline.fields(path)`` the policy's fields."""

    def __init__(self, export: Path) -> None:
        from flannel.handlers.answer_fields import ServedPolicy

        self.spec = PreprocessSpec.load(export / "input_spec.json")
        self.session = make_session(export / "model.onnx", intra_op_threads=1)
        manifest = json.loads((export / "manifest.json").read_text())
        self.policy = ServedPolicy.from_json((export / "answer_policy.json").read_text(),
                                             manifest["class_names"])

    def outputs(self, path: Path) -> list[np.ndarray]:
        batch = torch.stack([load_tensor(path, self.spec)]).numpy()
        return self.session.run([LEARNER.decision_output, "ood_score"],
                                {LEARNER.input_names[0]: batch})

    def __call__(self, path: Path) -> np.ndarray:
        return self.outputs(path)[0][0]

    def fields(self, path: Path) -> dict:
        return self.policy.fields(*self.outputs(path))[0]


@pytest.fixture(scope="module")
def offline(server):
    _, run, _ = server
    return Offline(run / "export")


@pytest.fixture(scope="module")
def card_sha256(server):
    """The sha256 of the model card inside the served archive."""
    import hashlib
    import zipfile

    _, _, root = server
    with zipfile.ZipFile(root / "store" / f"{MODEL}.mar") as mar:
        return hashlib.sha256(mar.read("model_card.json")).hexdigest()


def token(info) -> str:
    return read_tokens(info.key_file)["inference"]


# Every answer's keys; "warnings" is added when there is a reason to doubt the input.
ANSWER_KEYS = {"model", "version", "prediction", "probabilities", "decision", "prediction_set",
               "refer", "refer_reasons", "ood_score", "model_card_sha256"}


def assert_fields_match(body: dict, fields: dict) -> None:
    """The answer policy's fields equal their offline computation."""
    for key in ("decision", "prediction_set", "refer", "refer_reasons"):
        assert body[key] == fields[key], key
    assert body["ood_score"] == pytest.approx(fields["ood_score"], rel=1e-4, abs=1e-6)
    if fields["ood_score"] > 1.0:
        assert any("not like the chest radiographs" in w for w in body["warnings"])


def assert_matches_offline(result, offline_probs, class_names, fields: dict | None = None):
    assert result.status == 200, result.text
    body = result.body
    assert set(body) - {"warnings"} == ANSWER_KEYS
    if fields is not None:
        assert_fields_match(body, fields)
    assert body["model"] == MODEL and list(body["probabilities"]) == class_names
    got = np.array([body["probabilities"][c] for c in class_names])
    np.testing.assert_allclose(got, offline_probs, atol=ATOL)
    assert abs(got.sum() - 1.0) < ATOL
    assert body["prediction"] == class_names[int(np.argmax(offline_probs))]


@pytest.fixture(scope="module")
def pngs(server):
    _, _, root = server
    (root / "files").mkdir(exist_ok=True)
    return [png_file(root / "files" / f"img{i}.png", seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def class_names(server):
    _, run, _ = server
    return json.loads((run / "export" / "manifest.json").read_text())["class_names"]


def test_server_ready_and_status(server):
    info, _, _ = server
    assert info.models == {MODEL: 1, ENSEMBLE_MODEL: 1, INT8_MODEL: 1, COMPILED_MODEL: 1}
    status = server_status(info.config)
    assert status is not None and status.pid == info.pid and status.models == info.models
    assert set(read_tokens(info.key_file)) == {"inference", "management", "api"}
    # Created under TorchServe's umask 077: never readable by others, not even before its chmod.
    assert key_file_mode(info) == 0o600


def test_probe_passes_with_token_authorization_on(server):
    """TorchServe 0.12 checks the key on /ping too, so a bare GET /ping is refused; the probe of
    the Dockerfile's HEALTHCHECK (`flannel serve probe`) sends the inference key and passes."""
    info, _, _ = server
    assert requests.get(f"{info.inference_url}/ping", timeout=10).status_code == 400
    assert flannel_main(["serve", "probe", "--config", str(info.config)]) == 0


def key_file_mode(info) -> int:
    import stat

    return stat.S_IMODE(info.key_file.stat().st_mode)


def test_http_predictions_equal_offline(server, pngs, offline, class_names, card_sha256):
    info, _, _ = server
    results = predict_http(pngs, MODEL, url=info.inference_url, token=token(info))
    assert [r.file for r in results] == [str(p) for p in pngs]
    for result, path in zip(results, pngs):
        assert_matches_offline(result, offline(path), class_names, offline.fields(path))
        assert result.body["model_card_sha256"] == card_sha256


def test_grpc_predictions_equal_offline(server, pngs, offline, class_names, card_sha256):
    info, _, _ = server
    results = predict_grpc(pngs, MODEL, target=info.grpc_inference, token=token(info))
    for result, path in zip(results, pngs):
        assert_matches_offline(result, offline(path), class_names, offline.fields(path))
        assert result.body["model_card_sha256"] == card_sha256


def test_open_inference_protocol_rest_and_grpc_answers_equal_offline(server, pngs, offline,
                                                                     class_names, card_sha256):
    """v2 over REST and gRPC: the same probabilities as offline ONNX Runtime, in v2 form."""
    info, _, _ = server
    for fn, where in ((predict_v2, {"url": info.inference_url}),
                      (predict_v2_grpc, {"target": info.grpc_inference})):
        results = fn(pngs, MODEL, token=token(info), **where)
        for result, path in zip(results, pngs):
            assert result.status == 200, result.text
            outputs = {o["name"]: o for o in result.body["outputs"]}
            assert result.body["model_name"] == MODEL and result.body["id"] == path.name
            assert outputs["probabilities"]["datatype"] == "FP32"
            assert outputs["probabilities"]["shape"] == [1, len(class_names)]
            assert outputs["classes"]["data"] == class_names
            np.testing.assert_allclose(outputs["probabilities"]["data"], offline(path), atol=ATOL)
            assert result.prediction == class_names[int(np.argmax(offline(path)))]
            want = offline.fields(path)
            assert outputs["decision"]["data"] == [want["decision"]]
            assert outputs["refer"]["data"] == [want["refer"]]
            assert outputs["prediction_set"]["shape"] == [1, len(class_names)]
            assert [c for c, m in zip(class_names, outputs["prediction_set"]["data"]) if m] == \
                want["prediction_set"]
            np.testing.assert_allclose(outputs["ood_score"]["data"], [want["ood_score"]],
                                       rtol=1e-4)
            assert outputs["model_card_sha256"]["data"] == [card_sha256]
            for name in ("decision", "prediction_set", "refer"):  # the client reads them back
                assert result.policy_field(name) == want[name]
            assert f"decision {want['decision']}" in result.summary()
    headers = {"Authorization": f"Bearer {token(info)}"}
    for route, key in (("/v2/health/live", "live"), ("/v2/health/ready", "ready")):
        r = requests.get(info.inference_url + route, headers=headers, timeout=10)
        assert r.status_code == 200 and r.json()[key] is True, (route, r.text)


def test_open_inference_protocol_refusals_name_the_expected_input(server, pngs, tmp_path):
    info, _, _ = server
    pids = worker_pids(info, MODEL)
    url = f"{info.inference_url}/v2/models/{MODEL}/infer"
    headers = {"Authorization": f"Bearer {token(info)}"}
    side = PreprocessSpec.load(server[1] / "export" / "input_spec.json").resize
    wrong = [({"inputs": [{"name": "x", "datatype": "FP16", "shape": [1], "data": [0]}]},
              "datatype 'FP16' is not accepted; expected one input tensor: BYTES"),
             ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, side, side],
                           "data": [0.5] * (3 * side * side)}]},
              rf"shape \[1, 3, {side}, {side}\]; expected \[N, 1, {side}, {side}\]"),
             ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1, side, side],
                           "data": [0.5] * 10}]}, "needs .* values"),
             ({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["%%"]}]},
              "not valid base64")]
    for body, words in wrong:
        r = requests.post(url, json=body, headers=headers, timeout=60)
        assert r.status_code == 400 and re.search(words, r.json()["error"]), r.text
    fp32 = torch.stack([load_tensor(p, PreprocessSpec.load(server[1] / "export" /
                                                           "input_spec.json")) for p in pngs])
    r = requests.post(url, headers=headers, timeout=60, json={"inputs": [{
        "name": "image", "datatype": "FP32", "shape": list(fp32.shape),
        "data": fp32.numpy().ravel().tolist()}]})
    (by_file,) = predict_v2([pngs[0]], MODEL, url=info.inference_url, token=token(info))
    got = {o["name"]: o for o in r.json()["outputs"]}
    assert r.status_code == 200 and got["probabilities"]["shape"] == [len(pngs), 3]
    np.testing.assert_allclose(got["probabilities"]["data"][:3],
                               by_file.body["outputs"][0]["data"], atol=1e-6)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00junk")
    (refused,) = predict_v2_grpc([junk], MODEL, target=info.grpc_inference, token=token(info))
    assert refused.status == 400 and "DecodeError" in refused.summary()
    assert worker_pids(info, MODEL) == pids


def _overlay_size(png: bytes) -> tuple[int, int]:
    import io

    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.mode == "RGB"
    return image.size


def test_explanations_route_and_explain_on_a_prediction(server, pngs, tmp_path, capsys):
    """/explanations and explain=true (JSON body, gRPC input field, v2 parameter) answer the
    served prediction plus a Grad-CAM overlay of the served input's size."""
    info, run, _ = server
    side = PreprocessSpec.load(run / "export" / "input_spec.json").resize
    client = Client.from_config(info.config, model=MODEL)
    (plain,) = client.predict(pngs[:1])
    (explained,) = client.explain(pngs[:1])
    assert explained.status == 200, explained.text
    assert _overlay_size(explained.overlay_png) == (side, side)
    e = explained.body.pop("explanation")
    assert explained.body == plain.body and e["target"] == plain.prediction
    (other,) = client.explain(pngs[:1], target="Normal")
    assert other.body["explanation"]["target"] == "Normal"
    (bad,) = client.explain(pngs[:1], target="Flu")
    assert bad.status == 400 and "unknown target class 'Flu'" in bad.body["error"]

    stubs = grpc_stubs.load_stubs()
    import grpc
    with grpc.insecure_channel(info.grpc_inference) as channel:
        stub = stubs["inference_pb2_grpc"].InferenceAPIsServiceStub(channel)
        reply = stub.Predictions(stubs["inference_pb2"].PredictionsRequest(
            model_name=MODEL, input={"data": pngs[0].read_bytes(), "explain": b"true"}),
            metadata=[("authorization", f"Bearer {token(info)}")], timeout=60)
    assert json.loads(reply.prediction)["explanation"]["target"] == plain.prediction

    (v2,) = predict_v2(pngs[:1], MODEL, url=info.inference_url, token=token(info),
                       parameters={"explain": True})
    assert _overlay_size(v2.overlay_png) == (side, side)

    code = flannel_main(["predict", str(pngs[1]), "--model", ENSEMBLE_MODEL, "--config",
                         str(info.config), "--explain", str(tmp_path / "overlays")])
    out = capsys.readouterr().out
    assert code == 0 and "overlay" in out, out
    (written,) = (tmp_path / "overlays").glob("*.gradcam.png")
    assert written.name == f"{pngs[1].name}.gradcam.png"
    ensemble = Client.from_config(info.config, model=ENSEMBLE_MODEL)
    (one,) = ensemble.explain(pngs[1:2], learner="resnet18")
    assert one.body["explanation"]["explained"] == "resnet18"


def test_explanations_are_bounded_per_batch_and_predictions_still_run(server, pngs):
    """Three explanations arriving with predictions in one batch: one is explained, the others
    get 429 at once, and every prediction is answered."""
    from concurrent.futures import ThreadPoolExecutor

    info, _, _ = server
    headers = {"Authorization": f"Bearer {token(info)}"}

    def explain(_):
        return requests.post(f"{info.inference_url}/explanations/{MODEL}",
                             data=pngs[0].read_bytes(), headers=headers, timeout=60)

    def predict(_):
        return requests.post(f"{info.inference_url}/predictions/{MODEL}",
                             data=pngs[1].read_bytes(), headers=headers, timeout=60)

    with ThreadPoolExecutor(6) as pool:
        asked = [pool.submit(explain, i) for i in range(3)]
        plain = [pool.submit(predict, i) for i in range(3)]
        asked, plain = [f.result() for f in asked], [f.result() for f in plain]
    codes = sorted(r.status_code for r in asked)
    assert codes[0] == 200 and set(codes) <= {200, 429} and 429 in codes, codes
    for r in asked:
        if r.status_code == 429:
            assert "retry" in r.json()["error"]
    assert all(r.status_code == 200 for r in plain)


def test_real_radiograph_dicom(server, offline, class_names):
    dcm = real_chest_dicom()
    if dcm is None:
        pytest.skip("pydicom-data (RG1_UNCR.dcm) is not installed (test extra)")
    info, _, _ = server
    (result,) = predict_http([dcm], MODEL, url=info.inference_url, token=token(info))
    assert_matches_offline(result, offline(dcm), class_names)


# How far a lossy copy of the real radiograph may move a served probability of the tiny model.
# Measured (Intel Xeon, every protocol alike): JPEG Baseline 2.6e-3 (its 15-bit values are first
# requantised to 8 bits), JPEG 2000 at 10:1 2.9e-4, 12-bit JPEG 1.5e-4, HTJ2K 6.4e-5, JPEG-LS
# near-lossless 1.5e-5; the lossless copies 0. A wrong bit depth, sign or photometric inversion
# moves them by 0.05 or more.
LOSSY_PROBABILITY_ATOL = 5e-3
PROTOCOL_CLIENTS = (("http", predict_http, "url"), ("grpc", predict_grpc, "target"),
                    ("v2", predict_v2, "url"), ("v2-grpc", predict_v2_grpc, "target"))


def _where(info, kind: str) -> dict:
    return {"url": info.inference_url} if kind == "url" else {"target": info.grpc_inference}


@pytest.fixture(scope="module")
def syntax_copies(server):
    """The real radiograph in every accepted transfer syntax: [(SyntaxCase, path)]."""
    from flannel.benchmarks.dicom_syntaxes import SYNTAX_CASES, encode, source_dataset

    if real_chest_dicom() is None:
        pytest.skip("pydicom-data (RG1_UNCR.dcm) is not installed (test extra)")
    folder = server[2] / "syntaxes"
    folder.mkdir(exist_ok=True)
    source = source_dataset()
    copies = []
    for case in SYNTAX_CASES:
        path = folder / f"{case.name.replace(' ', '_').replace('/', '-')}.dcm"
        path.write_bytes(encode(source, case))
        copies.append((case, path))
    return copies


@pytest.mark.parametrize("protocol, fn, where", PROTOCOL_CLIENTS,
                         ids=[p[0] for p in PROTOCOL_CLIENTS])
def test_every_transfer_syntax_gets_the_original_s_answer(server, syntax_copies, class_names,
                                                          protocol, fn, where):
    """Every lossless copy of the real DICOM gets the original's answer (the decision exactly,
    the probabilities within the batch's float rounding) over each protocol; every lossy one
    its decision and probabilities within LOSSY_PROBABILITY_ATOL (over HTTP: the protocols
    carry the same bytes, as the lossless copies show)."""
    info = server[0]
    (original,) = predict_http([real_chest_dicom()], MODEL, url=info.inference_url,
                               token=token(info))
    want = np.array([original.probabilities[c] for c in class_names])
    copies = [(c, p) for c, p in syntax_copies if c.lossless or protocol == "http"]
    results = fn([path for _, path in copies], MODEL, token=token(info), **_where(info, where))
    for (case, path), result in zip(copies, results):
        assert result.status == 200, (case.name, result.summary())
        got = np.array([result.probabilities[c] for c in class_names])
        atol = ATOL if case.lossless else LOSSY_PROBABILITY_ATOL
        np.testing.assert_allclose(got, want, atol=atol, err_msg=case.name)
        assert result.prediction == original.prediction, case.name


def test_pixel_module_variants_answer_as_offline(server, offline, class_names):
    """12- and 16-bit stored values, the other photometric interpretation, signed pixels and a
    VOI LUT: each served answer equals offline ONNX Runtime on the export's own decoding."""
    from flannel.benchmarks.dicom_syntaxes import source_dataset, variants
    from flannel.benchmarks.decode_inputs import dicom_file

    if real_chest_dicom() is None:
        pytest.skip("pydicom-data (RG1_UNCR.dcm) is not installed (test extra)")
    info, _, root = server
    paths = []
    for name, ds in variants(source_dataset()).items():
        path = root / "files" / f"variant-{name.replace(' ', '_')}.dcm"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(dicom_file(ds))
        paths.append(path)
    for path, result in zip(paths, predict_http(paths, MODEL, url=info.inference_url,
                                                token=token(info))):
        assert_matches_offline(result, offline(path), class_names)


@pytest.mark.parametrize("protocol, fn, where", PROTOCOL_CLIENTS,
                         ids=[p[0] for p in PROTOCOL_CLIENTS])
def test_a_structured_report_comes_back_over_every_protocol(server, class_names, protocol, fn,
                                                            where):
    """``dicom_out`` over a real TorchServe: the report references the source and says what the
    plain answer says, over HTTP (a form field), gRPC (an input), v2 (a parameter) and v2 gRPC
    (an option input, since TorchServe drops v2 gRPC parameters)."""
    import pydicom

    from flannel.dicom_results import from_part10, read_report

    dcm = real_chest_dicom()
    if dcm is None:
        pytest.skip("pydicom-data (RG1_UNCR.dcm) is not installed (test extra)")
    info = server[0]
    (plain,) = predict_http([dcm], MODEL, url=info.inference_url, token=token(info))
    (result,) = fn([dcm], MODEL, token=token(info), dicom_out="sr", **_where(info, where))
    assert result.status == 200, result.summary()
    assert result.prediction == plain.prediction
    sr = from_part10(result.dicom_objects["sr"])
    report = read_report(sr)
    source = pydicom.dcmread(dcm, stop_before_pixels=True)
    assert report["prediction"] == plain.prediction
    assert report["probabilities"] == pytest.approx(plain.probabilities, abs=ATOL)
    assert report["source_sop_instance_uids"] == {source.SOPInstanceUID}
    assert (sr.StudyInstanceUID, sr.PatientID) == (source.StudyInstanceUID, source.PatientID)


def test_an_ensemble_s_report_carries_its_learner_weights(server, served_ensemble):
    from flannel.dicom_results import from_part10, read_report

    dcm = real_chest_dicom()
    if dcm is None:
        pytest.skip("pydicom-data (RG1_UNCR.dcm) is not installed (test extra)")
    info = server[0]
    manifest = json.loads((served_ensemble / "export" / "manifest.json").read_text())
    (result,) = predict_grpc([dcm], ENSEMBLE_MODEL, target=info.grpc_inference,
                             token=token(info), dicom_out="sr")
    assert result.status == 200, result.summary()
    report = read_report(from_part10(result.dicom_objects["sr"]))
    assert list(report["learner_weights"]) == [m["name"] for m in manifest["members"]]
    assert report["learner_weights"] == pytest.approx(result.body["learner_weights"], abs=ATOL)
    # the archive's backend is chosen at archive time ("auto"); its artifact is one of these
    graphs = {e["sha256"] for k, e in manifest["artifacts"].items()
              if k.startswith(("onnx", "aoti"))}
    assert report["artifact_sha256"] in graphs
    assert (report["model_name"], report["prediction"]) == (ENSEMBLE_MODEL, result.prediction)


def test_predict_dicom_out_writes_the_report_and_the_overlay_capture(server, tmp_path, capsys):
    from flannel.dicom_results import from_part10, read_report

    dcm = real_chest_dicom()
    if dcm is None:
        pytest.skip("pydicom-data (RG1_UNCR.dcm) is not installed (test extra)")
    info = server[0]
    out = tmp_path / "results"
    code = flannel_main(["predict", str(dcm), "--model", MODEL, "--config", str(info.config),
                         "--protocol", "v2", "--dicom-out", str(out), "--dicom-objects", "sr,sc"])
    assert code == 0, capsys.readouterr().out
    sr_path, sc_path = out / f"{dcm.name}.sr.dcm", out / f"{dcm.name}.sc.dcm"
    assert sr_path.stat().st_mode & 0o777 == 0o600
    sr, sc = from_part10(sr_path.read_bytes()), from_part10(sc_path.read_bytes())
    (plain,) = predict_http([dcm], MODEL, url=info.inference_url, token=token(info))
    assert read_report(sr)["prediction"] == plain.prediction
    assert sc.StudyInstanceUID == sr.StudyInstanceUID and sc.pixel_array.ndim == 3
    printed = capsys.readouterr().out
    assert f"\tsr\t{sr_path}" in printed and f"\tsc\t{sc_path}" in printed


# --- the PACS bridge (flannel dicomweb) against a private Orthanc and this server -------------

# Each protocol's run files its instances under its own study date, so that one run's search
# (--since that date) finds only the instances it uploaded.
PROTOCOL_DATES = {"http": "20250101", "v2-grpc": "20250102"}


def real_server_corpus(pacs_corpus: dict[str, bytes], date: str) -> dict:
    """The real radiograph natively, as JPEG-LS and as HTJ2K; a CR the server refuses (16 x 16
    pixels, below its 32-pixel minimum); a PDF in a DX series; pydicom's CT: each in a study of
    its own dated ``date``, with new UIDs."""
    import io

    import pydicom
    from pydicom.uid import generate_uid

    from flannel.benchmarks.dicom_syntaxes import case_named, encode
    from test_dicomweb import pdf_in, radiograph, renamed

    out = {}
    original = pydicom.dcmread(io.BytesIO(pacs_corpus["real"]))
    for name, case in (("native", None), ("jpeg-ls", "JPEG-LS Lossless"),
                       ("htj2k", "HTJ2K Lossless")):
        ds = renamed(original)
        out[name] = ds if case is None else pydicom.dcmread(io.BytesIO(encode(ds,
                                                                               case_named(case))))
    tiny = pydicom.dcmread(io.BytesIO(radiograph(seed=3)))
    tiny.Rows = tiny.Columns = 16
    tiny.PixelData = tiny.PixelData[:16 * 16 * 2]
    out["too small"] = tiny
    out["form"] = pydicom.dcmread(io.BytesIO(pdf_in("DX")))
    out["ct"] = renamed(pydicom.dcmread(io.BytesIO(pacs_corpus["ct"])))
    for ds in out.values():
        ds.StudyInstanceUID, ds.StudyDate = generate_uid(), date
    return out


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "v2-grpc"])
def test_pacs_bridge_with_this_server(server, orthanc, pacs_corpus, protocol, tmp_path, capsys):
    """`flannel dicomweb` against Orthanc and a real TorchServe: the radiographs in three
    syntaxes are answered and their reports filed in their studies, saying what the plain
    answer says; the CR below the size limit is refused with the server's reason; the PDF is
    skipped and the CT never found; a second run sends nothing."""
    from flannel.dicom_results import read_report, report_identity
    from flannel.handlers.dicomweb import DicomWebClient
    from flannel.handlers.pacs_bridge import ANSWERED, REFUSED, SKIPPED, run_bridge
    from test_dicomweb import config as bridge_config, part10, reports_in

    info = server[0]
    pacs = DicomWebClient(orthanc.dicomweb_url)
    corpus = real_server_corpus(pacs_corpus, PROTOCOL_DATES[protocol])
    pacs.store([part10(ds) for ds in corpus.values()])
    radiographs = {n: corpus[n] for n in ("native", "jpeg-ls", "htj2k")}
    for name, ds in radiographs.items():
        (tmp_path / f"{name}.dcm").write_bytes(part10(ds))
    state, report = tmp_path / "state.sqlite", tmp_path / "report.jsonl"
    argv = ["dicomweb", "--url", orthanc.dicomweb_url, "--model", MODEL, "--protocol", protocol,
            "--config", str(info.config), "--since", PROTOCOL_DATES[protocol],
            "--state", str(state), "--report", str(report)]
    assert flannel_main(argv) == 1  # one instance was refused
    first = capsys.readouterr().out
    outcomes = {o["sop_instance_uid"]: o for o in map(json.loads, report.read_text().splitlines())}
    name_of = {ds.SOPInstanceUID: n for n, ds in corpus.items()}
    by_name = {name_of[uid]: o for uid, o in outcomes.items()}
    assert set(by_name) == {"native", "jpeg-ls", "htj2k", "too small", "form"}  # no CT
    client = Client.from_config(info.config, model=MODEL)
    plain = {Path(r.file).stem: r.prediction
             for r in client.predict([tmp_path / f"{n}.dcm" for n in radiographs])}
    for name, ds in radiographs.items():
        outcome = by_name[name]
        assert outcome["outcome"] == ANSWERED and outcome["prediction"] == plain[name], outcome
        (sr,) = reports_in(pacs, ds.StudyInstanceUID)
        assert sr.SOPInstanceUID == outcome["report_uid"]
        assert report_identity(sr) == ({ds.SOPInstanceUID}, MODEL)
        assert read_report(sr)["prediction"] == plain[name]
    refused = by_name["too small"]
    assert refused["outcome"] == "refused" and refused["status"] == 400
    assert "at least 32 pixels" in refused["reason"]
    assert reports_in(pacs, corpus["too small"].StudyInstanceUID) == []
    assert by_name["form"]["outcome"] == SKIPPED
    assert "dicomweb: 5 instances, 3 answered, 1 refused, 0 failed, 1 skipped" in first

    assert flannel_main(argv) == 0  # the same state file: nothing is sent again
    second = capsys.readouterr().out
    assert "0 answered, 0 refused, 0 failed" in second
    sent = []
    fresh = run_bridge(bridge_config(tmp_path, url=orthanc.dicomweb_url, protocol=protocol,
                                     since=PROTOCOL_DATES[protocol],
                                     state=tmp_path / "fresh.sqlite"),
                       lambda files: sent.extend(files) or client.predict(
                           files, protocol=protocol, dicom_out="sr"))
    # without the state file, the PACS's reports still keep the answered instances from the
    # model; only the refused one (which has no report) is asked again
    assert len(sent) == 1 and fresh.count(ANSWERED) == 0 and fresh.count(REFUSED) == 1
    print(f"\n{protocol}: first run {first.strip().splitlines()[-1]}\n  second run: "
          f"{second.strip().splitlines()[-1]}\n  fresh state file: {fresh.line()}, "
          f"{len(sent)} sent")


def test_ensemble_answers_carry_learner_weights_equal_to_offline(server, served_ensemble, pngs,
                                                                 class_names):
    """The served ensemble, PNGs and the real DICOM, over HTTP and gRPC, against ONNX Runtime run
    offline on the export with the export's input spec."""

    info, _, _ = server
    export = served_ensemble / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    members = [m["name"] for m in manifest["members"]]
    spec = PreprocessSpec.load(export / "input_spec.json")
    session = make_session(export / "model.onnx", intra_op_threads=1)
    dcm = real_chest_dicom()
    files = [*pngs[:2], *([dcm] if dcm else [])]
    batch = torch.stack([load_tensor(f, spec) for f in files]).numpy()
    probs, weights, ood = session.run(["probabilities", "learner_weights", "ood_score"],
                                      {"image": batch})
    fields = Offline(export).policy.fields(probs, ood)
    for fn, where in ((predict_http, {"url": info.inference_url}),
                      (predict_grpc, {"target": info.grpc_inference})):
        results = fn(files, ENSEMBLE_MODEL, token=token(info), **where)
        for result, p, w, f in zip(results, probs, weights, fields):
            assert result.status == 200, result.text
            body = result.body
            assert set(body) - {"warnings"} == ANSWER_KEYS | {"learner_weights"}
            assert_fields_match(body, f)
            assert body["model"] == ENSEMBLE_MODEL and list(body["learner_weights"]) == members
            got_p = np.array([body["probabilities"][c] for c in class_names])
            got_w = np.array([body["learner_weights"][m] for m in members])
            np.testing.assert_allclose(got_p, p, atol=ATOL)
            np.testing.assert_allclose(got_w, w, atol=ATOL)
            assert abs(got_w.sum() - 1.0) < ATOL
            assert body["prediction"] == class_names[int(np.argmax(p))]
            assert "learner weights" in result.summary()


def dicom_case(server):
    """(server info, the real DICOM, the learner's export folder, its manifest, the DICOM's
    served input tensor); skips without the test extra's DICOM."""
    dcm = real_chest_dicom()
    if dcm is None:
        pytest.skip("pydicom-data (RG1_UNCR.dcm) is not installed (test extra)")
    info, run, _ = server
    export = run / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    spec = PreprocessSpec.load(export / "input_spec.json")
    return info, dcm, export, manifest, torch.stack([load_tensor(dcm, spec)]).numpy()


def test_int8_archive_answers_like_its_artifact_and_agrees_with_fp32(server, class_names):
    """The ort-int8 backend in a real TorchServe: the DICOM's answer equals offline ONNX Runtime
    on the int8 artifact and takes the fp32 model's decision (the int8 gate's criterion)."""
    info, dcm, export, manifest, x = dicom_case(server)
    int8 = make_session(export / manifest["artifacts"]["onnx_int8"]["path"], intra_op_threads=1)
    want = int8.run(["probabilities"], {"image": x})[0][0]
    (answer,) = predict_grpc([dcm], INT8_MODEL, target=info.grpc_inference, token=token(info))
    (fp32,) = predict_http([dcm], MODEL, url=info.inference_url, token=token(info))
    assert answer.status == 200 and answer.body["model"] == INT8_MODEL
    got = np.array([answer.body["probabilities"][c] for c in class_names])
    np.testing.assert_allclose(got, want, atol=ATOL)
    assert answer.body["prediction"] == fp32.body["prediction"]


def test_compiled_archive_answers_within_its_gate(server, class_names):
    """The compiled backend (torch-bf16 on CPUs with native bf16, else torch-fp32) in a real
    TorchServe: the DICOM's answer equals the package run offline, stays within its tolerance
    profile of fp32 and takes the fp32 model's decision."""
    from flannel.artifacts import TOLERANCES
    from flannel.backends import CompiledBackend

    info, dcm, export, manifest, x = dicom_case(server)
    entry = manifest["artifacts"][f"aoti_{COMPILED_PRECISION}"]
    package = CompiledBackend("offline", export / entry["path"], LEARNER, ["probabilities"], 1,
                              entry["max_batch"])
    want = package.run(x)["probabilities"][0]
    fp32 = make_session(export / "model.onnx", 1).run(["probabilities"], {"image": x})[0][0]
    (answer,) = predict_http([dcm], COMPILED_MODEL, url=info.inference_url, token=token(info))
    assert answer.status == 200 and answer.body["model"] == COMPILED_MODEL
    got = np.array([answer.body["probabilities"][c] for c in class_names])
    np.testing.assert_allclose(got, want, atol=1e-3)  # thread count may reorder sums
    assert np.abs(got - fp32).max() <= TOLERANCES[entry["tolerance_profile"]].atol
    assert answer.body["prediction"] == class_names[int(np.argmax(fp32))]


def test_requests_without_a_valid_token_are_refused(server, pngs):
    info, _, _ = server
    for key in (None, "wrong-key"):
        (http,) = predict_http(pngs[:1], MODEL, url=info.inference_url, token=key)
        # TorchServe 0.12 answers a missing or wrong token with 400 InvalidKeyException over REST.
        assert http.status in (400, 401, 403) and http.body["type"] == "InvalidKeyException"
        (grpc,) = predict_grpc(pngs[:1], MODEL, target=info.grpc_inference, token=key)
        assert grpc.status == 403 and "Token Authorization failed" in grpc.text
        (v2,) = predict_v2(pngs[:1], MODEL, url=info.inference_url, token=key)
        assert v2.status in (400, 401, 403) and v2.body["type"] == "InvalidKeyException"
        (v2_grpc,) = predict_v2_grpc(pngs[:1], MODEL, target=info.grpc_inference, token=key)
        assert v2_grpc.status == 403 and "Token Authorization failed" in v2_grpc.text
        r = requests.get(f"{info.inference_url}/v2/health/ready", timeout=10,
                         headers={"Authorization": f"Bearer {key}"} if key else {})
        assert r.status_code in (400, 401, 403)
    mgmt = requests.get(f"{info.management_url}/models", timeout=10)
    assert mgmt.status_code in (400, 401, 403)


def listening_sockets(*root_pids: int) -> list:
    """The TCP sockets listening in these processes and all their descendants."""
    import psutil

    pids = set()
    for pid in root_pids:
        root = psutil.Process(pid)
        pids |= {root.pid, *(p.pid for p in root.children(recursive=True))}
    return [c for c in psutil.net_connections(kind="inet")
            if c.pid in pids and c.status == psutil.CONN_LISTEN]


def loopback(ip: str) -> bool:
    """A loopback address, IPv4-mapped IPv6 ones included (Java and gRPC listen on those)."""
    import ipaddress

    addr = ipaddress.ip_address(ip)
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


def test_every_listening_socket_is_loopback(server):
    """CVE-2024-35199 (gRPC bound to all interfaces whatever the config said): every TCP socket
    TorchServe and its workers listen on is on loopback."""
    info, _, _ = server
    listening = listening_sockets(info.pid)
    ports = {c.laddr.port for c in listening}
    expected = {int(u.rsplit(":", 1)[1]) for u in (info.inference_url, info.management_url,
                                                   info.metrics_url, info.grpc_inference,
                                                   info.grpc_management)}
    assert expected <= ports, (expected, ports)
    assert all(loopback(c.laddr.ip) for c in listening), listening


def test_models_cannot_be_registered_from_a_url(server):
    """ShellTorch (CVE-2023-43654): with the model API off, registering an archive from a URL is
    refused over HTTP and gRPC even with the management key, and nothing new is served."""
    import grpc

    info, _, _ = server
    key = read_tokens(info.key_file)["management"]
    headers = {"Authorization": f"Bearer {key}"}
    url = "https://example.com/evil.mar"
    r = requests.post(f"{info.management_url}/models", params={"url": url}, headers=headers,
                      timeout=10)
    assert r.status_code in (400, 403, 405), r.text
    stubs = grpc_stubs.load_stubs()
    with grpc.insecure_channel(info.grpc_management) as channel:
        stub = stubs["management_pb2_grpc"].ManagementAPIsServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.RegisterModel(stubs["management_pb2"].RegisterModelRequest(url=url),
                               metadata=[("authorization", f"Bearer {key}")], timeout=10)
        assert err.value.code() in (grpc.StatusCode.PERMISSION_DENIED,
                                    grpc.StatusCode.UNIMPLEMENTED,
                                    grpc.StatusCode.INVALID_ARGUMENT)
        for token in (None, "wrong-key"):  # and without a valid key, nothing at all
            with pytest.raises(grpc.RpcError) as err:
                stub.ListModels(stubs["management_pb2"].ListModelsRequest(),
                                metadata=[("authorization", f"Bearer {token}")] if token else [],
                                timeout=10)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    listing = requests.get(f"{info.management_url}/models", headers=headers, timeout=10).json()
    assert "evil" not in {m["modelName"] for m in listing["models"]}


def test_an_expired_key_is_renewed_and_the_old_one_refused(server, pngs, capsys, tmp_path,
                                                           monkeypatch):
    """The key file says the inference key has expired (the server's clock is left alone): the
    client renews it through TorchServe's token API (which rewrites the file, still 0600), the
    new key is accepted, the old one is refused, and `flannel predict` given the old key in a
    file or in FLANNEL_INFERENCE_KEY says the key was refused and what to do."""
    from flannel.handlers.keys import KEY_ENV, current_token, token_expiry

    info, _, _ = server
    old = read_tokens(info.key_file)["inference"]
    assert current_token(info) == old  # valid for the configured hour: nothing renewed
    data = json.loads(info.key_file.read_text())
    data["inference"]["expiration time"] = "2001-01-01T00:00:00Z"
    info.key_file.write_text(json.dumps(data))
    new = current_token(info)
    assert new != old and read_tokens(info.key_file)["inference"] == new
    assert token_expiry(info.key_file).year > 2001
    assert key_file_mode(info) == 0o600  # TorchServe's rewrite keeps the mode
    (fresh,) = predict_http(pngs[:1], MODEL, url=info.inference_url, token=new)
    (stale,) = predict_http(pngs[:1], MODEL, url=info.inference_url, token=old)
    assert fresh.ok and stale.refused_key
    (tmp_path / "old.key").write_text(old + "\n")
    command = ["predict", str(pngs[0]), "--model", MODEL, "--config", str(info.config)]
    code = flannel_main(command + ["--token-file", str(tmp_path / "old.key")])
    out = capsys.readouterr().out
    assert code == 1 and "refused the inference key" in out and "leave out --token-file" in out
    monkeypatch.setenv(KEY_ENV, old)
    assert flannel_main(command) == 1 and "refused the inference key" in capsys.readouterr().out
    monkeypatch.setenv(KEY_ENV, new)
    assert flannel_main(command) == 0
    monkeypatch.delenv(KEY_ENV)
    # A key the server refuses although the file says it is valid (another host renewed it):
    # the Python client renews once and retries, over every protocol.
    data = json.loads(info.key_file.read_text())
    data["inference"]["key"] = "revoked-key"
    info.key_file.write_text(json.dumps(data))
    client = Client.from_config(info.config, model=MODEL)
    for protocol in ("http", "grpc", "v2", "v2-grpc"):
        (result,) = client.predict(pngs[:1], protocol=protocol)
        assert result.ok, (protocol, result.text)
    assert read_tokens(info.key_file)["inference"] not in ("revoked-key", new)
    assert key_file_mode(info) == 0o600


def _batch_lines(log: Path) -> list[tuple[int, int, int]]:
    text = log.read_text(errors="replace") if log.is_file() else ""
    return [tuple(map(int, m)) for m in re.findall(r"batch of (\d+): (\d+) answered, (\d+) refused", text)]


def test_mixed_batch_answers_each_item(server, pngs, offline, class_names):
    info, _, root = server
    corrupt = root / "files" / "corrupt.png"
    corrupt.write_bytes(pngs[0].read_bytes()[:60])  # PNG signature, truncated after the header
    files = [pngs[0], corrupt, pngs[1], pngs[2]]
    before = len(_batch_lines(info.log_dir / "model_log.log"))
    results = predict_http(files, MODEL, url=info.inference_url, token=token(info))
    assert [r.status for r in results] == [200, 400, 200, 200]
    for i in (0, 2, 3):
        assert_matches_offline(results[i], offline(files[i]), class_names)
    assert results[1].body["code"] == 400 and "DecodeError" in results[1].body["error"]
    deadline = time.monotonic() + 10  # the worker's stdout reaches model_log.log asynchronously
    while len(_batch_lines(info.log_dir / "model_log.log")) <= before and time.monotonic() < deadline:
        time.sleep(0.2)
    new = _batch_lines(info.log_dir / "model_log.log")[before:]
    assert sum(n for n, _, _ in new) == 4 and sum(r for _, _, r in new) == 1
    assert any(n >= 2 and r == 1 for n, _, r in new), f"corrupt item not batched with others: {new}"


def _hostile_requests(image: bytes) -> dict[str, tuple[bytes, str, str]]:
    """name -> (body, content type, the route under /predictions or /v2/models/<m>/infer)."""
    b64 = base64.b64encode(image).decode()
    one = json.dumps({"image": b64})
    v2 = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}]}
    deep = b"[" * 100_000 + b"]" * 100_000
    return {
        "5000-digit integer": ((one[:-1] + ', "n": ' + "9" * 5000 + "}").encode(),
                               "application/json", "plain"),
        "superscript target": (json.dumps({"image": b64, "explain": True, "target": "\u00b2"})
                               .encode(), "application/json", "plain"),
        "2 MB explain value": (json.dumps({"image": b64, "explain": "x" * 2_000_000}).encode(),
                               "application/json", "plain"),
        "learner a list": (json.dumps({"image": b64, "learner": []}).encode(),
                           "application/json", "plain"),
        "100,000 deep as JSON": (deep, "application/json", "plain"),
        "100,000 deep as text": (deep, "text/plain", "plain"),
        "v2 datatype a list": (json.dumps({**v2, "inputs": [{**v2["inputs"][0], "datatype": []}]})
                               .encode(), "application/json", "v2"),
        "v2 300,000-element shape": (json.dumps({**v2, "inputs": [
            {**v2["inputs"][0], "shape": [1] * 300_000}]}).encode(), "application/json", "v2"),
        "v2 id of 2 MB": (json.dumps({**v2, "id": "i" * 2_000_000}).encode(), "application/json",
                          "v2"),
    }


def test_hostile_requests_leave_their_batch_and_the_worker_alone(server, offline, class_names):
    """Each hostile request, sent together with three good requests (the real radiograph) so
    that TorchServe batches them: the good ones get their offline answers, the hostile one a
    short 4xx naming its problem, and the worker never restarts."""
    from concurrent.futures import ThreadPoolExecutor

    import psutil

    info, _, _ = server
    dicom = real_chest_dicom()
    pids = worker_pids(info, MODEL)
    # config.properties' decode_input_request=false reaches the worker: the handler, not
    # TorchServe's unlimited json.loads, parses every JSON body.
    assert all(psutil.Process(p).environ().get("TS_DECODE_INPUT_REQUEST") == "false"
               for p in pids)
    headers = {"Authorization": f"Bearer {token(info)}"}
    routes = {"plain": f"{info.inference_url}/predictions/{MODEL}",
              "v2": f"{info.inference_url}/v2/models/{MODEL}/infer"}
    expected = offline(dicom)

    def good(_):
        return predict_http([dicom], MODEL, url=info.inference_url, token=token(info))[0]

    outcomes = {}
    for name, (body, content_type, route) in _hostile_requests(dicom.read_bytes()).items():
        with ThreadPoolExecutor(4) as pool:
            goods = [pool.submit(good, i) for i in range(3)]
            bad = pool.submit(requests.post, routes[route], data=body, timeout=60,
                              headers={**headers, "Content-Type": content_type})
            for future in goods:
                result = future.result()
                assert result.status == 200, (name, result.text[:300])
                assert_matches_offline(result, expected, class_names)
            answer = bad.result()
        outcomes[name] = (answer.status_code, answer.text[:120])
        assert 400 <= answer.status_code < 500, (name, answer.status_code, answer.text[:300])
        assert len(answer.content) < 2000, (name, len(answer.content))
    print("\nhostile request -> status, answer:")
    for name, (status, text) in outcomes.items():
        print(f"  {name}: {status} {text}")
    assert worker_pids(info, MODEL) == pids, "a worker restarted"


def v2_as_plain(result) -> dict:
    """A v2 answer in the plain answer's terms, for the bad-input corpus checks."""
    if not result.ok:
        return {"code": result.status, "error": result.summary().split("\t", 3)[-1]}
    outputs = {o["name"]: o for o in result.body["outputs"]}
    plain = {"probabilities": result.probabilities, "ood_score": outputs["ood_score"]["data"][0]}
    if "warnings" in outputs and outputs["warnings"]["data"][0]:
        plain["warnings"] = outputs["warnings"]["data"][0].split("; ")
    return plain


def test_bad_input_corpus_over_http_json_and_grpc(server, tmp_path):
    """Every kind of the corpus (tests/bad_inputs.py) over raw HTTP, JSON/base64 and gRPC, sent
    concurrently so that TorchServe batches good and bad items together: each gets its answer
    or its named 4xx, good items answer as they do alone, and the worker never restarts."""
    from bad_inputs import UNPICKLED_MARKER, as_json, check, corpus

    UNPICKLED_MARKER.unlink(missing_ok=True)
    info, _, _ = server
    cases = corpus(real_chest_dicom())
    raw, wrapped = [], []
    for i, case in enumerate(cases):
        raw.append(tmp_path / f"{i:02d}.raw")
        raw[-1].write_bytes(case.body)
        wrapped.append(tmp_path / f"{i:02d}.json")
        wrapped[-1].write_bytes(as_json(case))
    pids = worker_pids(info, MODEL)
    alone = {}
    for case, path in zip(cases, raw):
        if case.status == 200:
            (r,) = predict_http([path], MODEL, url=info.inference_url, token=token(info))
            alone[case.name] = r.body
    for protocol, fn, where in (("http", predict_http, {"url": info.inference_url}),
                                ("grpc", predict_grpc, {"target": info.grpc_inference})):
        for files in (raw, wrapped):
            results = fn(files, MODEL, token=token(info), **where)
            for case, result in zip(cases, results):
                check(case, result.status, result.body, alone)
                if result.status == 200:
                    assert result.body == alone[case.name] or np.allclose(
                        list(result.body["probabilities"].values()),
                        list(alone[case.name]["probabilities"].values()), atol=1e-6), case.name
    # The same files as v2 BYTES tensors, over REST and gRPC (malformed-JSON cases have no
    # v2 form: their bytes would be a file like any other).
    v2_cases = [(case, path) for case, path in zip(cases, raw) if case.json_ok]
    for fn, where in ((predict_v2, {"url": info.inference_url}),
                      (predict_v2_grpc, {"target": info.grpc_inference})):
        results = fn([p for _, p in v2_cases], MODEL, token=token(info), **where)
        for (case, _), result in zip(v2_cases, results):
            check(case, result.status, v2_as_plain(result), alone)
    assert worker_pids(info, MODEL) == pids, "a worker restarted"
    assert not UNPICKLED_MARKER.exists(), "a request's pickle was loaded"


def test_oversized_body_is_refused_by_the_frontend(server, pngs, tmp_path):
    """A body above max_request_size never reaches a worker: HTTP answers 413; over gRPC
    TorchServe 0.12 resets the stream (RST_STREAM), which the client reports as a failed call.
    The server answers the next request as before."""
    info, _, _ = server
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(65 * 2**20))  # above max_request_size
    pids = worker_pids(info, MODEL)
    (http,) = predict_http([big], MODEL, url=info.inference_url, token=token(info))
    (grpc,) = predict_grpc([big], MODEL, target=info.grpc_inference, token=token(info))
    assert http.status == 413, http
    assert grpc.status >= 400 and not grpc.ok and "RST_STREAM" in grpc.text, grpc
    (after,) = predict_grpc(pngs[:1], MODEL, target=info.grpc_inference, token=token(info))
    assert after.ok and worker_pids(info, MODEL) == pids


def test_predict_cli_reads_the_token(server, pngs, capsys):
    info, _, _ = server
    for protocol in ("http", "grpc", "v2", "v2-grpc"):
        code = flannel_main(["predict", *map(str, pngs[:2]), "--model", MODEL,
                             "--protocol", protocol, "--config", str(info.config)])
        lines = capsys.readouterr().out.strip().splitlines()
        assert code == 0 and [line.split("\t")[:2] for line in lines] == [[str(p), "200"] for p in pngs[:2]]


def test_predict_cli_prints_full_answers_as_json_and_needs_a_model_among_several(
        server, pngs, offline, class_names, capsys):
    info, _, _ = server
    code = flannel_main(["predict", str(pngs[0]), __file__, "--model", MODEL, "--json",
                         "--config", str(info.config)])
    good, bad = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert code == 1 and good["status"] == 200 and bad["status"] == 400
    assert good["file"] == str(pngs[0]) and "DecodeError" in bad["body"]["error"]
    np.testing.assert_allclose([good["body"]["probabilities"][c] for c in class_names],
                               offline(pngs[0]), atol=ATOL)
    code = flannel_main(["predict", str(pngs[0]), "--config", str(info.config)])
    out = capsys.readouterr().out
    assert code == 2 and "give --model" in out and MODEL in out and INT8_MODEL in out


def test_metrics_endpoint(server, pngs):
    """TorchServe's own metrics and the handler's: items by status, refusals by reason, batch
    sizes and the decode / preprocess / inference split (after a batch with a bad item)."""
    info, _, _ = server
    results = predict_http([pngs[0], __file__], MODEL, url=info.inference_url, token=token(info))
    assert [r.status for r in results] == [200, 400]
    deadline = time.monotonic() + 30  # the frontend reads the worker's metrics asynchronously
    while True:
        text = requests.get(f"{info.metrics_url}/metrics", timeout=10).text
        found = {name: re.search(rf"^{name}\{{[^}}]*\}} ([0-9.eE+-]+)$", text, re.M)
                 for name in ("FlannelItems", "FlannelItemsRefused", "FlannelBatchSize_count",
                              "FlannelDecodeMs_count", "FlannelPreprocessMs_sum",
                              "FlannelInferenceMs_sum", "FlannelExplainMs_count")}
        if all(found.values()) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert "ts_inference_requests_total" in text
    missing = [name for name, m in found.items() if not m]
    assert not missing, f"{missing} not in /metrics:\n" + "\n".join(
        line for line in text.splitlines() if "Flannel" in line)
    assert re.search(r'FlannelItems\{[^}]*Status="400"', text)
    assert re.search(r'FlannelItemsRefused\{[^}]*Reason="DecodeError"', text)
    assert float(found["FlannelInferenceMs_sum"].group(1)) > 0


def test_soak_and_worst_case_runs_work_at_tiny_sizes(server, tmp_path):
    """The on-request soak and worst-case memory runs (flannel bench soak), seconds long here:
    every answer checked against the file's answer alone, worker RSS sampled."""
    from flannel.benchmarks.soak import format_soak, format_worst_case, soak, soak_files, worst_case

    info, _, _ = server
    files = soak_files(tmp_path / "files", side=256, count=2)
    result = soak(info.config, MODEL, files, seconds=4, concurrency=2, warmup_s=1,
                  sample_s=0.5)
    assert result["answered"] > 0 and result["errors"] == result["wrong"] == 0, result
    assert result["workers_still_the_same"] and len(result["rss_timeline"]) >= 4
    (growth,) = result["rss_growth"].values()
    assert growth["after_warmup_mb"] > 50 and "growth %" in format_soak(result)
    worst = worst_case(info.config, MODEL, 1500 * 1500, tmp_path / "worst", requests=4)
    assert worst["statuses"] == [200] * 4 and worst["image"]["side"] == 1500
    (peak,) = worst["rss_peak_mb"].values()
    (before,) = worst["rss_before_mb"].values()
    assert peak >= before > 50 and "peak" in format_worst_case(worst)


def test_bench_serve_attaches_to_the_running_server(server, tmp_path):
    from flannel.benchmarks.serve import bench_attached, format_summary
    from flannel.handlers.ts_config import ServeError

    info, run, _ = server
    result = bench_attached(info.config, MODEL, run_dir=run, backend="ort-fp32", levels=(1, 2),
                            requests_per_level=3, warmup=1, time_limit=60, payload_side=128)
    rows = result["rows"]
    assert [(r["protocol"], r["concurrency"]) for r in rows] == [
        ("http", 1), ("http", 2), ("grpc", 1), ("grpc", 2)]
    assert all(r["requests"] == 3 and r["error_rate"] == 0.0 for r in rows), rows
    assert rows[0]["batch_size"] == 8 and rows[0]["workers"] == 1
    assert result["reference"]["batch_size"] == 8 and result["reference"]["images_per_s"] > 0
    assert "attached" in format_summary(result)
    with pytest.raises(ServeError, match="not served.*resnet18"):
        bench_attached(info.config, "no-such-model", levels=(1,), requests_per_level=1)
    idle = write_test_config(tmp_path / "config.properties", tmp_path / "store")
    with pytest.raises(ServeError, match="no TorchServe is running"):
        bench_attached(idle, MODEL, levels=(1,), requests_per_level=1)


def _load(info, files: list[Path], clients: int, per_client: int = 0, until=None,
          timeout: float = 150.0, records: list | None = None,
          retry: RetryPolicy = NO_RETRY) -> list[dict]:
    """``clients`` threads each sending files round-robin with ``predict_http`` (``per_client``
    each, or until ``until()`` is true; each file sent once unless ``retry`` says otherwise);
    one record per file (file, status, body, tries, send and answer times), appended to
    ``records`` as they come when given."""
    import threading

    key = token(info)
    records, lock = ([] if records is None else records), threading.Lock()

    def client(k: int) -> None:
        n = 0
        while (n < per_client) if per_client else not until():
            i = (k + n) % len(files)
            sent = time.monotonic()
            (result,) = predict_http([files[i]], MODEL, url=info.inference_url, token=key,
                                     timeout=timeout, retry=retry)
            with lock:
                records.append({"file": files[i], "status": result.status, "text": result.text,
                                "attempts": result.attempts, "sent": sent,
                                "done": time.monotonic()})
            n += 1
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def _answers_match_offline(records, offline, class_names) -> int:
    """Every 200 answer is the offline answer for the file it was sent for; returns how many."""
    cache, n = {}, 0
    for r in records:
        if r["status"] != 200:
            continue
        body = json.loads(r["text"])
        want = cache.setdefault(r["file"], offline(r["file"]))
        np.testing.assert_allclose([body["probabilities"][c] for c in class_names], want,
                                   atol=ATOL, err_msg=str(r["file"]))
        n += 1
    return n


@pytest.fixture(scope="module")
def radiographs(server):
    """Four different 1024 px radiograph-like PNGs: enough work per request to overload."""
    from bad_inputs import radiograph

    _, _, root = server
    folder = root / "radiographs"
    folder.mkdir(exist_ok=True)
    out = []
    for seed in range(4):
        img = radiograph(1024, seed=seed)
        out.append(folder / f"cxr{seed}.png")
        Image.fromarray(np.round(img * 255).astype(np.uint8)).save(out[-1])
    return out


def test_overload_gets_quick_503s_and_recovers_without_lost_or_swapped_answers(
        server, radiographs, offline, class_names):
    """Far more concurrent clients than the job queue (16) holds: the excess is refused with a
    quick 503, every answer that comes is the right one for its own file, and once the load
    drops single requests are as fast as before."""
    info, _, _ = server
    baseline = [r["done"] - r["sent"] for r in _load(info, radiographs, 1, per_client=4)]
    records = _load(info, radiographs, clients=96, per_client=3)
    statuses = [r["status"] for r in records]
    assert len(records) == 96 * 3 and set(statuses) <= {200, 503}, sorted(set(statuses))
    refused = [r["done"] - r["sent"] for r in records if r["status"] == 503]
    assert refused, "no request was refused: the load did not exceed the queue"
    answered = _answers_match_offline(records, offline, class_names)
    assert answered >= 32
    after = [r["done"] - r["sent"] for r in _load(info, radiographs, 1, per_client=4)]
    print(f"\noverload: {len(records)} requests from 96 clients: {answered} answered, "
          f"{len(refused)} refused with 503 (p95 {1000 * np.percentile(refused, 95):.0f} ms); "
          f"single-request latency {1000 * np.median(baseline):.0f} ms before, "
          f"{1000 * np.median(after):.0f} ms after")
    assert np.percentile(refused, 95) < 2.0
    assert np.median(after) < max(3 * np.median(baseline), np.median(baseline) + 0.5)


def test_killed_worker_is_restarted_and_answers_stay_correct(server, radiographs, offline,
                                                             class_names):
    """kill -9 of the worker under load: TorchServe starts a new one, and the client's retries
    make every request end answered, each with the right answer for its own file. Requests that
    TorchServe 0.12 was collecting into the dead worker's batch are never answered by it: the
    client's short timeout ends those tries and the retry lands on the new worker. Prints the
    requests, those answered at the first try, those retried, those never answered and the
    recovery time (kill to the first answer from the new worker)."""
    import os
    import signal
    import threading

    info, _, _ = server
    (old,) = worker_pids(info, MODEL)
    records: list[dict] = []
    stop = threading.Event()
    # Per try: well above a loaded batch here (a few seconds), short enough that a request lost
    # in the dead worker's batch is sent again soon after the new worker is up (~6 s).
    client_timeout = 15.0
    retry = RetryPolicy(attempts=5, deadline_s=120.0)
    loader = threading.Thread(target=_load, args=(info, radiographs, 4),
                              kwargs={"until": stop.is_set, "records": records,
                                      "timeout": client_timeout, "retry": retry})
    loader.start()
    time.sleep(3.0)
    killed = time.monotonic()
    os.kill(old, signal.SIGKILL)
    new, restarted, deadline = None, None, killed + 120
    while time.monotonic() < deadline:  # until the new worker has answered a request
        try:
            pids = worker_pids(info, MODEL)
        except (requests.RequestException, KeyError, IndexError, ValueError):
            pids = []
        if pids and pids[0] not in (old, -1) and new is None:
            new, restarted = pids[0], time.monotonic() - killed
        if new and any(r["sent"] > killed and r["status"] == 200 for r in list(records)):
            break
        time.sleep(0.2)
    time.sleep(3.0)  # a little more load on the new worker
    stop.set()
    loader.join(timeout=retry.deadline_s + 60)
    assert not loader.is_alive(), "a client still waits after its retry deadline"
    assert new is not None, "no new worker within 120 s"
    late = [r for r in records if r["sent"] > killed and r["status"] == 200]
    assert late, "no answer after the kill"
    recovery = min(r["done"] for r in late) - killed
    answered = _answers_match_offline(records, offline, class_names)
    first_try = sum(r["status"] == 200 and r["attempts"] == 1 for r in records)
    retried = [r for r in records if r["attempts"] > 1]
    never = [r for r in records if r["status"] != 200]
    print(f"\nworker kill: {len(records)} requests: {first_try} answered at the first try, "
          f"{len(retried)} retried ({sum(r['attempts'] - 1 for r in retried)} retries, all "
          f"answered: {all(r['status'] == 200 for r in retried)}), {len(never)} never "
          f"answered; client timeout {client_timeout:.0f} s per try; new worker pid {new} "
          f"{restarted:.1f} s after the kill; first answer from it {recovery:.1f} s after the "
          f"kill; slowest request {max(r['done'] - r['sent'] for r in records):.1f} s")
    assert not never, [(r["status"], r["attempts"], r["text"][:120]) for r in never]
    assert answered == len(records)
    # The kill hit requests in flight: without retries these would have been lost or failed.
    assert retried, "no request was in flight at the kill"


def test_stop_leaves_no_process(server):
    import psutil

    info, _, _ = server
    procs = [psutil.Process(info.pid), *psutil.Process(info.pid).children(recursive=True)]
    assert stop_server(info.config) is True
    assert not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert server_status(info.config) is None and not info.key_file.exists()
    assert stop_server(info.config) is False
