"""Clients for a running TorchServe: send image files, keep every answer.

    flannel predict a.png b.dcm --model resnet18 --protocol grpc

    from flannel.handlers.client import Client
    client = Client.from_config("config.properties")     # addresses and key from the config
    for r in client.predict(["a.png", "b.dcm"], protocol="v2"):
        print(r.file, r.status, r.prediction, r.probabilities)
    [r] = client.explain(["a.png"], target="COVID-19")   # Grad-CAM overlay in r.overlay_png

Protocols: ``http`` (``/predictions``), ``grpc`` (TorchServe's ``Predictions``), ``v2`` (Open
Inference Protocol over REST) and ``v2-grpc`` (its gRPC ``ModelInfer``). The v2 protocols reach
either runtime (``flannel serve start --runtime torchserve|triton``) with the same requests;
what differs over gRPC (TorchServe's service name, its quoted BYTES outputs and option inputs;
Triton's raw output contents) is decided by the runtime the ``ServerInfo`` names. Errors are results, not
exceptions: a list of files comes back as one ``PredictResult`` per file, in order, each with its
status code and parsed JSON, so one bad file never hides the others' answers; a file that cannot
be read (missing, not permitted, a folder) is reported with status 0 and "cannot read" and never
sent, and the others still are. Files are sent concurrently so that TorchServe can batch them.

Predictions are idempotent, so a file that got no usable answer is sent again, under a
``RetryPolicy`` (``DEFAULT_RETRY``; ``NO_RETRY`` sends once):

- retried: no answer at all (connection refused, reset or closed; the client's own timeout,
  which is how TorchServe 0.12 leaves requests it was batching into a worker that died), 503
  (queue full, worker restarting, a handler call's bound reached; gRPC ``UNAVAILABLE``), 502 and
  504 from a proxy in front, a 5xx saying "Worker died", and for
  explanations 429 (the per-batch explanation budget was spent);
- never retried: any other answer, 4xx included. A refused key is renewed from the key file
  instead, and only the files it refused are sent again.
- pauses: full jitter, uniform in [0, min(``cap_s``, ``base_s`` * 2^(n-1))] before try n+1, and
  at least the server's ``Retry-After`` (up to ``retry_after_cap_s``); at most ``attempts``
  tries and ``deadline_s`` seconds per file, each try's timeout cut to what is left of it.

``PredictResult.attempts`` says how many tries a file took.
"""
from __future__ import annotations

import base64
import datetime as _dt
import json
import logging
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Callable, Sequence

log = logging.getLogger(__name__)

DEFAULT_HTTP_URL = "http://127.0.0.1:8080"
DEFAULT_GRPC_TARGET = "127.0.0.1:7070"
# Seconds per request: above the server's batch delay plus a cold first batch, below the archive's
# responseTimeout (120 s) so a hung server is reported rather than waited on forever.
DEFAULT_TIMEOUT_S = 60.0
# The request option asking for DICOM results (flannel.handlers.dicom_out.OPTION; that module is
# the server's and is not imported by the client).
DICOM_OUT = "dicom_out"
# Concurrent requests: one full TorchServe batch (the archive's default batchSize).
MAX_CONCURRENCY = 8
# gRPC status -> the HTTP code TorchServe would have answered over REST.
_GRPC_TO_HTTP = {"OK": 200, "INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401,
                 "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 413,
                 "INTERNAL": 500, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}
# The v2 gRPC service: TorchServe 0.12 names it in its own package; Triton and KServe use the
# protocol's ("inference"). The messages are the same.
V2_GRPC_SERVICES = {"torchserve": "org.pytorch.serve.grpc.openinference.GRPCInferenceService",
                    "triton": "inference.GRPCInferenceService"}
# A refusal's status where the runtime cannot answer it as such: Triton answers any error 400,
# 500 or 503, so the served model puts the status first in its message
# (flannel.handlers.triton_model.error_message), after Triton's request-id prefix if any.
_STATUS_FIRST = re.compile(r"^(?:\[request id: [^\]]*\] )?([1-5]\d\d): ")
# What Triton's restricted APIs answer a request without the right key (REST, gRPC).
TRITON_KEY_REFUSED = ("This API is restricted", "This protocol is restricted")
# Triton's gRPC frontend reads a restricted protocol's header under this prefix.
TRITON_GRPC_KEY_PREFIX = "triton-grpc-protocol-"
# gRPC calls that got no answer from a worker: the server was unreachable or the client's own
# deadline passed.
_GRPC_NO_ANSWER = ("UNAVAILABLE", "DEADLINE_EXCEEDED")

# Retries (RetryPolicy). Tries per file, the first included.
RETRY_ATTEMPTS = 5
# Statuses that say "not now": 503 from TorchServe (queue full, worker restarting) and from the
# handler (a batch's image or decoding bound), 502 and 504 from a proxy in front (its upstream at
# max_conns, or slow); the request was not answered, so sending it again is safe.
RETRIED_STATUSES = frozenset({502, 503, 504})
# Bound of the first pause: a full queue (503) drains in about one batch delay (1 s here).
RETRY_BASE_S = 0.5
# No pause longer than this: TorchServe restarts a dead worker in about 6 s here (SECURITY.md).
RETRY_CAP_S = 8.0
# A server's Retry-After is honoured up to this.
RETRY_AFTER_CAP_S = 30.0
# All tries of one file: one full DEFAULT_TIMEOUT_S try lost in a dead worker's batch, the
# worker's restart and two more tries fit.
RETRY_DEADLINE_S = 180.0
# A try is only worth making with at least this much of the deadline left.
MIN_TRY_S = 1.0
# 5xx answers retried whatever their code: TorchServe's text for jobs of a worker that died.
WORKER_DIED = "Worker died"
# Status of a file that could not be read: it was never sent.
UNREADABLE = 0


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a file without a usable answer is sent again (module docstring).

    Attributes:
        attempts: tries per file, the first included (1: never retry).
        base_s: bound of the first pause; each later bound doubles.
        cap_s: the largest pause bound.
        deadline_s: seconds for all tries of one file, pauses included.
        retry_after_cap_s: a server's ``Retry-After`` is honoured up to this.
    """

    attempts: int = RETRY_ATTEMPTS
    base_s: float = RETRY_BASE_S
    cap_s: float = RETRY_CAP_S
    deadline_s: float = RETRY_DEADLINE_S
    retry_after_cap_s: float = RETRY_AFTER_CAP_S

    def pause(self, tries: int, retry_after: float | None = None) -> float:
        """Seconds to wait after ``tries`` failed tries: full jitter, uniform in
        [0, min(cap_s, base_s * 2**(tries-1))], raised to the server's ``Retry-After`` (capped)."""
        pause = random.uniform(0.0, min(self.cap_s, self.base_s * 2 ** (tries - 1)))
        if retry_after is not None:
            pause = max(pause, min(retry_after, self.retry_after_cap_s))
        return pause


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(attempts=1)
# How the retry loop waits (tests record the pauses instead).
_pause = time.sleep


@dataclass
class PredictResult:
    """The answer for one file.

    Attributes:
        file: the file sent.
        status: HTTP status (for gRPC: the item's code from the JSON body, or the gRPC status
            mapped to its HTTP equivalent when the call itself failed).
        body: parsed JSON answer, or None when the answer was not JSON.
        text: the raw answer text (or the gRPC error details).
        attempts: tries it took (``RetryPolicy``).
        no_answer: nothing came back: the connection failed or the client's timeout passed.
        retry_after: the answer's ``Retry-After``, in seconds.
    """

    file: str
    status: int
    body: dict | None
    text: str
    attempts: int = 1
    no_answer: bool = False
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200

    def _v2_outputs(self) -> dict[str, dict]:
        return {o["name"]: o for o in (self.body or {}).get("outputs", [])}

    @property
    def prediction(self) -> str | None:
        """The predicted class, from a plain or a v2 answer."""
        if not self.ok or not self.body:
            return None
        if "prediction" in self.body:
            return self.body["prediction"]
        out = self._v2_outputs().get("prediction")
        return out["data"][0] if out else None

    @property
    def probabilities(self) -> dict[str, float] | None:
        """Class -> probability of the (first) image, from a plain or a v2 answer."""
        if not self.ok or not self.body:
            return None
        if "probabilities" in self.body and isinstance(self.body["probabilities"], dict):
            return self.body["probabilities"]
        out = self._v2_outputs().get("probabilities")
        if not out:
            return None
        names = self._v2_outputs()["classes"]["data"]
        return dict(zip(names, out["data"][:len(names)]))

    def policy_field(self, name: str):
        """``decision``, ``prediction_set``, ``refer`` or ``ood_score`` of the (first) image,
        from a plain or a v2 answer (None when the answer has none)."""
        if not self.ok or not self.body:
            return None
        if name in self.body:
            return self.body[name]
        outputs = self._v2_outputs()
        out = outputs.get(name)
        if not out:
            return None
        if name == "prediction_set":
            names = outputs["classes"]["data"]
            return [c for c, inside in zip(names, out["data"][:len(names)]) if inside]
        return out["data"][0]

    @property
    def overlay_png(self) -> bytes | None:
        """The Grad-CAM overlay (PNG bytes) of an explained answer."""
        if not self.ok or not self.body:
            return None
        explanation = self.body.get("explanation")
        if explanation:
            return base64.b64decode(explanation["image_png_base64"])
        out = self._v2_outputs().get("explanation")
        return base64.b64decode(out["data"][0]) if out else None

    @property
    def dicom_objects(self) -> dict[str, bytes]:
        """The DICOM results the answer carries (``dicom_out``): kind ("sr", "sc") -> the
        object's Part 10 bytes, from a plain or a v2 answer; empty when there are none."""
        if not self.ok or not self.body:
            return {}
        if isinstance(self.body.get("dicom"), dict):
            return {k: base64.b64decode(v) for k, v in self.body["dicom"].items()}
        outputs = self._v2_outputs()
        return {name.removeprefix("dicom_"): base64.b64decode(out["data"][0])
                for name, out in outputs.items() if name.startswith("dicom_") and out["data"]}

    @property
    def refused_key(self) -> bool:
        """The server refused the key (missing, wrong or expired: neither runtime says which)."""
        return (self.status in (400, 401, 403, 503) and
                ("InvalidKeyException" in self.text or "Token Authorization failed" in self.text
                 or any(t in self.text for t in TRITON_KEY_REFUSED)))

    def summary(self) -> str:
        """One line: file, status and the prediction or the error."""
        probs = self.probabilities
        if self.prediction is not None and probs and self.prediction in probs:
            line = f"{self.file}\t{self.status}\t{self.prediction}\t{probs[self.prediction]:.4f}"
            weights = self.body.get("learner_weights")
            if weights:
                line += "\tlearner weights " + " ".join(f"{n} {w:.2f}" for n, w in weights.items())
            if self.policy_field("decision") is not None:
                line += (f"\tdecision {self.policy_field('decision')}\tset "
                         f"{'|'.join(self.policy_field('prediction_set'))}\tood_score "
                         f"{self.policy_field('ood_score'):.2f}"
                         + ("\tREFER" if self.policy_field("refer") else ""))
            return line
        errors = self._v2_outputs().get("error")
        reason = ((self.body or {}).get("error") or (self.body or {}).get("message")
                  or (errors["data"][0] if errors else None) or self.text)
        return f"{self.file}\t{self.status}\terror\t{reason}"


def _parse(text: str) -> dict | None:
    try:
        body = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def refusal_status(status: int, message: str) -> tuple[int, dict | None]:
    """The status of a refusal and, for a Triton refusal (its message starts with the status,
    see ``_STATUS_FIRST``), the body TorchServe would have answered: ``{"error", "code"}``.
    Otherwise ``status`` as the server answered it and None."""
    found = _STATUS_FIRST.match(message or "")
    if not found:
        return status, None
    code = int(found.group(1))
    return code, {"error": message[found.end():], "code": code}


# send(path, file bytes, timeout of this try) -> the answer of one try.
Sender = Callable[[str, bytes, float], PredictResult]


def should_retry(result: PredictResult, also: frozenset[int] = frozenset()) -> bool:
    """Whether an idempotent request that ended in ``result`` is worth another try: no answer,
    502/503/504, a 5xx saying the worker died, or a status in ``also`` (429 for explanations). Never a
    refused key or any other 4xx."""
    if result.refused_key:
        return False
    return (result.no_answer or result.status in RETRIED_STATUSES or result.status in also
            or (result.status >= 500 and WORKER_DIED in result.text))


def _send_with_retries(send: Sender, path: str, data: bytes, timeout: float,
                       retry: RetryPolicy, also: frozenset[int]) -> PredictResult:
    start = time.monotonic()
    tries = 0
    while True:
        left = retry.deadline_s - (time.monotonic() - start)
        tries += 1
        result = send(path, data, min(timeout, max(MIN_TRY_S, left)))
        result.attempts = tries
        if tries >= retry.attempts or not should_retry(result, also):
            return result
        pause = retry.pause(tries, result.retry_after)
        if time.monotonic() - start + pause + MIN_TRY_S > retry.deadline_s:
            return result
        log.info("%s: %s %s; try %d of %d in %.1f s", path, result.status or "no answer",
                 result.text[:80].encode("unicode_escape").decode(), tries + 1, retry.attempts,
                 pause)
        _pause(pause)


def _send_file(send: Sender, path: str, timeout: float, retry: RetryPolicy,
               also: frozenset[int] = frozenset()) -> PredictResult:
    """One file's result: ``UNREADABLE`` when it cannot be read, else its answer after retries."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return PredictResult(path, UNREADABLE, None,
                             f"cannot read {path}: {exc.strerror or type(exc).__name__}")
    return _send_with_retries(send, path, data, timeout, retry, also)


def _map_files(send: Sender, files: Sequence[str | Path], timeout: float,
               retry: RetryPolicy, dicom_out: str | None = None) -> list[PredictResult]:
    # A Secondary Capture of the overlay is an explanation: 429 (the batch's explanations were
    # spent) is retried like 503.
    also = frozenset({429}) if dicom_out and "sc" in dicom_out else frozenset()
    with ThreadPoolExecutor(max_workers=max(1, min(MAX_CONCURRENCY, len(files)))) as pool:
        return list(pool.map(lambda f: _send_file(send, str(f), timeout, retry, also), files))


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (a number of seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return max(0.0, (when - _dt.datetime.now(_dt.timezone.utc)).total_seconds())


def _http_poster(endpoint: str, token: str | None,
                 request: Callable[[str, bytes], dict]) -> Sender:
    """A ``Sender`` that POSTs what ``request(path, data)`` gives (``requests.post`` keyword
    arguments: ``data=`` or ``json=``) to ``endpoint`` with the key, and keeps the answer."""
    import requests

    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def send(path: str, data: bytes, timeout: float) -> PredictResult:
        kwargs = request(path, data)
        kwargs["headers"] = {**headers, **kwargs.get("headers", {})}
        try:
            r = requests.post(endpoint, timeout=timeout, **kwargs)
        except (requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError) as exc:
            return PredictResult(path, 0, None, f"request failed: {exc}", no_answer=True)
        except requests.RequestException as exc:
            return PredictResult(path, 0, None, f"request failed: {exc}")
        return PredictResult(path, r.status_code, _parse(r.text), r.text,
                             retry_after=_retry_after(r.headers.get("Retry-After")))

    return send


def _grpc_failure(path: str, exc) -> PredictResult:
    """A gRPC call that failed as a whole, with the HTTP status TorchServe would have used."""
    details = exc.details() or ""
    code = exc.code().name
    status, body = refusal_status(_GRPC_TO_HTTP.get(code, 500), details)
    body = body or _parse(details)
    no_answer = code in _GRPC_NO_ANSWER and not any(t in details for t in TRITON_KEY_REFUSED) \
        and not _STATUS_FIRST.match(details)
    return PredictResult(path, status, body, details, no_answer=no_answer)


def predict_http(files: Sequence[str | Path], model_name: str, *, url: str = DEFAULT_HTTP_URL,
                 token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 retry: RetryPolicy = DEFAULT_RETRY,
                 dicom_out: str | None = None) -> list[PredictResult]:
    """POST each file's bytes to ``{url}/predictions/{model_name}``.

    Args:
        files: image files (PNG, JPEG, DICOM), sent as raw bodies.
        model_name: the served model.
        url: inference address.
        token: inference key; sent as ``Authorization: Bearer <key>``.
        timeout: seconds per try.
        retry: when and how often a file is sent again.
        dicom_out: DICOM results to ask for ("sr", "sr,sc"; ``flannel.handlers.dicom_out``),
            sent as a form field beside the file (``PredictResult.dicom_objects``).

    Returns:
        One result per file, in order.
    """
    def request(path: str, data: bytes) -> dict:
        if not dicom_out:
            return {"data": data}
        return {"files": {"data": (Path(path).name, data, "application/dicom")},
                "data": {DICOM_OUT: dicom_out}}

    send = _http_poster(f"{url.rstrip('/')}/predictions/{model_name}", token, request)
    return _map_files(send, files, timeout, retry, dicom_out)


def predict_grpc(files: Sequence[str | Path], model_name: str, *,
                 target: str = DEFAULT_GRPC_TARGET, token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, retry: RetryPolicy = DEFAULT_RETRY,
                 dicom_out: str | None = None) -> list[PredictResult]:
    """Call ``InferenceAPIsService.Predictions`` once per file with input ``{"data": bytes}``.

    TorchServe 0.12 answers gRPC with status OK even when the handler set a 4xx for the item, so
    the item's status is read from the ``code`` of the handler's JSON error body.

    Args:
        files: image files, sent as raw bytes.
        model_name: the served model.
        target: gRPC inference address host:port.
        token: inference key; sent as ``authorization: Bearer <key>`` metadata.
        timeout: seconds per try.
        retry: when and how often a file is sent again.
        dicom_out: DICOM results to ask for, sent as an input beside "data".

    Returns:
        One result per file, in order.
    """
    import grpc

    from flannel.handlers.grpc_stubs import load_stubs

    stubs = load_stubs()
    metadata = [("authorization", f"Bearer {token}")] if token else []
    options = {DICOM_OUT: dicom_out.encode("utf-8")} if dicom_out else {}
    with grpc.insecure_channel(target) as channel:
        stub = stubs["inference_pb2_grpc"].InferenceAPIsServiceStub(channel)

        def send(path: str, data: bytes, timeout: float) -> PredictResult:
            request = stubs["inference_pb2"].PredictionsRequest(
                model_name=model_name, input={"data": data, **options})
            try:
                reply = stub.Predictions(request, metadata=metadata, timeout=timeout)
            except grpc.RpcError as exc:
                return _grpc_failure(path, exc)
            text = reply.prediction.decode("utf-8", errors="replace")
            body = _parse(text)
            status = int(body.get("code", 400)) if body is not None and "error" in body else 200
            return PredictResult(path, status, body, text)

        return _map_files(send, files, timeout, retry, dicom_out)


def v2_request(data: bytes, request_id: str = "", parameters: dict | None = None) -> dict:
    """An Open Inference Protocol request carrying one encoded file as a BYTES tensor of shape
    [1, 1] (one image, one file each): what a batching Triton model's input takes, and
    TorchServe's handler takes [N] and [N, 1] alike."""
    body = {"id": request_id, "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1],
                                          "data": [base64.b64encode(data).decode("ascii")]}]}
    if parameters:
        body["parameters"] = parameters
    return body


def v2_binary_request(data: bytes, request_id: str = "", parameters: dict | None = None
                      ) -> tuple[bytes, dict[str, str]]:
    """The same request with the file as raw bytes, in Triton's binary tensor extension: the
    JSON header, then the BYTES element (its 4-byte little-endian length, then the file).
    Returns the body and the headers it needs."""
    element = len(data).to_bytes(4, "little") + data
    header = {"id": request_id, "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1],
                                            "parameters": {"binary_data_size": len(element)}}]}
    if parameters:
        header["parameters"] = parameters
    head = json.dumps(header).encode("utf-8")
    return head + element, {"Inference-Header-Content-Length": str(len(head)),
                            "Content-Type": "application/octet-stream"}


def predict_v2(files: Sequence[str | Path], model_name: str, *, url: str = DEFAULT_HTTP_URL,
               token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
               parameters: dict | None = None, retry: RetryPolicy = DEFAULT_RETRY,
               dicom_out: str | None = None, runtime: str = "torchserve") -> list[PredictResult]:
    """POST each file as a v2 request to ``{url}/v2/models/{model_name}/infer``: base64 in JSON
    for TorchServe, raw bytes in Triton's binary tensor extension for Triton (whose JSON reader
    fails on bodies near 4 MB, see ``flannel.handlers.triton_guard``).

    Args:
        parameters: v2 request parameters (``explain``, ``target``, ``learner``).
        dicom_out: DICOM results to ask for, as the ``dicom_out`` parameter.
        runtime: the server's runtime (``V2_GRPC_SERVICES``).

    Returns:
        One result per file, in order; ``body`` is the v2 answer.
    """
    if dicom_out:
        parameters = {**(parameters or {}), DICOM_OUT: dicom_out}

    def request(path: str, data: bytes) -> dict:
        if runtime == "triton":
            body, headers = v2_binary_request(data, Path(path).name, parameters)
            return {"data": body, "headers": headers}
        return {"json": v2_request(data, Path(path).name, parameters)}

    post = _http_poster(f"{url.rstrip('/')}/v2/models/{model_name}/infer", token, request)

    def send(path: str, data: bytes, timeout: float) -> PredictResult:
        result = post(path, data, timeout)
        error = (result.body or {}).get("error")
        if result.status != 200 and isinstance(error, str):
            status, body = refusal_status(result.status, error)
            result = replace(result, status=status, body=body or result.body)
        return result

    return _map_files(send, files, timeout, retry, dicom_out)


def _v2_tensor_data(tensor, quoted: bool = True) -> list:
    """The values of one v2 gRPC output tensor sent as typed contents (TorchServe 0.12 writes
    each BYTES element as its JSON text: ``quoted`` decodes those)."""
    contents = tensor.contents
    if tensor.datatype == "BYTES":
        out = []
        for raw in contents.bytes_contents:
            text = raw.decode("utf-8", errors="replace")
            if not quoted:
                out.append(text)
                continue
            try:
                out.append(json.loads(text))
            except json.JSONDecodeError:
                out.append(text)
        return out
    for field in ("fp32_contents", "fp64_contents", "int_contents", "int64_contents",
                  "uint_contents", "uint64_contents", "bool_contents"):
        values = list(getattr(contents, field))
        if values:
            return values
    return []


_RAW_TYPES = {"FP32": "<f4", "FP64": "<f8", "INT32": "<i4", "INT64": "<i8", "BOOL": "?",
              "UINT8": "u1", "INT8": "i1"}


def _v2_raw_data(datatype: str, raw: bytes) -> list:
    """The values of one output sent as ``raw_output_contents`` (Triton): little-endian numbers,
    or BYTES elements each after its 4-byte little-endian length."""
    import numpy as np

    if datatype != "BYTES":
        return np.frombuffer(raw, dtype=_RAW_TYPES[datatype]).tolist()
    out, offset = [], 0
    while offset + 4 <= len(raw):
        n = int.from_bytes(raw[offset:offset + 4], "little")
        out.append(raw[offset + 4:offset + 4 + n].decode("utf-8", errors="replace"))
        offset += 4 + n
    return out


def predict_v2_grpc(files: Sequence[str | Path], model_name: str, *,
                    target: str = DEFAULT_GRPC_TARGET, token: str | None = None,
                    timeout: float = DEFAULT_TIMEOUT_S, retry: RetryPolicy = DEFAULT_RETRY,
                    dicom_out: str | None = None, runtime: str = "torchserve"
                    ) -> list[PredictResult]:
    """Call the v2 ``GRPCInferenceService.ModelInfer`` once per file (BYTES input [1, 1]).

    The answer is turned into the same JSON a v2 REST answer has, so results read alike.
    ``runtime`` says whose service it is (``V2_GRPC_SERVICES``):

    - ``torchserve``: a refused file comes back as ``error`` and ``code`` outputs (TorchServe
      0.12's v2 gRPC answer carries no handler status), which become the result's message and
      status; ``dicom_out`` travels as a second BYTES input of that name (TorchServe 0.12 drops
      request parameters); BYTES outputs arrive as JSON text.
    - ``triton``: a refused file is a gRPC error whose message starts with its status;
      ``dicom_out`` is a request parameter; outputs arrive as raw contents.
    """
    import grpc

    from flannel.handlers.grpc_stubs import load_stubs

    if runtime not in V2_GRPC_SERVICES:
        raise ValueError(f"unknown runtime {runtime!r}; choose from {sorted(V2_GRPC_SERVICES)}")
    torchserve = runtime == "torchserve"
    pb = load_stubs()["open_inference_grpc_pb2"]
    header = "authorization" if torchserve else f"{TRITON_GRPC_KEY_PREFIX}authorization"
    metadata = [(header, f"Bearer {token}")] if token else []
    with grpc.insecure_channel(target) as channel:
        model_infer = channel.unary_unary(
            f"/{V2_GRPC_SERVICES[runtime]}/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString)

        def send(path: str, data: bytes, timeout: float) -> PredictResult:
            tensor = pb.ModelInferRequest.InferInputTensor(
                name="image", datatype="BYTES", shape=[1, 1],
                contents=pb.InferTensorContents(bytes_contents=[data]))
            options, parameters = [], {}
            if dicom_out and torchserve:
                options = [pb.ModelInferRequest.InferInputTensor(
                    name=DICOM_OUT, datatype="BYTES", shape=[1],
                    contents=pb.InferTensorContents(bytes_contents=[dicom_out.encode("utf-8")]))]
            elif dicom_out:
                parameters = {DICOM_OUT: pb.InferParameter(string_param=dicom_out)}
            request = pb.ModelInferRequest(model_name=model_name, id=Path(path).name,
                                           inputs=[tensor, *options], parameters=parameters)
            try:
                reply = model_infer(request, metadata=metadata, timeout=timeout)
            except grpc.RpcError as exc:
                return _grpc_failure(path, exc)
            raw = list(reply.raw_output_contents)
            outputs = [{"name": o.name, "datatype": o.datatype, "shape": list(o.shape),
                        "data": (_v2_raw_data(o.datatype, raw[i]) if raw
                                 else _v2_tensor_data(o, quoted=torchserve))}
                       for i, o in enumerate(reply.outputs)]
            body = {"id": reply.id, "model_name": reply.model_name,
                    "model_version": reply.model_version, "outputs": outputs}
            by_name = {o["name"]: o for o in outputs}
            status = int(by_name["code"]["data"][0]) if "code" in by_name else 200
            return PredictResult(path, status, body, json.dumps(body))

        return _map_files(send, files, timeout, retry, dicom_out)


def explain_http(files: Sequence[str | Path], model_name: str, *, url: str = DEFAULT_HTTP_URL,
                 token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 target: str | None = None, learner: str | None = None,
                 retry: RetryPolicy = DEFAULT_RETRY) -> list[PredictResult]:
    """POST each file to ``{url}/explanations/{model_name}``: the prediction plus a Grad-CAM
    overlay (``PredictResult.overlay_png``) of ``target`` (default: the predicted class), for
    the served model or one ``learner`` of an ensemble. The server answers a few explanations
    per batch (429 for the others), so they are sent one after another, and a 429 is retried
    like a 503."""
    options = {k: v for k, v in (("target", target), ("learner", learner)) if v}

    def request(path: str, data: bytes) -> dict:
        return {"json": {"image": base64.b64encode(data).decode("ascii"), **options}}

    send = _http_poster(f"{url.rstrip('/')}/explanations/{model_name}", token, request)
    return [_send_file(send, str(path), timeout, retry, also=frozenset({429})) for path in files]


PROTOCOLS = ("http", "grpc", "v2", "v2-grpc")


class Client:
    """A running server, as its config file describes it: runtime, addresses, model and keys.

    ``from_config`` finds which runtime serves the config: a Triton started for it
    (``flannel serve start --runtime triton``), else TorchServe. TorchServe's inference key is
    read from its key file and renewed (with the file's management "API" key) when it has
    expired or is refused as expired; a key that cannot be renewed is reported as
    ``ServeError`` naming the file and when it expired. Triton's key lives as long as the server
    and is read again from its key file when refused. A key given as ``token`` is used as it
    is. Files without a usable answer are retried under ``retry``.
    """

    def __init__(self, info, model: str | None = None, token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, retry: RetryPolicy = DEFAULT_RETRY) -> None:
        self.info = info
        self.model = model
        self.timeout = timeout
        self.retry = retry
        self._token = token
        self._fixed_token = token is not None

    @classmethod
    def from_config(cls, config: str | Path = "config.properties", model: str | None = None,
                    token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                    retry: RetryPolicy = DEFAULT_RETRY) -> "Client":
        from flannel.handlers.triton_process import triton_info
        from flannel.handlers.ts_config import server_info

        return cls(triton_info(config) or server_info(config), model, token, timeout, retry)

    @property
    def runtime(self) -> str:
        return getattr(self.info, "runtime", "torchserve")

    @property
    def token(self) -> str:
        if self._token is None:
            self._token = self._read_token(renew=False)
        return self._token

    def _read_token(self, renew: bool) -> str:
        from flannel.handlers.keys import current_token, read_key_file, renew_token

        if self.runtime == "triton":
            return read_key_file(self.info.key_file)
        return renew_token(self.info) if renew else current_token(self.info)

    def model_name(self) -> str:
        """The model asked for, else the only model the server serves."""
        if self.model:
            return self.model
        from flannel.handlers.ts_config import ServeError
        from flannel.handlers.ts_process import server_status

        if self.runtime == "triton":
            served = sorted(self.info.models)
        else:
            running = server_status(self.info.config)
            served = sorted(running.models) if running else []
        if len(served) != 1:
            raise ServeError(f"give --model (model= in Python): the server of "
                             f"{self.info.config} serves "
                             f"{', '.join(served) if served else 'no model'}")
        return served[0]

    def _with_renewal(self, call: Callable[[str, list[str]], list[PredictResult]],
                      files: Sequence[str | Path]) -> list[PredictResult]:
        """``call(key, files)``; when the server refused the key for some files (it was renewed
        elsewhere meanwhile, or the server restarted with a new one), read or renew it once and
        send those files again, only those."""
        files = [str(f) for f in files]
        results = call(self.token, files)
        refused = [i for i, r in enumerate(results) if r.refused_key]
        if refused and not self._fixed_token:
            self._token = self._read_token(renew=True)
            for i, result in zip(refused, call(self._token, [files[i] for i in refused])):
                results[i] = result
        return results

    def predict(self, files: Sequence[str | Path], protocol: str = "http",
                dicom_out: str | None = None) -> list[PredictResult]:
        """One result per file, over ``protocol`` (one of ``PROTOCOLS``; Triton serves the v2
        ones); with ``dicom_out`` ("sr" or "sr,sc") each answered DICOM file's results as DICOM
        objects too (``PredictResult.dicom_objects``)."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}")
        if self.runtime == "triton" and not protocol.startswith("v2"):
            from flannel.handlers.ts_config import ServeError

            raise ServeError(f"{protocol} is TorchServe's own API; the Triton serving "
                             f"{self.info.config} answers v2 and v2-grpc")
        model, info = self.model_name(), self.info
        fn, where = {"http": (predict_http, {"url": info.inference_url}),
                     "grpc": (predict_grpc, {"target": info.grpc_inference}),
                     "v2": (predict_v2, {"url": info.inference_url, "runtime": self.runtime}),
                     "v2-grpc": (predict_v2_grpc, {"target": info.grpc_inference,
                                                   "runtime": self.runtime})}[protocol]
        return self._with_renewal(lambda key, fs: fn(fs, model, token=key, timeout=self.timeout,
                                                     retry=self.retry, dicom_out=dicom_out,
                                                     **where), files)

    def explain(self, files: Sequence[str | Path], target: str | None = None,
                learner: str | None = None) -> list[PredictResult]:
        """Predictions with Grad-CAM overlays (``PredictResult.overlay_png``): TorchServe's
        ``/explanations``, or on Triton a v2 request with ``explain`` set, one file after
        another (the server answers a few explanations per batch; 429 is retried)."""
        model = self.model_name()
        if self.runtime == "triton":
            params = {"explain": True, **{k: v for k, v in (("target", target),
                                                            ("learner", learner)) if v}}
            retry = self.retry
            return self._with_renewal(lambda t, fs: [predict_v2(
                [f], model, url=self.info.inference_url, token=t, timeout=self.timeout,
                parameters=params, retry=retry, runtime="triton")[0] for f in fs], files)
        return self._with_renewal(lambda t, fs: explain_http(
            fs, model, url=self.info.inference_url, token=t, timeout=self.timeout,
            target=target, learner=learner, retry=self.retry), files)
