"""Serving logic as plain functions: request item -> image bytes -> tensor -> backend -> JSON.

    python -c "from flannel.handlers.serving import load_served_model; print(load_served_model('model_dir'))"

The TorchServe handler (``image_classifier.py``) only wires these functions to TorchServe's context,
so everything here is tested without a server. It reads only the artifact manifest
(``flannel.artifacts``): the kind, graph names, the input spec, and the pins it re-checks before
serving, so one code path serves a learner or an ensemble archive, on the backend that
model-config.yaml names (``flannel.handlers.backends``). One batch from TorchServe becomes one
backend call over the items that decoded; each bad item gets its own 4xx answer
and the rest are answered. An ensemble's answer also carries each learner's weight, by name.
Nothing from a request is ever unpickled: inputs are image bytes or base64 inside JSON.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from flannel.artifacts import (INDEX_TO_NAME, INPUT_SPEC, REFERENCE_INPUT, artifact_path,
                               graph_spec, verify_manifest)
from flannel.cpus import threads_per_worker
from flannel.decode import (DEFAULT_MAX_PIXELS, DecodeError, InputError, NotAChestRadiograph,
                            decode_image, out_of_distribution)
from flannel.pins import check_pins
from flannel.handlers.backends import Backend, backend_spec, load_backend
from flannel.preprocess import PreprocessSpec, preprocess_batch, to_tensor

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


class BadRequest(InputError):
    """The request itself is malformed (bad JSON, bad base64, no payload, wrong type)."""


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
    kind: str = "learner"
    member_names: tuple[str, ...] = ()
    weights_output: str | None = None  # an ensemble's per-learner weights
    # Items of a batch are decoded and preprocessed concurrently by this many threads (PIL's
    # decoders and numpy release the GIL): on a radiograph-sized file that work costs several
    # times the model's, so doing it one item after another would cap the batch's throughput.
    prepare_threads: int = 1
    max_pixels: int = DEFAULT_MAX_PIXELS  # refuse larger images before decoding them
    # A DICOM whose header says it is not a chest radiograph: answered with a "warnings" field
    # (default), or refused with 422 when strict (model-config.yaml handler.strict_input).
    strict_input: bool = False
    _pool: Any = field(default=None, repr=False, compare=False)

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

    def to_json(self) -> str:
        return json.dumps(self.body)


def resolve_threads(handler_config: dict) -> int:
    """Intra-op threads of this worker: the user's ``intra_op_threads`` when set, else the cores
    this process may use (affinity and cgroup quota) divided by the model's workers."""
    if handler_config.get("intra_op_threads"):
        return int(handler_config["intra_op_threads"])
    return threads_per_worker(int(handler_config.get("workers") or 1))


def read_class_names(path: str | Path) -> list[str]:
    """Class names in output order from an ``index_to_name.json`` file ({"0": name, ...})."""
    mapping = json.loads(Path(path).read_text())
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
                      version: str = "1", name: str | None = None) -> ServedModel:
    """Verify the manifest and the pins, then load the spec, class names and the backend.

    Args:
        model_dir: folder holding ``manifest.json`` and the artifacts it lists (an unpacked .mar
            or an export folder).
        handler_config: the ``handler`` section of model-config.yaml: ``backend``,
            ``intra_op_threads`` (unset: decided here, see ``resolve_threads``) and ``workers``;
            ``max_pixels`` (see ``MAX_PIXELS_ENV``); the handler adds ``device_id``
            (TorchServe's gpu_id) for GPU backends.
        version: the model version reported in every answer (the archive's version).
        name: the model name reported in every answer (the name it is served under; default
            the manifest's ``model_name``).

    Returns:
        The loaded model.

    Raises:
        ManifestError: an artifact is missing or its sha256 differs; nothing is loaded then.
        PinMismatch: the installed preprocessing code computes another tensor for the reference
            image than the exporting code did.
    """
    model_dir = Path(model_dir)
    manifest = verify_manifest(model_dir)  # before any artifact is parsed or loaded
    graph = graph_spec(manifest)
    cfg = handler_config or {}
    backend = backend_spec(cfg.get("backend"))
    threads = resolve_threads(cfg)
    spec = PreprocessSpec.load(artifact_path(model_dir, manifest, INPUT_SPEC))
    pin = check_pins(manifest["pins"], spec,
                     np.load(artifact_path(model_dir, manifest, REFERENCE_INPUT)))
    log.info("reference tensor %s (%s)", pin.computed_sha256[:12],
             "exact" if pin.exact else f"within float rounding, max abs diff {pin.max_abs_diff:.2g}")
    class_names = read_class_names(artifact_path(model_dir, manifest, INDEX_TO_NAME))
    if list(manifest.get("class_names", class_names)) != class_names:
        raise ValueError(f"{INDEX_TO_NAME} {class_names} disagrees with the manifest "
                         f"{manifest['class_names']}")
    members = tuple(m["name"] for m in manifest.get("members", []))
    weights = next(iter(graph.answer_outputs), None)
    engine = load_backend(backend, model_dir, manifest, graph, threads,
                          device_id=int(cfg.get("device_id") or 0))
    log.info("loaded %s %s (%s) from %s on %s with intra_op_threads=%d", graph.kind,
             manifest["model_name"], ", ".join(members), model_dir, backend.name, threads)
    return ServedModel(name=name or manifest["model_name"], version=str(version),
                       class_names=class_names, spec=spec, backend=engine,
                       input_name=graph.input_name, output_name=graph.decision_output,
                       kind=graph.kind, member_names=members, weights_output=weights,
                       prepare_threads=threads, max_pixels=serving_max_pixels(cfg),
                       strict_input=bool(cfg.get("strict_input", False)))


def _from_json(obj: Any) -> bytes:
    if not isinstance(obj, dict) or JSON_IMAGE_KEY not in obj:
        raise BadRequest(f'JSON body must be an object {{"{JSON_IMAGE_KEY}": "<base64>"}}')
    encoded = obj[JSON_IMAGE_KEY]
    if not isinstance(encoded, str):
        raise BadRequest(f'"{JSON_IMAGE_KEY}" must be a base64 string, got {type(encoded).__name__}')
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f'"{JSON_IMAGE_KEY}" is not valid base64: {exc}') from exc


def _looks_like_json(data: bytes) -> bool:
    return data.lstrip()[:1] in (b"{", b"[")


def payload_bytes(item: Any) -> bytes:
    """Image bytes of one TorchServe request item.

    Accepts raw image bytes, or JSON ``{"image": "<base64>"}`` given as a dict (TorchServe parsed
    it), as bytes or as text.

    Args:
        item: one element of the list TorchServe passes to ``handle``.

    Returns:
        The file bytes (not yet decoded).

    Raises:
        BadRequest: no payload, malformed JSON or base64, or an unexpected type.
    """
    value = item
    if isinstance(item, dict):
        value = next((item[k] for k in PAYLOAD_KEYS if item.get(k) is not None), None)
        if value is None and isinstance(item.get(JSON_IMAGE_KEY), str):
            value = item  # already-parsed JSON {"image": "<base64>"}
        elif value is None and len(item) == 1:
            value = next(iter(item.values()))  # a form field with another name
    if value is None:
        raise BadRequest("request has no payload: send the image as the body or as "
                         f'JSON {{"{JSON_IMAGE_KEY}": "<base64>"}}')
    if isinstance(value, dict):
        return _from_json(value)
    if isinstance(value, str):
        value = value.encode("utf-8")
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise BadRequest(f"unsupported payload type {type(value).__name__}")
    data = bytes(value)
    if _looks_like_json(data):
        try:
            return _from_json(json.loads(data.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadRequest(f"body starts like JSON but is not valid JSON: {exc}") from exc
    return data


def tensor_from_bytes(data: bytes, spec: PreprocessSpec,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """The (channels, crop, crop) tensor the server computes for one file's bytes: decoded and
    at once resized, so that a batch never holds more full-resolution images than the threads
    preparing it."""
    return to_tensor(decode_image(data, max_pixels=max_pixels), spec)


def prepare_item(item: Any, spec: PreprocessSpec,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """One request item's model input (its payload, then ``tensor_from_bytes``)."""
    return tensor_from_bytes(payload_bytes(item), spec, max_pixels)


def run_batch(model: ServedModel, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """One backend call over decoded images.

    Returns:
        Output name -> array: the decision output (N, num_classes) float32 probabilities, and for
        an ensemble its learner weights (N, learners).
    """
    return model.backend.run(preprocess_batch(images, model.spec).numpy())


def prediction_body(model: ServedModel, probs: np.ndarray, weights: np.ndarray | None = None,
                    warnings: Sequence[str] = ()) -> dict:
    """JSON body of one answered image (with each learner's weight for an ensemble, and the
    reasons to doubt the input, when there are any)."""
    probs = np.asarray(probs, dtype=np.float64)
    body = {"model": model.name, "version": model.version,
            "prediction": model.class_names[int(np.argmax(probs))],
            "probabilities": {c: float(p) for c, p in zip(model.class_names, probs)}}
    if weights is not None:
        body["learner_weights"] = {n: float(w) for n, w in zip(model.member_names, weights)}
    if warnings:
        body["warnings"] = list(warnings)
    return body


def error_answer(exc: InputError) -> Answer:
    """A 4xx answer naming the problem with one item."""
    code = int(getattr(exc, "status", 400))
    kind = type(exc).__name__
    return Answer(code, kind, {"error": f"{kind}: {exc}", "code": code})


@dataclass
class Prepared:
    """One item ready for the batch, with what its preparation cost."""

    tensor: torch.Tensor
    warnings: list[str]
    decode_s: float
    preprocess_s: float


@dataclass
class BatchStats:
    """What one batch cost and how its items ended, for the handler's metrics."""

    items: int = 0
    statuses: dict[int, int] = field(default_factory=dict)  # HTTP status -> items
    refused: dict[str, int] = field(default_factory=dict)  # error kind -> items
    decode_ms: float = 0.0  # summed over the items (they are prepared on several threads)
    preprocess_ms: float = 0.0
    inference_ms: float = 0.0


def _prepare(model: ServedModel, item: Any) -> Prepared | Answer:
    """One item's model input and the reasons to doubt it, or the 4xx answer naming why it has
    no input."""
    try:
        data = payload_bytes(item)
        warnings = out_of_distribution(data)
        if warnings and model.strict_input:
            raise NotAChestRadiograph("; ".join(warnings) + " (this model is served strict)")
        start = time.perf_counter()
        image = decode_image(data, max_pixels=model.max_pixels)
        decoded = time.perf_counter()
        tensor = to_tensor(image, model.spec)
        del image
        return Prepared(tensor, warnings, decoded - start, time.perf_counter() - decoded)
    except InputError as exc:
        return error_answer(exc)
    except Exception as exc:  # noqa: BLE001 - a decoder bug must not drop the other items
        log.exception("unexpected decode failure")
        return error_answer(DecodeError(f"cannot decode input: {exc}"))


def answer_batch(model: ServedModel, items: Sequence[Any],
                 stats: BatchStats | None = None) -> list[Answer]:
    """Answer every item of one TorchServe batch, in order.

    Items are decoded and preprocessed concurrently (``ServedModel.prepare_threads``); those that
    fail get their own 4xx, the others run as one backend call.

    Args:
        model: the loaded model.
        items: the list TorchServe passes to ``handle``.
        stats: filled with the batch's costs and outcomes when given.

    Returns:
        Exactly one ``Answer`` per item, in the same order.
    """
    prepared = model.map_items(lambda item: _prepare(model, item), items)
    good_idx = [i for i, p in enumerate(prepared) if not isinstance(p, Answer)]
    answers: list[Answer | None] = [p if isinstance(p, Answer) else None for p in prepared]
    inference_s = 0.0
    if good_idx:
        batch = torch.stack([prepared[i].tensor for i in good_idx]).numpy()
        start = time.perf_counter()
        outputs = model.backend.run(batch)
        inference_s = time.perf_counter() - start
        probs = outputs[model.output_name]
        weights = outputs.get(model.weights_output) if model.weights_output else None
        for j, i in enumerate(good_idx):
            warnings = prepared[i].warnings
            if warnings:
                log.warning("item %d answered with warnings: %s", i, "; ".join(warnings))
            answers[i] = Answer(200, "OK", prediction_body(
                model, probs[j], None if weights is None else weights[j], warnings))
    log.info("batch of %d: %d answered, %d refused", len(items), len(good_idx),
             len(items) - len(good_idx))
    if stats is not None:
        stats.items = len(items)
        for answer in answers:
            stats.statuses[answer.status] = stats.statuses.get(answer.status, 0) + 1
            if answer.status != 200:
                stats.refused[answer.phrase] = stats.refused.get(answer.phrase, 0) + 1
        good = [prepared[i] for i in good_idx]
        stats.decode_ms = 1000 * sum(p.decode_s for p in good)
        stats.preprocess_ms = 1000 * sum(p.preprocess_s for p in good)
        stats.inference_ms = 1000 * inference_s
    return answers  # type: ignore[return-value]
