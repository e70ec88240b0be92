"""A real TorchServe on loopback and the trust list: what start refuses, what a restarted worker
refuses, what the management API cannot register, and what answers without a key.

    .venv/bin/pytest tests/test_archive_trust_integration.py -q

One server in the module. Before it starts, `start_server` is given a store holding an archive
that is not on the trust list, and must refuse it by name without launching anything; the real
start follows with the archive `flannel archive` listed. Worker restarts (kill -9) then load an
unpacked archive that was changed after start.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
import zipfile
from pathlib import Path

import pytest
import requests

from flannel.handlers import grpc_stubs
from flannel.handlers.archive import ArchiveSettings, build_archive
from flannel.handlers.client import predict_http
from flannel.handlers.keys import read_tokens
from flannel.handlers.management import describe_model, worker_pids
from flannel.handlers.trust import TRUST_LIST_NAME, TrustError, check_model_store
from flannel.handlers.ts_config import ServeError, loopback_config, read_pid
from flannel.handlers.ts_process import start_server, stop_server
from run_fixtures import add_tiny_external_evaluation, make_tiny_run

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("java") is None,
                                 reason="TorchServe needs Java 17 and `java` is not on PATH")]

REPO = Path(__file__).resolve().parents[1]
MODEL = "resnet18"
START_TIMEOUT_S = 150
# Seconds for TorchServe to start a replacement worker and for it to load or refuse: about 6 s
# here, plus TorchServe's back-off between failed loads (1, 1, 2, 3, 5 ... s).
WORKER_TIMEOUT_S = 90
# What /metrics shows without a key on TorchServe 0.12 (SECURITY.md): host gauges, request
# counters, per-worker load times, frontend latency counters, the handler's own metrics.
DOCUMENTED_METRICS = {
    "CPUUtilization", "DiskAvailable", "DiskUsage", "DiskUtilization", "MemoryAvailable",
    "MemoryUsed", "MemoryUtilization", "Requests2XX", "Requests4XX", "Requests5XX",
    "WorkerLoadTime", "WorkerThreadTime", "QueueTime", "ts_inference_latency_microseconds",
    "ts_queue_latency_microseconds", "ts_inference_requests_total", "HandlerTime",
    "PredictionTime"}


def rewrite_mar(src: Path, dest: Path, replace: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, replace.get(info.filename, zin.read(info)))
    return dest


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(ServerInfo, root, the refusal of the first start); always stops the server."""
    from flannel.export.onnx_export import export_onnx
    from flannel.export.parity import run_parity

    root = tmp_path_factory.mktemp("trusted")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(grpc_stubs.CACHE_ENV, str(root / "grpc"))
        mp.delenv("FLANNEL_TRUST_LIST", raising=False)
        run = make_tiny_run(root, arch=MODEL, crop=64)
        export_onnx(run)
        run_parity(run)
        add_tiny_external_evaluation(run)
        store = root / "model_store"
        mar = build_archive(run, store, settings=ArchiveSettings(
            batch_size=1, max_batch_delay_ms=5, workers=1, intra_op_threads=1))
        config = loopback_config(root / "config.properties", store, REPO / "config.properties")
        rewrite_mar(mar, store / "intruder.mar", {"model-config.yaml": b"minWorkers: 4\n"})
        with pytest.raises(ServeError) as refused:
            start_server(config, timeout=START_TIMEOUT_S)
        launched = read_pid(root) is not None or (root / "logs" / "ts_log.log").exists()
        (store / "intruder.mar").unlink()
        try:
            info = start_server(config, timeout=START_TIMEOUT_S)
            yield info, root, str(refused.value), launched
        finally:
            stop_server(config)


def management_headers(info) -> dict:
    return {"Authorization": f"Bearer {read_tokens(info.key_file)['management']}"}


def unpacked_dir(root: Path) -> Path:
    """The folder TorchServe unpacked the archive into (under its java.io.tmpdir, logs/run)."""
    (manifest,) = (root / "logs" / "run" / "models").glob("*/MAR-INF/MANIFEST.json")
    return manifest.parent.parent


def ready_workers(info) -> list[int]:
    try:
        desc = describe_model(info, read_tokens(info.key_file)["management"], MODEL)
    except (requests.RequestException, KeyError, ValueError):
        return []
    return [int(w["pid"]) for v in desc for w in v.get("workers", []) if w["status"] == "READY"]


def restart_worker(info) -> None:
    (pid,) = worker_pids(info, MODEL)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while pid in ready_workers(info) and time.monotonic() < deadline:
        time.sleep(0.2)


def wait_for(predicate, what: str, timeout: float = WORKER_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def model_log(root: Path) -> str:
    return (root / "logs" / "model_log.log").read_text(errors="replace")


def test_start_refuses_an_untrusted_archive_by_name_before_launching_anything(served):
    info, root, refusal, launched = served
    assert "intruder.mar: sha256" in refusal and "no archive of this name is listed" in refusal
    assert str(root / TRUST_LIST_NAME) in refusal and "resnet18.mar" not in refusal
    assert not launched
    assert ready_workers(info)  # the store holding only the listed archive then started


def test_the_worker_loaded_the_listed_archive_and_answers(served, tmp_path):
    info, root, _, _ = served
    assert re.search(rf"matches resnet18.mar on the trust list {re.escape(str(root))}/"
                     rf"{TRUST_LIST_NAME}", model_log(root))
    # No bytecode beside the handler: the worker would refuse it as an extra file at restart.
    assert not (unpacked_dir(root) / "__pycache__").exists()
    png = tmp_path / "x.png"
    from PIL import Image
    Image.new("L", (64, 64), 128).save(png)
    (answer,) = predict_http([png], MODEL, url=info.inference_url,
                             token=read_tokens(info.key_file)["inference"])
    assert answer.status == 200 and answer.body["model"] == MODEL


def test_registration_is_refused_over_http_and_grpc_even_with_the_management_key(served):
    """Models and workflows, from a URL outside the store, inside it, or remote: refused. The
    model API is off; TorchServe 0.12 does not apply enable_model_api to workflows, so for them
    allowed_urls=(?!) is what refuses; its gRPC management service has no workflow method."""
    import grpc

    info, root, _, _ = served
    headers = management_headers(info)
    outside = root / "elsewhere" / "model_store"
    outside.mkdir(parents=True)
    shutil.copy(info.model_store / f"{MODEL}.mar", outside / "copy.mar")
    urls = ["https://example.com/evil.mar", f"file://{outside}/copy.mar",
            f"file://{info.model_store}/{MODEL}.mar"]
    for url in urls:
        r = requests.post(f"{info.management_url}/models", params={"url": url}, headers=headers,
                          timeout=10)
        assert r.status_code == 405 and r.json()["type"] == "MethodNotAllowedException", r.text
        r = requests.post(f"{info.management_url}/workflows", params={"url": url},
                          headers=headers, timeout=10)
        assert r.status_code == 404 and "does not match any allowed URL" in r.json()["message"]
    stubs = grpc_stubs.load_stubs()
    service = stubs["management_pb2"].DESCRIPTOR.services_by_name["ManagementAPIsService"]
    assert not [m.name for m in service.methods if "orkflow" in m.name]
    metadata = [("authorization", headers["Authorization"])]
    with grpc.insecure_channel(info.grpc_management) as channel:
        stub = stubs["management_pb2_grpc"].ManagementAPIsServiceStub(channel)
        for url in urls:
            with pytest.raises(grpc.RpcError) as err:
                stub.RegisterModel(stubs["management_pb2"].RegisterModelRequest(url=url),
                                   metadata=metadata, timeout=10)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value.details()
        workflow = channel.unary_unary(f"/{service.full_name}/RegisterWorkflow",
                                       request_serializer=lambda m: m.SerializeToString())
        with pytest.raises(grpc.RpcError) as err:
            workflow(stubs["management_pb2"].RegisterModelRequest(url=urls[0]),
                     metadata=metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    listing = requests.get(f"{info.management_url}/models", headers=headers, timeout=10).json()
    assert [m["modelName"] for m in listing["models"]] == [MODEL]
    flows = requests.get(f"{info.management_url}/workflows", headers=headers, timeout=10).json()
    assert flows == {"workflows": []}


def test_what_answers_without_a_key_is_what_security_md_says(served):
    """The OpenAPI description on every port (routes and TorchServe's version, no model names),
    and the metrics port; everything else needs a key."""
    info, _, _, _ = served
    for base in (info.inference_url, info.management_url, info.metrics_url):
        for r in (requests.options(base + "/", timeout=10),
                  requests.get(base + "/api-description", timeout=10)):
            assert r.status_code == 200, (base, r.text[:200])
            description = r.json()
            assert description["info"]["version"] == "0.12.0" and description["paths"]
            assert MODEL not in r.text
    for url in (f"{info.inference_url}/ping", f"{info.inference_url}/predictions/{MODEL}",
                f"{info.management_url}/models"):
        for r in (requests.get(url, timeout=10), requests.options(url, timeout=10)):
            assert r.status_code == 400 and r.json()["type"] == "InvalidKeyException", url
    text = requests.get(f"{info.metrics_url}/metrics", timeout=10).text
    families = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
                if line and not line.startswith("#")}
    undocumented = {f for f in families - DOCUMENTED_METRICS if not f.startswith("Flannel")}
    assert not undocumented, f"/metrics shows {sorted(undocumented)}, not in SECURITY.md"
    assert {"CPUUtilization", "MemoryUsed", "WorkerLoadTime"} <= families
    assert re.search(r'Hostname="[^"]+"', text)  # the host's name
    assert re.search(rf'WorkerName="W-\d+-{MODEL}_1.0"', text)  # model name and version
    keys = read_tokens(info.key_file)
    assert not any(k in text for k in keys.values())


def test_a_mar_swapped_after_start_is_not_what_a_worker_loads_and_the_next_start_refuses_it(
        served):
    """TorchServe unpacks each archive once, at start: a .mar replaced in the store afterwards
    is not what a restarted worker loads (it loads the unpacked, listed files), and the next
    start refuses the replacement by name."""
    info, root, _, _ = served
    mar = info.model_store / f"{MODEL}.mar"
    good = mar.read_bytes()
    rewrite_mar(mar, mar.with_suffix(".new"), {"model-config.yaml": b"minWorkers: 4\n"})
    os.replace(mar.with_suffix(".new"), mar)
    try:
        before = model_log(root).count(f"matches {MODEL}.mar on the trust list")
        restart_worker(info)
        wait_for(lambda: ready_workers(info), "a READY worker after the swap")
        assert model_log(root).count(f"matches {MODEL}.mar on the trust list") == before + 1
        with pytest.raises(TrustError, match=rf"{MODEL}.mar: sha256 .*changed: model-config.yaml"):
            check_model_store(info.model_store)
    finally:
        mar.write_bytes(good)
    assert check_model_store(info.model_store)


def test_a_restarted_worker_refuses_an_unpacked_archive_changed_after_start(served):
    """A `flannel` package planted in the unpacked folder is never imported (the handler takes
    its folder off the path first) and is refused as an extra file; class names swapped with a
    manifest rewritten to match (which the archive's own manifest check would accept) are
    refused by the trust list. Restored, the next worker loads again."""
    info, root, _, _ = served
    model_dir = unpacked_dir(root)
    marker = root / "planted-code-ran"
    planted = model_dir / "flannel"
    planted.mkdir()
    (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    try:
        restart_worker(info)
        wait_for(lambda: "extra: flannel/__init__.py" in model_log(root),
                 "the worker's refusal of the planted package")
        assert not ready_workers(info) and not marker.exists()
        assert re.search(r"refusing to load .*: its files are not those of any archive on the "
                         r"trust list .*closest is resnet18.mar", model_log(root))
    finally:
        shutil.rmtree(planted)
    wait_for(lambda: ready_workers(info), "a READY worker once the folder is restored")

    names_path, manifest_path = model_dir / "index_to_name.json", model_dir / "manifest.json"
    names_bytes, manifest_bytes = names_path.read_bytes(), manifest_path.read_bytes()
    names = json.loads(names_bytes)
    names["0"], names["1"] = names["1"], names["0"]
    names_path.write_text(json.dumps(names))
    manifest = json.loads(manifest_bytes)
    import hashlib
    manifest["artifacts"]["index_to_name"]["sha256"] = hashlib.sha256(
        names_path.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    try:
        restart_worker(info)
        wait_for(lambda: "changed: index_to_name.json, manifest.json" in model_log(root),
                 "the worker's refusal of the swapped class names")
        assert not ready_workers(info)
    finally:
        names_path.write_bytes(names_bytes)
        manifest_path.write_bytes(manifest_bytes)
    wait_for(lambda: ready_workers(info), "a READY worker once the class names are restored")
