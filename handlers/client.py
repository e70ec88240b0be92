"""Clients for a running TorchServe: send image files over HTTP or gRPC, keep every answer.

    flannel predict a.png b.dcm --model resnet18 --protocol grpc

Errors are results, not exceptions: a list of files comes back as one ``PredictResult`` per file,
in order, each with its status code and parsed JSON, so one bad file never hides the others'
answers. Files are sent concurrently so that TorchServe can batch them.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

DEFAULT_HTTP_URL = "http://127.0.0.1:8080"
DEFAULT_GRPC_TARGET = "127.0.0.1:7070"
# Seconds per request: above the server's batch delay plus a cold first batch, below the archive's
# responseTimeout (120 s) so a hung server is reported rather than waited on forever.
DEFAULT_TIMEOUT_S = 60.0
# Concurrent requests: one full TorchServe batch (the archive's default batchSize).
MAX_CONCURRENCY = 8
# gRPC status -> the HTTP code TorchServe would have answered over REST.
_GRPC_TO_HTTP = {"OK": 200, "INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401,
                 "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 413,
                 "INTERNAL": 500, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}


@dataclass
class PredictResult:
    """The answer for one file.

    Attributes:
        file: the file sent.
        status: HTTP status (for gRPC: the item's code from the JSON body, or the gRPC status
            mapped to its HTTP equivalent when the call itself failed).
        body: parsed JSON answer, or None when the answer was not JSON.
        text: the raw answer text (or the gRPC error details).
    """

    file: str
    status: int
    body: dict | None
    text: str

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def refused_key(self) -> bool:
        """TorchServe refused the key (missing, wrong or expired: it does not say which)."""
        return (self.status in (400, 401, 403) and
                ("InvalidKeyException" in self.text or "Token Authorization failed" in self.text))

    def summary(self) -> str:
        """One line: file, status and the prediction or the error."""
        if self.ok and self.body and "prediction" in self.body:
            p = self.body["probabilities"][self.body["prediction"]]
            line = f"{self.file}\t{self.status}\t{self.body['prediction']}\t{p:.4f}"
            weights = self.body.get("learner_weights")
            if weights:
                line += "\tlearner weights " + " ".join(f"{n} {w:.2f}" for n, w in weights.items())
            return line
        reason = (self.body or {}).get("error") or (self.body or {}).get("message") or self.text
        return f"{self.file}\t{self.status}\terror\t{reason}"


def _parse(text: str) -> dict | None:
    try:
        body = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def _map_files(fn: Callable[[str], PredictResult], files: Sequence[str | Path]) -> list[PredictResult]:
    with ThreadPoolExecutor(max_workers=max(1, min(MAX_CONCURRENCY, len(files)))) as pool:
        return list(pool.map(fn, [str(f) for f in files]))


def predict_http(files: Sequence[str | Path], model_name: str, *, url: str = DEFAULT_HTTP_URL,
                 token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> list[PredictResult]:
    """POST each file's bytes to ``{url}/predictions/{model_name}``.

    Args:
        files: image files (PNG, JPEG, DICOM), sent as raw bodies.
        model_name: the served model.
        url: inference address.
        token: inference key; sent as ``Authorization: Bearer <key>``.
        timeout: seconds per request.

    Returns:
        One result per file, in order.
    """
    import requests

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    endpoint = f"{url.rstrip('/')}/predictions/{model_name}"

    def send(path: str) -> PredictResult:
        try:
            r = requests.post(endpoint, data=Path(path).read_bytes(), headers=headers, timeout=timeout)
        except requests.RequestException as exc:
            return PredictResult(path, 0, None, f"request failed: {exc}")
        return PredictResult(path, r.status_code, _parse(r.text), r.text)

    return _map_files(send, files)


def predict_grpc(files: Sequence[str | Path], model_name: str, *,
                 target: str = DEFAULT_GRPC_TARGET, token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S) -> list[PredictResult]:
    """Call ``InferenceAPIsService.Predictions`` once per file with input ``{"data": bytes}``.

    TorchServe 0.12 answers gRPC with status OK even when the handler set a 4xx for the item, so
    the item's status is read from the ``code`` of the handler's JSON error body.

    Args:
        files: image files, sent as raw bytes.
        model_name: the served model.
        target: gRPC inference address host:port.
        token: inference key; sent as ``authorization: Bearer <key>`` metadata.
        timeout: seconds per call.

    Returns:
        One result per file, in order.
    """
    import grpc

    from flannel.handlers.grpc_stubs import load_stubs

    stubs = load_stubs()
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(target) as channel:
        stub = stubs["inference_pb2_grpc"].InferenceAPIsServiceStub(channel)

        def send(path: str) -> PredictResult:
            request = stubs["inference_pb2"].PredictionsRequest(
                model_name=model_name, input={"data": Path(path).read_bytes()})
            try:
                reply = stub.Predictions(request, metadata=metadata, timeout=timeout)
            except grpc.RpcError as exc:
                status = _GRPC_TO_HTTP.get(exc.code().name, 500)
                return PredictResult(path, status, _parse(exc.details() or ""), exc.details() or "")
            text = reply.prediction.decode("utf-8", errors="replace")
            body = _parse(text)
            status = int(body.get("code", 400)) if body is not None and "error" in body else 200
            return PredictResult(path, status, body, text)

        return _map_files(send, files)
