"""Serving logic as plain functions: request item -> image bytes -> tensor -> backend -> JSON.

    python -c "from flannel.handlers.serving import load_served_model; print(load_served_model('model_dir'))"

The TorchServe handler (``image_classifier.py``) only wires these functions to TorchServe's context,
so everything here is tested without a server. It reads only the artifact manifest
(``flannel.artifacts``): the kind, graph names, the input spec, and the pins it re-checks before
serving, so one code path serves a learner or an ensemble archive, on the backend that
model-config.yaml names (``flannel.backends``). One batch from TorchServe becomes one
backend call over the items that decoded; each bad item gets its own 4xx answer
and the rest are answered. An ensemble's answer also carries each learner's weight, by name.
Nothing from a request is ever unpickled: inputs are image bytes or base64 inside JSON.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from flannel.artifacts import (ANSWER_POLICY, INDEX_TO_NAME, INPUT_SPEC, MODEL_CARD,
                               REFERENCE_INPUT, ExportFolder, graph_spec, sha256_bytes)
from flannel.cpus import threads_per_worker
from flannel.decode import DEFAULT_MAX_PIXELS, InputError, NotAChestRadiograph, decode_gray
from flannel.dicom_bounds import keep_identifiers_out_of_logs
from flannel.nvjpeg import jpeg_decoder_for
from flannel.pins import check_pins
from flannel.backends import Backend, backend_spec, load_backend
from flannel.handlers import dicom_out
from flannel.handlers.answer_fields import OOD_LIMIT, ServedPolicy, ood_warning
from flannel.handlers import open_inference as v2
from flannel.handlers.explanations import (DEFAULT_PER_BATCH, ExplainRequest, Explainer,
                                           ExplanationBusy, ExplanationUnavailable,
                                           explain_request)
from flannel.handlers.request_json import BadRequest, check_structure, parse_json
from flannel.preprocess import PreprocessSpec, to_tensor
from flannel.quoting import clip

log = logging.getLogger(__name__)

# Keys TorchServe uses for the request payload: "body" for a raw HTTP body, "data" for a form field
# or a gRPC input named "data".
PAYLOAD_KEYS = ("data", "body")
# JSON requests carry the image as base64 under this key.
JSON_IMAGE_KEY = "image"
# The serving pixel limit: a server setting (the environment of `torchserve`), else the archive's
# model-config.yaml ``handler.max_pixels``, else the decoder's default. It bounds the memory of
# one decoded item (4 bytes a pixel in float32), independent of the exported preprocessing spec.
MAX_PIXELS_ENV = "FLANNEL_MAX_PIXELS"
# Images one handler call prepares and runs: two full v2 requests (v2.MAX_ITEMS each), or a
# whole batch of single-image requests. The requests of a batch beyond it are answered 503
# (retry), so a batch of 8 v2 requests of 32 images never becomes one call of 256.
MAX_IMAGES_PER_CALL = 2 * v2.MAX_ITEMS
# Seconds one handler call may spend decoding and preprocessing before it answers the images it
# has not started 503 (retry): a 36 MP image takes about a second here, 64 of them on 2 threads
# about 32 s; with the model and an explanation the call stays well inside the archive's 120 s
# responseTimeout, after which TorchServe would restart the worker.
PREPARE_BUDGET_S = 40.0
# Bytes of one answer's JSON: under config.properties' max_response_size (1 MiB), which the
# frontend enforces by failing the whole worker's reply. An answer is a few hundred bytes, or
# about 100 KB with an explanation overlay.
MAX_ANSWER_BYTES = 768 * 1024


@dataclass
class ServedModel:
    """Everything one worker needs to answer requests."""

    name: str
    version: str
    class_names: list[str]
    spec: PreprocessSpec  # the served input: host preprocessing of every file
    backend: Backend
    input_name: str
    output_name: str  # the decision output: class probabilities
    explainer: Explainer  # Grad-CAM on the eager graph, loaded at the first explanation
    kind: str = "learner"
    member_names: tuple[str, ...] = ()
    weights_output: str | None = None  # an ensemble's per-learner weights
    # The archive's operating point and prediction sets (``answer_policy.json``), applied to the
    # graph's calibrated probabilities and its out-of-distribution score output.
    policy: ServedPolicy | None = None
    ood_output: str | None = None
    card_sha256: str | None = None  # of the archive's model_card.json, in every answer
    # Items of a batch are decoded and preprocessed concurrently by this many threads (PIL's
    # decoders and numpy release the GIL): on a radiograph-sized file that work costs several
    # times the model's, so doing it one item after another would cap the batch's throughput.
    prepare_threads: int = 1
    max_pixels: int = DEFAULT_MAX_PIXELS  # refuse larger images before decoding them
    # An image whose ood_score exceeds 1, or a DICOM whose header says it is not a chest
    # radiograph: answered with a "warnings" field (default), or refused with 422 when strict
    # (model-config.yaml handler.strict_input).
    strict_input: bool = False
    artifact_sha256: str = ""  # of the artifact the backend runs, recorded in DICOM results
    # ``decode_gray``, or the same with nvJPEG for a GPU backend's greyscale JPEGs
    # (model-config.yaml handler.jpeg_decoder, ``flannel.nvjpeg``).
    decode: Callable[..., tuple] = decode_gray
    _pool: Any = field(default=None, repr=False, compare=False)

    @property
    def json_values(self) -> int:
        """The most values a JSON request to this model may hold (``json_values_limit``)."""
        return json_values_limit(self.spec.resize)

    def map_items(self, fn, items: Sequence[Any]) -> list:
        if self.prepare_threads <= 1 or len(items) <= 1:
            return [fn(item) for item in items]
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(self.prepare_threads, thread_name_prefix="prepare")
        return list(self._pool.map(fn, items))


@dataclass
class Answer:
    """One response: HTTP status, reason phrase and a JSON-serialisable body."""

    status: int
    phrase: str
    body: dict
    _json: str | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> str:
        if self._json is None:
            self._json = json.dumps(self.body, allow_nan=False)
        return self._json

    @property
    def reason(self) -> str:
        """Why a request was refused, from a plain or a v2 (gRPC) error body."""
        if "error" in self.body:
            return str(self.body["error"])
        errors = [o["data"][0] for o in self.body.get("outputs", []) if o.get("name") == "error"]
        return str(errors[0]) if errors else self.phrase


def resolve_threads(handler_config: dict) -> int:
    """Intra-op threads of this worker: the user's ``intra_op_threads`` when set, else the cores
    this process may use (affinity and cgroup quota) divided by the model's workers."""
    if handler_config.get("intra_op_threads"):
        return int(handler_config["intra_op_threads"])
    return threads_per_worker(int(handler_config.get("workers") or 1))


def parse_class_names(data: bytes | str) -> list[str]:
    """Class names in output order from the bytes of ``index_to_name.json`` ({"0": name, ...})."""
    mapping = json.loads(data)
    return [mapping[str(i)] for i in range(len(mapping))]


def serving_max_pixels(handler_config: dict, environ: dict | None = None) -> int:
    """The pixel limit of served images (see ``MAX_PIXELS_ENV``)."""
    import os

    environ = os.environ if environ is None else environ
    for source, value in ((MAX_PIXELS_ENV, environ.get(MAX_PIXELS_ENV)),
                          ("model-config.yaml handler.max_pixels",
                           handler_config.get("max_pixels"))):
        if value in (None, ""):
            continue
        try:
            limit = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{source} must be a whole number of pixels, got {value!r}") from None
        if limit < 1:
            raise ValueError(f"{source} must be positive, got {limit}")
        return limit
    return DEFAULT_MAX_PIXELS


def load_served_model(model_dir: str | Path, handler_config: dict | None = None,
                      version: str = "1", name: str | None = None,
                      source: Any = None) -> ServedModel:
    """Verify the artifacts and the pins, then load the spec, class names and the backend.

    Args:
        model_dir: folder holding ``manifest.json`` and the artifacts it lists (an unpacked .mar
            or an export folder).
        handler_config: the ``handler`` section of model-config.yaml: ``backend``,
            ``intra_op_threads`` (unset: decided here, see ``resolve_threads``) and ``workers``;
            ``max_pixels`` (see ``MAX_PIXELS_ENV``); ``jpeg_decoder`` (``flannel.nvjpeg``:
            cpu, or nvjpeg for a GPU backend); the handler adds ``device_id`` (TorchServe's
            gpu_id) for GPU backends.
        version: the model version reported in every answer (the archive's version).
        name: the model name reported in every answer (the name it is served under; default
            the manifest's ``model_name``).
        source: where artifacts are read from, each checked as it is read: ``.manifest`` and
            ``.read(key) -> bytes``. The handler passes the unpacked archive checked against
            the trust list (``flannel.handlers.trust.TrustedArchive``); default: the folder
            checked against its own manifest (``flannel.artifacts.ExportFolder``).

    Returns:
        The loaded model.

    Raises:
        ManifestError, TrustError: an artifact is missing or its bytes are not the listed ones;
            nothing is loaded then.
        PinMismatch: the installed preprocessing code computes another tensor for the reference
            image than the exporting code did.
        JpegDecoderError: ``jpeg_decoder`` nvjpeg for a CPU backend, or where nvJPEG's levels
            differ from the CPU decoder's; checked before any artifact is read.
    """
    import io

    model_dir = Path(model_dir)
    keep_identifiers_out_of_logs()
    cfg = handler_config or {}
    backend = backend_spec(cfg.get("backend"))
    decode = jpeg_decoder_for(cfg.get("jpeg_decoder"), backend, int(cfg.get("device_id") or 0))
    # Each artifact is read once, checked, and parsed or loaded from those same bytes.
    source = source or ExportFolder(model_dir)
    manifest = source.manifest
    graph = graph_spec(manifest)
    threads = resolve_threads(cfg)
    spec = PreprocessSpec.from_json(source.read(INPUT_SPEC).decode("utf-8"))
    pin = check_pins(manifest["pins"], spec,
                     np.load(io.BytesIO(source.read(REFERENCE_INPUT)), allow_pickle=False))
    log.info("reference tensor %s (%s)", pin.computed_sha256[:12],
             "exact" if pin.exact else f"within float rounding, max abs diff {pin.max_abs_diff:.2g}")
    class_names = parse_class_names(source.read(INDEX_TO_NAME))
    if list(manifest.get("class_names", class_names)) != class_names:
        raise ValueError(f"{INDEX_TO_NAME} {class_names} disagrees with the manifest "
                         f"{manifest['class_names']}")
    members = tuple(m["name"] for m in manifest.get("members", []))
    weights = next(iter(graph.answer_outputs), None)
    policy = ServedPolicy.from_json(source.read(ANSWER_POLICY), class_names)
    card = (sha256_bytes(source.read(MODEL_CARD)) if MODEL_CARD in manifest["artifacts"]
            else None)
    engine = load_backend(backend, model_dir, manifest, graph, threads,
                          device_id=int(cfg.get("device_id") or 0), read=source.read)
    log.info("loaded %s %s (%s) from %s on %s with intra_op_threads=%d", graph.kind,
             manifest["model_name"], ", ".join(members), model_dir, backend.name, threads)
    return ServedModel(name=name or manifest["model_name"], version=str(version),
                       class_names=class_names, spec=spec, backend=engine,
                       input_name=graph.input_name, output_name=graph.decision_output,
                       kind=graph.kind, member_names=members, weights_output=weights,
                       policy=policy, ood_output=next(iter(graph.score_outputs), None),
                       card_sha256=card,
                       prepare_threads=threads, max_pixels=serving_max_pixels(cfg),
                       strict_input=bool(cfg.get("strict_input", False)),
                       artifact_sha256=manifest["artifacts"][backend.artifact]["sha256"],
                       decode=decode,
                       explainer=Explainer(model_dir, manifest, class_names, spec.resize,
                                           int(cfg.get("explain_per_batch", DEFAULT_PER_BATCH)),
                                           read=source.read))


def _from_json(obj: Any) -> bytes:
    if not isinstance(obj, dict) or JSON_IMAGE_KEY not in obj:
        raise BadRequest(f'JSON body must be an object {{"{JSON_IMAGE_KEY}": "<base64>"}}')
    encoded = obj[JSON_IMAGE_KEY]
    if not isinstance(encoded, str):
        raise BadRequest(f'"{JSON_IMAGE_KEY}" must be a base64 string, got {type(encoded).__name__}')
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f'"{JSON_IMAGE_KEY}" is not valid base64: {clip(exc, 80)}') from None


_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def _looks_like_json(data: bytes) -> bool:
    return data.lstrip()[:1] in (b"{", b"[")


def json_values_limit(input_side: int) -> int:
    """The most JSON values a request to a model of this input side may hold: one full v2 FP32
    request (``v2.MAX_ITEMS`` images of ``input_side`` squared values) and some room."""
    return v2.MAX_ITEMS * input_side * input_side + 4096


def payload(item: Any, max_values: int = json_values_limit(512)) -> bytes | dict:
    """The payload of one TorchServe request item: raw bytes, or a parsed JSON object.

    Accepts a raw body, a form field, or JSON given as a dict (TorchServe parsed it), as bytes or
    as text. JSON is parsed under ``flannel.handlers.request_json``'s limits.

    Args:
        item: one element of the list TorchServe passes to ``handle``.
        max_values: the most JSON values the body may hold (``json_values_limit``).

    Raises:
        BadRequest: no payload, an unexpected type, or JSON that is malformed or breaks a
            limit (``JSONTooLarge``, 413, for the size limits).
    """
    value = item
    if isinstance(item, dict):
        value = next((item[k] for k in PAYLOAD_KEYS if item.get(k) is not None), None)
        if value is None and (isinstance(item.get(JSON_IMAGE_KEY), str) or v2.is_v2(item)):
            value = item  # already-parsed JSON
        elif value is None and len(item) == 1:
            value = next(iter(item.values()))  # a form field with another name
    if value is None:
        raise BadRequest("request has no payload: send the image as the body or as "
                         f'JSON {{"{JSON_IMAGE_KEY}": "<base64>"}}')
    if isinstance(value, dict):
        check_structure(value, max_values)
        return value
    if isinstance(value, str):
        value = value.encode("utf-8", errors="surrogatepass")
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise BadRequest(f"unsupported payload type {type(value).__name__}")
    data = bytes(value)
    if data[:3] == _UTF8_BOM:  # some clients write one before their JSON
        data = data[3:]
    elif data[:2] in _UTF16_BOMS and data[2:].lstrip(b"\x00 \t\r\n")[:1] in (b"{", b"["):
        raise BadRequest("JSON body is UTF-16; send it as UTF-8")
    if _looks_like_json(data):
        parsed = parse_json(data, max_values)
        if not isinstance(parsed, dict):
            raise BadRequest(f'JSON body must be an object {{"{JSON_IMAGE_KEY}": "<base64>"}} '
                             f"or a v2 inference request, got a {type(parsed).__name__}")
        return parsed
    return data


def payload_bytes(item: Any) -> bytes:
    """Image bytes of one request item (raw, or JSON ``{"image": "<base64>"}``).

    Raises:
        BadRequest: no payload, malformed JSON or base64, or an unexpected type.
    """
    value = payload(item)
    return _from_json(value) if isinstance(value, dict) else value


def tensor_from_bytes(data: bytes, spec: PreprocessSpec,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """The (channels, crop, crop) tensor the server computes for one file's bytes: decoded and
    at once resized, so that a batch never holds more full-resolution images than the threads
    preparing it."""
    return to_tensor(decode_gray(data, max_pixels=max_pixels)[0], spec)


def prepare_item(item: Any, spec: PreprocessSpec,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """One request item's model input (its payload, then ``tensor_from_bytes``)."""
    return tensor_from_bytes(payload_bytes(item), spec, max_pixels)


def prediction_body(model: ServedModel, probs: np.ndarray, weights: np.ndarray | None = None,
                    warnings: Sequence[str] = (), fields: dict | None = None) -> dict:
    """JSON body of one answered image: the most probable class and the calibrated
    probabilities; ``fields`` (``ServedPolicy.fields``: the decision at the operating point, the
    prediction set, ``refer``, ``ood_score``); each learner's weight for an ensemble; the
    reasons to doubt the input, when there are any; the model card's sha256."""
    probs = np.asarray(probs, dtype=np.float64)
    body = {"model": model.name, "version": model.version,
            "prediction": model.class_names[int(np.argmax(probs))],
            "probabilities": {c: float(p) for c, p in zip(model.class_names, probs)},
            **(fields or {})}
    if weights is not None:
        body["learner_weights"] = {n: float(w) for n, w in zip(model.member_names, weights)}
    if warnings:
        body["warnings"] = list(warnings)
    if model.card_sha256:
        body["model_card_sha256"] = model.card_sha256
    return body


class ServerBusy(InputError):
    """This handler call already holds all the work it may take; retry the request."""

    status = 503


def error_answer(exc: InputError) -> Answer:
    """A 4xx answer naming the problem with one item (the message clipped: it may quote input)."""
    code = int(getattr(exc, "status", 400))
    kind = type(exc).__name__
    return Answer(code, kind, {"error": clip(f"{kind}: {exc}"), "code": code})


def internal_error(exc: BaseException, where: str) -> Answer:
    """The 500 answer of one item that met a fault of the server's own: a short error id in the
    answer, and under that id in the log the traceback's frames and the exception's text, clipped
    (it may quote the input)."""
    error_id = secrets.token_hex(4)
    frames = "".join(traceback.format_tb(exc.__traceback__)[-8:])
    log.error("internal error %s while %s: %s\n%s", error_id, where,
              clip(f"{type(exc).__name__}: {exc}", 200), frames)
    return Answer(500, "InternalError", {
        "error": f"InternalError: the server failed while {where} (error id {error_id}); the "
                 f"other requests of its batch are unaffected", "code": 500, "error_id": error_id})


def guarded(where: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or the answer its failure deserves: the one boundary around each step of
    one item. Typed input errors choose their 4xx; anything else is the server's fault and
    becomes that item's 500, never the batch's."""
    try:
        return fn(*args)
    except InputError as exc:
        return error_answer(exc)
    except Exception as exc:  # noqa: BLE001 - the per-item boundary
        return internal_error(exc, where)


@dataclass
class Prepared:
    """One image ready for the batch, with what its preparation cost."""

    tensor: torch.Tensor
    warnings: list[str]
    decode_s: float = 0.0
    preprocess_s: float = 0.0


@dataclass
class Request:
    """One TorchServe request item, read: its images and how to answer it.

    Attributes:
        inputs: per image, file bytes or an already-preprocessed (1, R, R) array (v2 FP32).
        v2: the parsed Open Inference Protocol request, None for a plain one.
        grpc: a v2 request that came over gRPC (its errors travel inside a v2 body).
        explain: what to explain, None when no explanation is asked for.
        dicom_out: the DICOM results asked for (``flannel.handlers.dicom_out``).
        overlay_only: the explanation is made for a Secondary Capture only (not asked itself),
            so the answer carries the capture, not the overlay PNG too.
    """

    inputs: list
    v2: v2.V2Request | None = None
    grpc: bool = False
    explain: ExplainRequest | None = None
    dicom_out: tuple[str, ...] = ()
    overlay_only: bool = False


@dataclass
class BatchStats:
    """What one batch cost and how its requests ended, for the handler's metrics."""

    items: int = 0
    statuses: dict[int, int] = field(default_factory=dict)  # HTTP status -> requests
    refused: dict[str, int] = field(default_factory=dict)  # error kind -> requests
    decode_ms: float = 0.0  # summed over the images (they are prepared on several threads)
    preprocess_ms: float = 0.0
    inference_ms: float = 0.0
    explain_ms: float = 0.0


def read_request(model: ServedModel, item: Any, headers: dict | None = None) -> Request | Answer:
    """Read one request item: a raw or JSON image, or a v2 request, and the explanation asked.

    Returns:
        The request, or the 4xx answer naming why it is malformed (in v2 form for a v2 request).
    """
    headers = headers or {}
    # TorchServe passes an HTTP request's headers (Host among them); a v2 gRPC call has none.
    grpc = not any(str(k).lower() == "host" for k in headers)
    parsed = None
    try:
        value = payload(item, model.json_values)
        if isinstance(value, dict) and v2.is_v2(value):
            try:
                request_id = v2.request_id(value)
            except InputError:
                request_id = ""
            parsed = v2.V2Request([], request_id)  # a refusal is answered in v2 form
            parsed = v2.parse_v2(value, model.spec.resize)
            inputs, options = parsed.inputs, parsed.parameters
        elif isinstance(value, dict):
            inputs = [_from_json(value)]
            options = {k: value.get(k) for k in ("explain", "target", "learner",
                                                 dicom_out.OPTION)}
        else:
            inputs, options = [value], {}
        return _with_options(Request(inputs, parsed, grpc and parsed is not None), headers,
                             item, options)
    except InputError as exc:
        return _refusal(model, Request([], parsed, grpc and parsed is not None),
                        error_answer(exc))


def _with_options(request: Request, headers: dict, item: Any, options: dict) -> Request:
    """``request`` with the explanation and DICOM results its options (a JSON body's fields or
    v2 parameters, else the item's form fields) ask for; a Secondary Capture of the overlay
    makes it an explaining request."""
    request.explain = explain_request(headers, item, options)
    asked = options.get(dicom_out.OPTION)
    if asked is None and isinstance(item, dict):
        asked = item.get(dicom_out.OPTION)
    request.dicom_out = dicom_out.parse_dicom_out(asked)
    if request.dicom_out:
        dicom_out.check_dicom_inputs(request.inputs)
        if "sc" in request.dicom_out and request.explain is None:
            request.explain, request.overlay_only = ExplainRequest(), True
    return request


def _prepare(model: ServedModel, data: bytes | np.ndarray) -> Prepared:
    """One image's model input and the reasons to doubt it.

    Raises:
        InputError: naming why the image has no input.
    """
    if isinstance(data, np.ndarray):  # v2 FP32: already the model's input
        return Prepared(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)), [])
    start = time.perf_counter()
    image, warnings = model.decode(data, max_pixels=model.max_pixels, strict=model.strict_input)
    decoded = time.perf_counter()
    tensor = to_tensor(image, model.spec)
    del image
    return Prepared(tensor, warnings, decoded - start, time.perf_counter() - decoded)


def _refusal(model: ServedModel, request: Request | None, answer: Answer,
             image: int | None = None) -> Answer:
    """A refused request's answer: as is, or in v2 form naming the failed image."""
    if request is None or request.v2 is None:
        return answer
    message = answer.body["error"]
    if image is not None and len(request.inputs) > 1:
        message = f"input element {image}: {message}"
    return Answer(answer.status, answer.phrase, v2.error_body(
        message, answer.status, model.name, model.version, request.v2.id, request.grpc))


def _check_explanation(model: ServedModel, request: Request) -> None:
    """Refuse, before any image is decoded, an explanation the archive cannot give (501) or
    that asks for more images than one call explains (429).

    Raises:
        InputError: naming the reason.
    """
    explainer = model.explainer
    if not explainer.available:
        raise ExplanationUnavailable(explainer.unavailable_reason())
    explainer.check_learner(request.explain)
    if len(request.inputs) > explainer.per_batch:
        raise ExplanationBusy(f"explanations take at most {explainer.per_batch} images per "
                              f"request, got {len(request.inputs)}")


def _take_explanations(model: ServedModel, requests: list, answers: list) -> None:
    """Give the call's ``explain_per_batch`` explanations to the explaining requests whose images
    all decoded, in order; the others get 429 (retry) and their predictions do not run."""
    per_batch = left = model.explainer.per_batch
    for i, request in enumerate(requests):
        if answers[i] is not None or request is None or request.explain is None:
            continue
        n = len(request.inputs)
        if n > left:
            answers[i] = _refusal(model, request, error_answer(ExplanationBusy(
                f"this batch already explains {per_batch - left} of at most {per_batch} images "
                f"per batch; retry")))
        else:
            left -= n


def _admit(model: ServedModel, requests: list, answers: list) -> None:
    """Refuse (503, retry) the requests whose images would take this call past
    ``MAX_IMAGES_PER_CALL``; the first request always fits (one v2 request carries at most as
    many)."""
    taken = 0
    for i, request in enumerate(requests):
        if answers[i] is not None:
            continue
        n = len(request.inputs)
        if taken + n > MAX_IMAGES_PER_CALL:
            answers[i] = _refusal(model, request, error_answer(ServerBusy(
                f"this batch already carries {taken} images, at most {MAX_IMAGES_PER_CALL} per "
                f"call; retry")))
        else:
            taken += n


def _answer(model: ServedModel, request: Request, prepared: list[Prepared],
            outputs: dict[str, np.ndarray], stats: BatchStats) -> Answer:
    """The 200 answer of one request whose images ran, with explanations when asked."""
    probs = outputs[model.output_name]
    weights = outputs.get(model.weights_output) if model.weights_output else None
    fields = served_fields(model, outputs)
    explanations = []
    if request.explain is not None:
        start = time.perf_counter()
        for p, row in zip(prepared, probs):
            explanations.append(model.explainer.explain(p.tensor, request.explain,
                                                        int(np.argmax(row))))
        stats.explain_ms += 1000 * (time.perf_counter() - start)
    warnings = [p.warnings + ([ood_warning(f["ood_score"])]
                              if f.get("ood_score", 0.0) > OOD_LIMIT else [])
                for p, f in zip(prepared, fields)]

    def body(j: int) -> dict:
        return prediction_body(model, probs[j], None if weights is None else weights[j],
                               warnings[j], fields[j])

    objects = [_dicom_objects(model, request, j, body(j), explanations)
               for j in range(len(prepared))] if request.dicom_out else []
    shown = [] if request.overlay_only else explanations
    if request.v2 is None:
        answer = body(0)
        if shown:
            answer["explanation"] = shown[0]
        if objects:
            answer["dicom"] = objects[0]
        return Answer(200, "OK", answer)
    outputs = (v2.probabilities_outputs(model.class_names, probs, weights, model.member_names)
               + v2.policy_outputs(fields, model.class_names, model.card_sha256))
    parameters = {}
    if shown:
        outputs.append(v2.output("explanation", v2.BYTES, [len(shown)],
                                 [e.pop("image_png_base64") for e in shown]))
        parameters["explanations"] = shown
    for kind in request.dicom_out:
        outputs.append(v2.output(f"dicom_{kind}", v2.BYTES, [len(objects)],
                                 [o[kind] for o in objects]))
    if any(warnings):
        outputs.append(v2.output("warnings", v2.BYTES, [len(warnings)],
                                 ["; ".join(w) for w in warnings]))
    return Answer(200, "OK", v2.answer(model.name, model.version, request.v2.id, outputs,
                                       None if request.grpc else parameters))


def _dicom_objects(model: ServedModel, request: Request, index: int, body: dict,
                   explanations: list[dict]) -> dict[str, str]:
    """The DICOM results image ``index`` of ``request`` asked for (``dicom_out``)."""
    return dicom_out.dicom_objects(
        request.dicom_out, request.inputs[index], body, model.class_names,
        model.artifact_sha256, model.max_pixels,
        explanations[index] if explanations else None)


def served_fields(model: ServedModel, outputs: dict[str, np.ndarray]) -> list[dict]:
    """``ServedPolicy.fields`` of each image of ``outputs`` (none without a policy)."""
    probs = outputs[model.output_name]
    if model.policy is None:
        return [{} for _ in probs]
    return model.policy.fields(probs, outputs[model.ood_output])


def _infer(model: ServedModel, prepared: list[Prepared], stats: BatchStats
           ) -> dict[str, np.ndarray]:
    """One backend call over ``prepared``: the graph's served outputs by name."""
    batch = torch.stack([p.tensor for p in prepared]).numpy()
    start = time.perf_counter()
    outputs = model.backend.run(batch)
    stats.inference_ms += 1000 * (time.perf_counter() - start)
    return outputs


def _run_requests(model: ServedModel, good: list[int], prepared: dict[int, list[Prepared]],
                  stats: BatchStats) -> dict[int, dict[str, np.ndarray] | Answer]:
    """Each good request's rows of the outputs of one backend call; should that call fail, each
    request runs alone, so a failure stays with the request that causes it."""
    try:
        outputs = _infer(model, [p for i in good for p in prepared[i]], stats)
    except Exception as exc:  # noqa: BLE001 - find the request that fails, answer the rest
        if len(good) == 1:
            return {good[0]: internal_error(exc, "running the model")}
        log.warning("backend call over %d requests failed (%s); running each alone", len(good),
                    type(exc).__name__)
        return {i: guarded("running the model", _infer, model, prepared[i], stats) for i in good}
    rows, row = {}, 0
    for i in good:
        n = len(prepared[i])
        rows[i] = {name: value[row:row + n] for name, value in outputs.items()}
        row += n
    return rows


def _first_out_of_distribution(model: ServedModel, rows: dict[str, np.ndarray]) -> int | None:
    scores = rows.get(model.ood_output) if model.ood_output else None
    if scores is None:
        return None
    over = np.flatnonzero(np.asarray(scores) > OOD_LIMIT)
    return int(over[0]) if over.size else None


def _check_in_distribution(model: ServedModel, rows: dict[str, np.ndarray]) -> None:
    """With ``strict_input``, refuse (422) a request holding an image whose out-of-distribution
    score fails; a warning in its answer otherwise."""
    if not model.strict_input:
        return
    j = _first_out_of_distribution(model, rows)
    if j is not None:
        raise NotAChestRadiograph(ood_warning(float(rows[model.ood_output][j]))
                                  + " (this model is served strict)")


def _bounded(model: ServedModel, request: Request | None, answer: Answer) -> Answer:
    """``answer``, once its JSON is known to be valid and under ``MAX_ANSWER_BYTES``."""
    try:
        size = len(answer.to_json())
    except Exception as exc:  # noqa: BLE001 - the last boundary: not JSON-serialisable, NaN...
        return _refusal(model, request, internal_error(exc, "writing the answer"))
    if size > MAX_ANSWER_BYTES:
        return _refusal(model, request, internal_error(ValueError(
            f"answer of {size} bytes, over the limit of {MAX_ANSWER_BYTES}"), "writing the answer"))
    return answer


def _answer_items(model: ServedModel, items: Sequence[Any], headers: Sequence[dict | None],
                  stats: BatchStats, requests: list, answers: list) -> None:
    """Fill ``answers`` for every item (see ``answer_batch``); ``requests`` gets each read one."""
    for i, item in enumerate(items):
        read = guarded("reading the request", read_request, model, item, headers[i])
        requests[i] = None if isinstance(read, Answer) else read
        answers[i] = read if isinstance(read, Answer) else None
        if requests[i] is not None and requests[i].explain is not None:
            refused = guarded("checking the explanation", _check_explanation, model, requests[i])
            if isinstance(refused, Answer):
                answers[i] = _refusal(model, requests[i], refused)
    _admit(model, requests, answers)
    deadline = time.monotonic() + PREPARE_BUDGET_S

    def prepare(unit: tuple[int, int]) -> Prepared | Answer:
        if time.monotonic() > deadline:
            return error_answer(ServerBusy(f"this batch spent its {PREPARE_BUDGET_S:.0f} s of "
                                           f"decoding before this image; retry"))
        return guarded("preparing an image", _prepare, model, requests[unit[0]].inputs[unit[1]])

    units = [(i, j) for i, r in enumerate(requests) if answers[i] is None
             for j in range(len(r.inputs))]
    prepared: dict[int, list[Prepared]] = {}
    for (i, j), result in zip(units, model.map_items(prepare, units)):
        if answers[i] is not None:
            continue
        if isinstance(result, Answer):
            answers[i] = _refusal(model, requests[i], result, j)
            prepared.pop(i, None)
        else:
            prepared.setdefault(i, []).append(result)
    _take_explanations(model, requests, answers)
    good = [i for i in prepared if answers[i] is None]
    if not good:
        return
    stats.decode_ms = 1000 * sum(p.decode_s for i in good for p in prepared[i])
    stats.preprocess_ms = 1000 * sum(p.preprocess_s for i in good for p in prepared[i])
    for i, rows in _run_requests(model, good, prepared, stats).items():
        if isinstance(rows, Answer):
            answers[i] = _refusal(model, requests[i], rows)
            continue
        refused = guarded("checking the input", _check_in_distribution, model, rows)
        if isinstance(refused, Answer):
            answers[i] = _refusal(model, requests[i], refused, _first_out_of_distribution(
                model, rows))
            continue
        for p in prepared[i]:
            if p.warnings:
                log.warning("request %d answered with warnings: %s", i,
                            clip("; ".join(p.warnings), 300))
        answer = guarded("answering", _answer, model, requests[i], prepared[i], rows, stats)
        answers[i] = answer if answer.status == 200 else _refusal(model, requests[i], answer)


def answer_batch(model: ServedModel, items: Sequence[Any], stats: BatchStats | None = None,
                 headers: Sequence[dict] | None = None) -> list[Answer]:
    """Answer every request of one TorchServe batch, in order.

    A request is one image (raw bytes or JSON) or a v2 request of N images. Images are decoded
    and preprocessed concurrently (``ServedModel.prepare_threads``); the images of all the
    requests that decoded run as one backend call. Each step of each item runs inside one
    boundary (``guarded``): a bad request gets its own 4xx naming the problem, a fault of the
    server's own on one item its own 500 with an error id, and no exception leaves this
    function. A call takes at most ``MAX_IMAGES_PER_CALL`` images and ``PREPARE_BUDGET_S`` of
    decoding; the requests beyond get 503 (retry). No answer is larger than
    ``MAX_ANSWER_BYTES``.

    Args:
        model: the loaded model.
        items: the list TorchServe passes to ``handle``.
        stats: filled with the batch's costs and outcomes when given.
        headers: each request's headers (TorchServe's request properties), when known.

    Returns:
        Exactly one ``Answer`` per item, in the same order.
    """
    stats = stats if stats is not None else BatchStats()
    requests: list[Request | None] = [None] * len(items)
    answers: list[Answer | None] = [None] * len(items)
    try:
        _answer_items(model, items, list(headers or [None] * len(items)), stats, requests,
                      answers)
    except Exception as exc:  # noqa: BLE001 - a fault outside every item: each still answered
        failed = internal_error(exc, "answering the batch")
        answers = [a if a is not None else _refusal(model, requests[i], failed)
                   for i, a in enumerate(answers)]
    answers = [_bounded(model, requests[i], a if a is not None else internal_error(
        RuntimeError("no answer was made"), "answering the batch")) for i, a in enumerate(answers)]
    log.info("batch of %d: %d answered, %d refused", len(items),
             sum(a.status == 200 for a in answers), sum(a.status != 200 for a in answers))
    stats.items = len(items)
    for answer in answers:
        stats.statuses[answer.status] = stats.statuses.get(answer.status, 0) + 1
        if answer.status != 200:
            stats.refused[answer.phrase] = stats.refused.get(answer.phrase, 0) + 1
    return answers
