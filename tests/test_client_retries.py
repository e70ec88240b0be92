"""The client's retries against local fakes: an ``http.server`` that answers as scripted (503
with Retry-After, a closed connection, a slow answer, "Worker died", refusals) and an in-process
gRPC server behind TorchServe's real stubs.

    .venv/bin/pytest tests/test_client_retries.py -q

The retry loop's pauses are recorded instead of slept (``client._pause``), so these tests check
which answers are retried and how long the client would wait, not how fast anything runs.
"""
from __future__ import annotations

import email.utils
import json
import os
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from flannel.handlers import client
from flannel.handlers.client import (NO_RETRY, Client, RetryPolicy, explain_http, predict_grpc,
                                     predict_http)
from flannel.handlers.ts_config import server_info

OK = {"prediction": "Normal", "probabilities": {"Normal": 1.0}}
REFUSED_KEY = {"code": 400, "type": "InvalidKeyException",
               "message": "Token Authorization failed. Token either incorrect, expired, or not provided correctly"}


class FakeServer:
    """Answers each request by the next step scripted for its body (the file's bytes):
    ``(status, body, headers)``, ``"close"`` (drop the connection unanswered) or
    ``("slow", seconds)`` (answer 200 after that long); 200 once a script is used up. Keys:
    requests with a key not in ``keys`` are refused like TorchServe refuses them."""

    def __init__(self) -> None:
        self.scripts: dict[bytes, list] = {}
        self.hits: Counter = Counter()
        self.keys = {"key"}
        self.key_file: Path | None = None
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # the management API's /token?type=inference
                assert self.path.startswith("/token") and fake.key_file is not None
                data = json.loads(fake.key_file.read_text())
                if self.headers.get("Authorization") != f"Bearer {data['API']['key']}":
                    return self._answer(400, REFUSED_KEY)
                data["inference"]["key"] = "renewed"
                fake.keys = {"renewed"}
                fake.key_file.write_text(json.dumps(data))
                self._answer(200, {"message": "renewed"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path.startswith("/explanations"):
                    body = json.loads(body)["image"].encode()
                with fake.lock:
                    fake.hits[body] += 1
                    script = fake.scripts.get(body, [])
                    step = script.pop(0) if script else (200, OK, {})
                if self.headers.get("Authorization", "")[len("Bearer "):] not in fake.keys:
                    return self._answer(400, REFUSED_KEY)
                if step == "close":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if step[0] == "slow":
                    time.sleep(step[1])
                    step = (200, OK, {})
                self._answer(*step)

            def _answer(self, status, body, headers=None):
                data = json.dumps(body).encode() if not isinstance(body, str) else body.encode()
                try:
                    self.send_response(status)
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # a slow answer the client stopped waiting for

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake():
    server = FakeServer()
    yield server
    server.close()


@pytest.fixture
def pauses(monkeypatch):
    waited: list[float] = []
    monkeypatch.setattr(client, "_pause", waited.append)
    return waited


def image(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(name.encode())
    return path


def predict(fake, files, **kw):
    return predict_http(files, "m", url=fake.url, token="key", **kw)


def test_503_with_retry_after_then_an_answer(fake, pauses, tmp_path):
    a = image(tmp_path, "a.png")
    fake.scripts[b"a.png"] = [(503, {"message": "queue full"}, {"Retry-After": "3"})]
    (result,) = predict(fake, [a])
    assert result.ok and result.attempts == 2 and fake.hits[b"a.png"] == 2
    assert pauses and pauses[0] >= 3.0  # Retry-After is a floor under the jittered pause


def test_a_proxy_at_its_connection_cap_and_a_handler_bound_are_retried(fake, pauses, tmp_path):
    """502/504 (a proxy in front: its upstream at max_conns, or slow) and the handler's 503 for a
    batch past its image bound are answered by sending again; a 500 with an error id is not."""
    files = [image(tmp_path, n) for n in ("p.png", "g.png", "h.png", "bug.png")]
    fake.scripts[b"p.png"] = [(502, {"message": "Bad Gateway"}, {})]
    fake.scripts[b"g.png"] = [(504, {"message": "Gateway Timeout"}, {})]
    fake.scripts[b"h.png"] = [(503, {"code": 503, "error": "ServerBusy: ... retry"}, {})]
    fake.scripts[b"bug.png"] = [(500, {"code": 500, "error": "InternalError: (error id 0a1b2c3d)",
                                       "error_id": "0a1b2c3d"}, {})]
    results = predict(fake, files)
    assert [r.status for r in results] == [200, 200, 200, 500]
    assert [r.attempts for r in results] == [2, 2, 2, 1]


def test_a_closed_connection_a_worker_that_died_and_a_slow_answer_are_retried(fake, pauses,
                                                                              tmp_path):
    closed, died, slow = (image(tmp_path, n) for n in ("closed.png", "died.png", "slow.png"))
    fake.scripts[b"closed.png"] = ["close"]
    fake.scripts[b"died.png"] = [(500, {"code": 500, "message": "Worker died."}, {})]
    fake.scripts[b"slow.png"] = [("slow", 3.0)]
    results = predict(fake, [closed, died, slow], timeout=1.0)
    assert [(r.ok, r.attempts) for r in results] == [(True, 2)] * 3, [r.text for r in results]
    assert [fake.hits[f.name.encode()] for f in (closed, died, slow)] == [2, 2, 2]


def test_other_answers_are_never_retried(fake, pauses, tmp_path):
    cases = {"bad.png": (400, {"code": 400, "type": "DecodeError"}, {}),
             "big.png": (413, {"code": 413}, {}),
             "busy.png": (429, {"code": 429, "type": "ExplanationBudget"}, {}),
             "bug.png": (500, {"code": 500, "error": "internal error id 1f3a"}, {})}
    files = []
    for name, step in cases.items():
        fake.scripts[name.encode()] = [step]
        files.append(image(tmp_path, name))
    results = predict(fake, files)
    assert [r.status for r in results] == [400, 413, 429, 500]
    assert all(r.attempts == 1 for r in results) and not pauses
    assert all(fake.hits[n.encode()] == 1 for n in cases)
    (refused,) = predict_http(files[:1], "m", url=fake.url, token="wrong")
    assert refused.refused_key and refused.attempts == 1


def test_retries_are_bounded_by_attempts_and_the_backoff_by_its_cap(fake, pauses, tmp_path):
    a = image(tmp_path, "a.png")
    fake.scripts[b"a.png"] = [(503, {"message": "queue full"}, {})] * 20
    policy = RetryPolicy(attempts=6, base_s=0.5, cap_s=2.0, deadline_s=600)
    (result,) = predict(fake, [a], retry=policy)
    assert result.status == 503 and result.attempts == 6 == fake.hits[b"a.png"]
    assert len(pauses) == 5
    assert all(0 <= p <= min(2.0, 0.5 * 2 ** i) for i, p in enumerate(pauses)), pauses
    fake.hits.clear()
    (once,) = predict(fake, [a], retry=NO_RETRY)
    assert once.status == 503 and once.attempts == 1 == fake.hits[b"a.png"]


def test_retry_after_is_capped_and_the_deadline_stops_retrying(fake, pauses, tmp_path):
    a = image(tmp_path, "a.png")
    fake.scripts[b"a.png"] = [(503, {}, {"Retry-After": "1000"})] * 3
    (result,) = predict(fake, [a], retry=RetryPolicy(attempts=5, deadline_s=100,
                                                     retry_after_cap_s=30))
    assert result.ok and pauses == [30.0] * 3
    pauses.clear()
    fake.scripts[b"a.png"] = [(503, {}, {"Retry-After": "1000"})] * 3
    (late,) = predict(fake, [a], retry=RetryPolicy(attempts=5, deadline_s=20,
                                                   retry_after_cap_s=30))
    assert late.status == 503 and late.attempts == 1 and not pauses


def test_retry_after_as_an_http_date():
    later = email.utils.formatdate(time.time() + 120, usegmt=True)
    assert 100 < client._retry_after(later) <= 120
    assert client._retry_after("7") == 7.0 and client._retry_after("soon") is None
    assert client._retry_after(email.utils.formatdate(time.time() - 60, usegmt=True)) == 0.0


def test_an_unreadable_file_is_reported_alone_and_the_others_sent(fake, pauses, tmp_path):
    good = image(tmp_path, "good.png")
    folder = tmp_path / "folder.png"
    folder.mkdir()
    unreadable = [tmp_path / "missing.png", folder]
    if os.geteuid() != 0:  # root reads any file whatever its mode
        locked = image(tmp_path, "locked.png")
        locked.chmod(0)
        unreadable.append(locked)
    results = predict(fake, [unreadable[0], good, *unreadable[1:]])
    assert results[1].ok and results[1].file == str(good)
    bad = [results[0], *results[2:]]
    assert [r.file for r in bad] == [str(p) for p in unreadable]
    assert all(r.status == client.UNREADABLE and "cannot read" in r.text and r.attempts == 1
               for r in bad), [r.text for r in bad]
    assert set(fake.hits) == {b"good.png"}
    assert "No such file" in bad[0].text and "directory" in bad[1].text


def test_explanations_retry_429(fake, pauses, tmp_path):
    a = image(tmp_path, "a.png")
    import base64

    key = base64.b64encode(b"a.png")
    fake.scripts[key] = [(429, {"code": 429, "type": "ExplanationBudget"}, {})] * 2
    (result,) = explain_http([a], "m", url=fake.url, token="key")
    assert result.ok and result.attempts == 3 and fake.hits[key] == 3


def test_a_renewed_key_resends_only_the_files_it_refused(fake, pauses, tmp_path):
    """The key was renewed elsewhere while a list was in flight: the server took it for `a` and
    refused it for `b`; the client renews once and sends only `b` again."""
    config = tmp_path / "config.properties"
    config.write_text(f"inference_address={fake.url}\nmanagement_address={fake.url}\n")
    info = server_info(config)
    fake.key_file = info.key_file
    info.key_file.write_text(json.dumps({"inference": {"key": "key"},
                                         "management": {"key": "m"}, "API": {"key": "api"}}))
    a, b = image(tmp_path, "a.png"), image(tmp_path, "b.png")
    fake.scripts[b"b.png"] = [(400, REFUSED_KEY, {})]
    results = Client(info, model="m").predict([a, b])
    assert [r.ok for r in results] == [True, True], [r.text for r in results]
    assert fake.hits == {b"a.png": 1, b"b.png": 2}
    assert json.loads(info.key_file.read_text())["inference"]["key"] == "renewed"


@pytest.fixture
def grpc_fake():
    """TorchServe's Predictions over a real gRPC server: per request body, the next scripted
    step (a status code to abort with, or "slow"), then an answer."""
    from concurrent import futures

    import grpc

    from flannel.handlers.grpc_stubs import load_stubs

    stubs = load_stubs()
    scripts: dict[bytes, list] = {}
    hits: Counter = Counter()

    class Servicer(stubs["inference_pb2_grpc"].InferenceAPIsServiceServicer):
        def Predictions(self, request, context):
            data = request.input["data"]
            hits[data] += 1
            step = scripts.get(data, []).pop(0) if scripts.get(data) else None
            if step == "slow":
                time.sleep(3.0)
            elif step is not None:
                context.abort(step, "scripted")
            return stubs["inference_pb2"].PredictionResponse(prediction=json.dumps(OK).encode())

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    stubs["inference_pb2_grpc"].add_InferenceAPIsServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", scripts, hits
    server.stop(0)


def test_grpc_unavailable_and_deadline_are_retried_other_codes_not(grpc_fake, pauses, tmp_path):
    import grpc

    target, scripts, hits = grpc_fake
    down, late, bad = (image(tmp_path, n) for n in ("down.png", "late.png", "bad.png"))
    scripts[b"down.png"] = [grpc.StatusCode.UNAVAILABLE] * 2
    scripts[b"late.png"] = ["slow"]
    scripts[b"bad.png"] = [grpc.StatusCode.INVALID_ARGUMENT]
    results = predict_grpc([down, late, bad], "m", target=target, token="key", timeout=1.0)
    assert [(r.status, r.attempts) for r in results] == [(200, 3), (200, 2), (400, 1)]
    assert hits == {b"down.png": 3, b"late.png": 2, b"bad.png": 1}
