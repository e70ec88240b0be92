"""The same archives on TorchServe and on Triton (the tritonserver nvidia-pytriton bundles), one
after the other on the same loopback config: same statuses, same probabilities, same fields.

    .venv/bin/pytest tests/test_triton_serving.py -q

The module builds a tiny learner archive and a tiny ensemble archive, serves them on TorchServe
and records every answer of the corpus (tests/bad_inputs.py: good, broken and hostile files,
DICOM in every transfer syntax, FP32 tensors), sent concurrently so that batches mix good and
bad requests, over v2 REST and v2 gRPC; then stops it, starts Triton on the same config and
sends the same. The remaining tests check Triton's access control, its hostile-request
handling, metrics, sockets and stop.
"""
from __future__ import annotations

import base64
import json
import shutil
import stat

import numpy as np
import pytest
import requests

from flannel.handlers.triton_process import triton_problem
from flannel.handlers import grpc_stubs
from flannel.handlers.archive import ArchiveSettings, build_archive
from flannel.handlers.client import Client, predict_v2, predict_v2_grpc
from flannel.handlers.ts_config import loopback_config
from flannel.handlers.ts_process import start_server, stop_server
from flannel.samples import real_chest_dicom
from run_fixtures import add_tiny_external_evaluation, make_archivable_run
from test_serving_integration import (REPO, START_TIMEOUT_S, listening_sockets, loopback,
                                      png_file, v2_as_plain)

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("java") is None,
                                 reason="TorchServe needs Java 17 and `java` is not on PATH")]

MODEL = "resnet18"
ENSEMBLE = "ensemble"
PROTOCOLS = ("v2", "v2-grpc")
# Both runtimes run the same backend on the same tensors; only batch composition differs.
PROBABILITY_ATOL = 1e-6



@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_ensemble):
    """Archives, config and request files: a namespace dict."""
    from flannel.benchmarks.dicom_syntaxes import SYNTAX_CASES, encode, source_dataset
    from flannel.export.parity import run_parity

    from bad_inputs import corpus

    problem = triton_problem()
    if problem:
        pytest.skip(problem)
    root = tmp_path_factory.mktemp("triton")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(grpc_stubs.CACHE_ENV, str(root / "grpc"))
        run = make_archivable_run(root, arch=MODEL, crop=64)
        ensemble = shutil.copytree(tiny_ensemble.parent, root / "ens") / "ensemble"
        run_parity(ensemble)
        add_tiny_external_evaluation(ensemble)
    settings = ArchiveSettings(batch_size=8, max_batch_delay_ms=200, workers=1)
    build_archive(run, root / "store", settings=settings)
    build_archive(ensemble, root / "store", settings=settings)
    config = loopback_config(root / "config.properties", root / "store",
                             REPO / "config.properties")
    files = root / "files"
    files.mkdir()
    cases = corpus(real_chest_dicom())
    case_files = []
    for i, case in enumerate(cases):
        case_files.append(files / f"case{i:02d}.raw")
        case_files[-1].write_bytes(case.body)
    syntax_files = []
    if real_chest_dicom() is not None:
        source = source_dataset()
        for i, case in enumerate(SYNTAX_CASES):
            syntax_files.append(files / f"syntax{i:02d}.dcm")
            syntax_files[-1].write_bytes(encode(source, case))
    pngs = [png_file(files / f"img{i}.png", seed=i) for i in range(4)]
    side = json.loads((run / "export" / "input_spec.json").read_text())["resize"]
    pixels = np.random.default_rng(0).random((2, 1, side, side), dtype=np.float32)
    return {"root": root, "config": config, "run": run, "cases": cases,
            "case_files": case_files, "syntax_files": syntax_files, "pngs": pngs,
            "pixels": pixels}


def _fp32_request(info, key: str, pixels: np.ndarray) -> tuple[int, list]:
    body = {"id": "fp32", "inputs": [{"name": "pixels", "datatype": "FP32",
                                      "shape": list(pixels.shape),
                                      "data": pixels.ravel().tolist()}]}
    r = requests.post(f"{info.inference_url}/v2/models/{MODEL}/infer", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {key}"})
    if r.status_code != 200:
        return r.status_code, []
    out = {o["name"]: o for o in r.json()["outputs"]}
    return 200, out["probabilities"]["data"]


def collect(site: dict, client: Client) -> dict:
    """Every answer of the corpus, the syntaxes, the ensemble and an FP32 request."""
    got = {}
    for protocol in PROTOCOLS:
        got[("cases", protocol)] = client.predict(site["case_files"], protocol=protocol)
        got[("syntaxes", protocol)] = client.predict(site["syntax_files"], protocol=protocol)
        ensemble = Client(client.info, model=ENSEMBLE, token=client.token)
        got[("ensemble", protocol)] = ensemble.predict(site["pngs"], protocol=protocol)
    got["fp32"] = _fp32_request(client.info, client.token, site["pixels"])
    got["explained"] = client.explain(site["pngs"][:1])
    return got


@pytest.fixture(scope="module")
def torchserve_answers(site):
    start_server(site["config"], timeout=START_TIMEOUT_S)
    try:
        client = Client.from_config(site["config"], model=MODEL)
        assert client.runtime == "torchserve"
        return collect(site, client)
    finally:
        stop_server(site["config"])


@pytest.fixture(scope="module")
def triton(site, torchserve_answers):
    """A Triton serving the same store on the same config (after TorchServe stopped)."""
    from flannel.handlers.triton_process import start_triton, stop_triton

    info = start_triton(site["config"], timeout=START_TIMEOUT_S)
    try:
        yield info
    finally:
        stop_triton(site["config"])


@pytest.fixture(scope="module")
def triton_answers(site, triton):
    client = Client.from_config(site["config"], model=MODEL)
    assert client.runtime == "triton" and client.info.pid == triton.pid
    return collect(site, client)


def _key(info) -> str:
    return info.key_file.read_text().strip()


def _error(result) -> str:
    """Why a request was refused, whichever runtime and protocol answered."""
    return result.summary().split("\t", 3)[-1]


def _probs(result) -> list[float] | None:
    return list(result.probabilities.values()) if result.ok else None


def test_the_corpus_gets_the_same_statuses_and_probabilities_on_both_runtimes(
        site, torchserve_answers, triton_answers):
    from bad_inputs import check

    alone = {}
    for protocol in PROTOCOLS:
        ts, tr = torchserve_answers[("cases", protocol)], triton_answers[("cases", protocol)]
        for case, a, b in zip(site["cases"], ts, tr):
            assert (a.status, case.name) == (b.status, case.name), (protocol, b.summary())
            if a.ok:
                np.testing.assert_allclose(_probs(b), _probs(a), atol=PROBABILITY_ATOL,
                                           err_msg=case.name)
                assert b.policy_field("decision") == a.policy_field("decision"), case.name
                assert b.policy_field("prediction_set") == a.policy_field("prediction_set")
                assert b.policy_field("refer") == a.policy_field("refer"), case.name
                alone.setdefault(case.name, v2_as_plain(a))
            else:
                assert _error(b) == _error(a), case.name
        for case, result in zip(site["cases"], tr):
            if case.json_ok:  # the v2 form of the case (the others are JSON-level cases)
                check(case, result.status, v2_as_plain(result), alone)
    statuses = {r.status for r in triton_answers[("cases", "v2")]}
    assert 200 in statuses and len(statuses) >= 3, statuses


def test_every_dicom_syntax_and_the_ensemble_answer_alike(site, torchserve_answers,
                                                          triton_answers):
    if not site["syntax_files"]:
        pytest.skip("pydicom-data (RG1_UNCR.dcm) is not installed (test extra)")
    for kind in ("syntaxes", "ensemble"):
        for protocol in PROTOCOLS:
            pairs = zip(torchserve_answers[(kind, protocol)], triton_answers[(kind, protocol)])
            for a, b in pairs:
                assert a.status == b.status, (kind, protocol, a.file, b.summary())
                if a.ok:
                    np.testing.assert_allclose(_probs(b), _probs(a), atol=PROBABILITY_ATOL)
    weights = {o["name"]: o for o in triton_answers[("ensemble", "v2")][0].body["outputs"]}
    assert weights["learners"]["data"] and len(weights["learner_weights"]["data"]) == len(
        weights["learners"]["data"])


def test_fp32_tensors_and_explanations_answer_alike(torchserve_answers, triton_answers):
    (a_status, a), (b_status, b) = torchserve_answers["fp32"], triton_answers["fp32"]
    assert a_status == b_status == 200
    np.testing.assert_allclose(b, a, atol=PROBABILITY_ATOL)
    (a,), (b,) = torchserve_answers["explained"], triton_answers["explained"]
    assert a.ok and b.ok and a.overlay_png and b.overlay_png
    from io import BytesIO

    from PIL import Image
    assert Image.open(BytesIO(b.overlay_png)).size == Image.open(BytesIO(a.overlay_png)).size


def test_requests_without_the_key_are_refused(site, triton):
    info, key = triton, _key(triton)
    png = site["pngs"][:1]
    for wrong in (None, "wrong-key"):
        (rest,) = predict_v2(png, MODEL, url=info.inference_url, token=wrong)
        assert rest.status == 403 and rest.refused_key, rest.text
        (grpc,) = predict_v2_grpc(png, MODEL, target=info.grpc_inference, token=wrong,
                                  runtime="triton")
        assert grpc.refused_key and grpc.attempts == 1, grpc.text
        assert requests.get(f"{info.inference_url}/v2/models/{MODEL}", timeout=10,
                            headers={"authorization": f"Bearer {wrong}"} if wrong else {}
                            ).status_code == 403
    (ok,) = predict_v2(png, MODEL, url=info.inference_url, token=key)
    assert ok.ok
    # Health answers without a key (probes); model control is off even with the key.
    assert requests.get(f"{info.inference_url}/v2/health/ready", timeout=10).status_code == 200
    unload = requests.post(f"{info.inference_url}/v2/repository/models/{MODEL}/unload",
                           timeout=10, headers={"authorization": f"Bearer {key}"})
    assert unload.status_code != 200, unload.text
    assert requests.get(f"{info.inference_url}/v2/models/{MODEL}/ready", timeout=10,
                        headers={"authorization": f"Bearer {key}"}).status_code == 200
    # The key is its owner's alone.
    assert stat.S_IMODE(info.key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(info.key_file.parent.stat().st_mode) == 0o700


def test_every_listening_socket_is_loopback(triton):
    from flannel.handlers.triton_process import read_state

    # Triton (its stubs included) and the guard in front of its REST port.
    listening = listening_sockets(triton.pid, read_state(triton.workdir).guard_pid)
    ports = {c.laddr.port for c in listening}
    expected = {int(u.rsplit(":", 1)[1]) for u in (triton.inference_url, triton.metrics_url,
                                                   triton.grpc_inference)}
    assert expected <= ports, (expected, ports)
    assert all(loopback(c.laddr.ip) for c in listening), listening


def test_hostile_v2_requests_leave_their_batch_and_the_stub_alone(site, triton):
    """Malformed v2 requests sent beside good ones: each refused with a short 4xx naming its
    problem (by Triton's frontend or the model), the good ones answered, no stub restarted."""
    from concurrent.futures import ThreadPoolExecutor

    import psutil

    info, key = triton, _key(triton)
    stubs = {p.pid for p in psutil.Process(info.pid).children(recursive=True)}
    b64 = base64.b64encode(site["pngs"][0].read_bytes()).decode()
    good = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1], "data": [b64]}]}
    hostile = {
        "one-dimensional BYTES": {"inputs": [{**good["inputs"][0], "shape": [1]}]},
        "datatype a list": {"inputs": [{**good["inputs"][0], "datatype": []}]},
        "300,000-element shape": {"inputs": [{**good["inputs"][0], "shape": [1] * 300_000}]},
        "id of 2 MB": {**good, "id": "i" * 2_000_000},
        "33 images": {"inputs": [{**good["inputs"][0], "shape": [33, 1], "data": [b64] * 33}]},
        "unknown input": {"inputs": [{**good["inputs"][0], "name": "x"}]},
        "not base64 text": {"inputs": [{**good["inputs"][0], "data": ["%%%"]}]},
        "explain a list": {**good, "parameters": {"explain": "yes", "target": "nope"}},
    }
    url = f"{info.inference_url}/v2/models/{MODEL}/infer"
    headers = {"authorization": f"Bearer {key}"}
    outcomes = {}
    for name, body in hostile.items():
        with ThreadPoolExecutor(4) as pool:
            goods = [pool.submit(requests.post, url, json=good, headers=headers, timeout=60)
                     for _ in range(3)]
            bad = pool.submit(requests.post, url, json=body, headers=headers, timeout=60)
            assert all(f.result().status_code == 200 for f in goods), name
            answer = bad.result()
        outcomes[name] = (answer.status_code, answer.text[:160])
        # Triton's own JSON reader answers a body it cannot parse with 500, not 400.
        parse_error = answer.status_code == 500 and "Unable to parse" in answer.text
        assert 400 <= answer.status_code < 500 or parse_error, (name, answer.status_code,
                                                                answer.text[:300])
        # Triton's frontend refuses a malformed request before the model sees it, echoing the
        # shape it was sent (never more than the request itself); the model's refusals are short.
        sent = len(json.dumps(body))
        frontend = "[request id:" in answer.text or parse_error
        assert len(answer.content) < (sent + 2000 if frontend else 2000), (name, len(answer.content))
    print("\nhostile request -> status, answer:")
    for name, (status, text) in outcomes.items():
        print(f"  {name}: {status} {text}")
    assert {p.pid for p in psutil.Process(info.pid).children(recursive=True)} == stubs


def test_the_guard_keeps_json_bodies_that_crash_triton_away_and_large_files_answer(
        site, triton, tmp_path):
    """Triton 2.51's REST frontend dies on a JSON body near 4 MB, key or no key
    (flannel.handlers.triton_guard): the guard refuses one with 413 naming the remedy, and a
    radiograph-sized file sent as the client sends it (raw bytes, binary extension) answers."""
    from PIL import Image

    from flannel.handlers.triton_guard import JSON_BODY_LIMIT

    info, key = triton, _key(triton)
    big = base64.b64encode(np.random.default_rng(0).bytes(JSON_BODY_LIMIT)).decode()
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1], "data": [big]}]}
    for headers in ({}, {"authorization": f"Bearer {key}"}):
        answer = requests.post(f"{info.inference_url}/v2/models/{MODEL}/infer", json=body,
                               headers=headers, timeout=60)
        assert answer.status_code == 413 and "binary tensor extension" in answer.json()["error"]
    # A 2600 x 2600 16-bit PNG (13 MB): far over what JSON may carry to Triton.
    rng = np.random.default_rng(1)
    large = tmp_path / "large.png"
    Image.fromarray(rng.integers(0, 65535, (2600, 2600), dtype=np.uint16)).save(large)
    assert large.stat().st_size > 4 * JSON_BODY_LIMIT
    for protocol in PROTOCOLS:
        (result,) = Client.from_config(site["config"], model=MODEL).predict([large], protocol)
        assert result.ok, (protocol, result.summary())
    assert requests.get(f"{info.inference_url}/v2/health/ready", timeout=10).status_code == 200


def test_metrics_carry_triton_s_and_the_product_s_own(triton, triton_answers):
    text = requests.get(f"{triton.metrics_url}/metrics", timeout=10).text
    assert f'nv_inference_request_success{{model="{MODEL}",version="1"}}' in text
    for family in ("flannel_items_total", "flannel_items_refused_total",
                   "flannel_decode_ms_total", "flannel_batch_requests"):
        assert f'{family}' in text and f'model="{MODEL}"' in text, family
    assert f'flannel_items_total{{model="{MODEL}",status="200"}}' in text


def test_serve_cli_status_and_stop_leave_no_process(site, triton, triton_answers, capsys):
    import psutil

    from flannel.cli import main as flannel_main

    procs = [psutil.Process(triton.pid), *psutil.Process(triton.pid).children(recursive=True)]
    assert flannel_main(["serve", "status", "--config", str(site["config"])]) == 0
    assert f"Triton pid {triton.pid}" in capsys.readouterr().out
    assert flannel_main(["serve", "stop", "--config", str(site["config"])]) == 0
    assert "Triton stopped" in capsys.readouterr().out
    gone, alive = psutil.wait_procs(procs, timeout=10)
    assert not alive, alive
    assert flannel_main(["serve", "status", "--config", str(site["config"])]) == 3
    assert not triton.key_file.exists()


def test_an_export_is_archived_privately_and_served(site, torchserve_answers, tmp_path):
    """``flannel serve start --runtime triton --export RUN_DIR``: the run's export is archived
    with every check of `flannel archive` into a private store with its own trust list, and
    answers like the archive TorchServe served."""
    from flannel.cli import main as flannel_main
    from flannel.handlers.triton_process import state_dir, stop_triton
    from flannel.handlers.trust import TRUST_LIST_NAME

    (tmp_path / "empty").mkdir()
    config = loopback_config(tmp_path / "config.properties", tmp_path / "empty",
                             REPO / "config.properties")
    assert flannel_main(["serve", "start", "--config", str(config), "--export",
                         str(site["run"]), "--runtime", "triton"]) == 0
    try:
        folder = state_dir(config.parent)
        assert [p.name for p in (folder / "store").iterdir()] == [f"{MODEL}.mar"]
        assert (folder / TRUST_LIST_NAME).is_file()
        assert str(folder / TRUST_LIST_NAME) in (folder / "repository" / MODEL / "config.pbtxt"
                                                ).read_text()
        (result,) = Client.from_config(config).predict(site["pngs"][:1], protocol="v2")
        (served,) = torchserve_answers["explained"]
        np.testing.assert_allclose(_probs(result), _probs(served), atol=PROBABILITY_ATOL)
    finally:
        stop_triton(config)
    assert flannel_main(["serve", "start", "--config", str(config), "--export",
                         str(site["run"])]) == 2  # TorchServe serves archives from its store
