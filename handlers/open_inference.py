"""Open Inference Protocol (KServe v2) requests and answers, as plain functions.

    curl -H "Authorization: Bearer $KEY" -d @request.json \\
        http://127.0.0.1:8080/v2/models/ensemble/infer

TorchServe 0.12 routes ``POST /v2/models/{name}/infer`` (and, with
``ts_open_inference_protocol=true``, the v2 gRPC ``ModelInfer``) to the handler with the JSON
body untouched; gRPC requests arrive converted to the same JSON, BYTES contents base64-encoded.
A request carries one input tensor, either

- ``BYTES``, shape ``[N]``: N encoded files (PNG, JPEG or DICOM), each a base64 string; or
- ``FP32``, shape ``[N, 1, R, R]``: N images already preprocessed to the archive's input spec
  (decoded, intensity policy, square resize to R), values in [0, 1], flat or nested;

and optional request ``parameters``: ``explain`` (true: add a Grad-CAM overlay per image),
``target`` (the class to explain), ``learner`` (explain one learner of an ensemble) and
``dicom_out`` (DICOM results, ``flannel.handlers.dicom_out``; over gRPC a second BYTES input of
that name, since request parameters are not forwarded there). The answer's outputs are
``probabilities`` (FP32 [N, K]), ``prediction`` (BYTES [N], class names), ``classes`` (BYTES
[K], the probability columns), for an ensemble ``learner_weights`` (FP32 [N, L]) and
``learners`` (BYTES [L]), the archive's answer policy (``flannel.handlers.answer_fields``):
``decision`` (BYTES [N], the class at the operating point), ``prediction_set`` (BOOL [N, K],
the conformal set over the ``classes`` columns), ``refer`` (BOOL [N]), ``ood_score`` (FP32 [N])
and ``model_card_sha256`` (BYTES [1], when the archive has a card), and when asked ``explanation`` (BYTES [N], base64 PNG), ``dicom_sr``
and ``dicom_sc`` (BYTES [N], base64 DICOM files) and ``warnings`` (BYTES [N]). A malformed
request is refused whole with a 4xx naming the expected shape, datatype or value.

TorchServe 0.12's v2 gRPC service forwards neither request nor response ``parameters`` (ask for
explanations over REST), and writes each BYTES output element as its JSON text (quoted); the
client (``flannel.handlers.client``) undoes that.
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from flannel.decode import InputError
from flannel.quoting import quote

BYTES, FP32, BOOL = "BYTES", "FP32", "BOOL"
# Images in one v2 request: bounds what one request may make a worker hold.
MAX_ITEMS = 32
# v2 "parameters" this handler reads; others are ignored, as the protocol allows.
PARAMETERS = ("explain", "target", "learner", "dicom_out")
# Inputs that carry an option instead of images (BYTES [1], the option's text base64-encoded,
# as TorchServe 0.12 converts a gRPC BYTES input): what a v2 gRPC client cannot send as a
# request parameter, since TorchServe 0.12 drops those.
OPTION_INPUTS = ("dicom_out",)
# Dimensions of an input tensor: FP32 takes four, BYTES one or two.
MAX_DIMS = 4
# Characters of a request "id", echoed in the answer (the protocol leaves its form open; a UUID
# takes 36).
MAX_ID_CHARS = 256


class V2RequestError(InputError):
    """A v2 request whose structure, shape, datatype or values do not match the model's input."""


class TooManyImages(V2RequestError):
    status = 413


@dataclass
class V2Request:
    """One parsed v2 request.

    Attributes:
        inputs: per image, the file bytes (BYTES) or a (1, R, R) float32 array (FP32).
        id: the request's ``id``, echoed in the answer.
        parameters: the request-level parameters this handler reads.
    """

    inputs: list
    id: str = ""
    parameters: dict = field(default_factory=dict)


def is_v2(body: Any) -> bool:
    """A JSON body shaped like a v2 inference request (an object with ``inputs``)."""
    return isinstance(body, dict) and "inputs" in body


def expected_inputs(input_side: int) -> str:
    return (f'one input tensor: {BYTES} with shape [N] (base64-encoded PNG, JPEG or DICOM files) '
            f'or {FP32} with shape [N, 1, {input_side}, {input_side}] (preprocessed, values in '
            f'[0, 1]), N from 1 to {MAX_ITEMS}')


def _shape(tensor: dict, expect: str) -> list[int]:
    shape = tensor.get("shape")
    if (not isinstance(shape, list) or not 1 <= len(shape) <= MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31
                       for d in shape)):
        raise V2RequestError(f'"shape" must be a list of 1 to {MAX_DIMS} whole numbers; expected '
                             f'{expect}, got {_shown(shape)}')
    return shape


def _shown(shape: Any) -> str:
    """A short rendering of a ``shape`` as sent: its elements when few, else its size."""
    if isinstance(shape, list) and len(shape) <= MAX_DIMS:
        return "[" + ", ".join(quote(d, 24) for d in shape) + "]"
    return quote(shape)


def _flatten(data: Any) -> list:
    if not isinstance(data, list):
        return [data]
    out: list = []
    stack = [iter(data)]
    while stack:  # iterative, so a deeply nested body cannot exhaust the recursion limit
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            out.append(value)
        else:
            stack.pop()
    return out


def _count(shape: Sequence[int], expect: str) -> int:
    n = shape[0]
    if not 1 <= n <= MAX_ITEMS:
        cls = TooManyImages if n > MAX_ITEMS else V2RequestError
        raise cls(f"a v2 request carries 1 to {MAX_ITEMS} images, got {n}; expected {expect}")
    return n


def _bytes_inputs(tensor: dict, input_side: int) -> list[bytes]:
    expect = f"{BYTES} shape [N]"
    shape = _shape(tensor, expect)
    if len(shape) != 1 and not (len(shape) == 2 and shape[1] == 1):
        raise V2RequestError(f"{BYTES} input has shape {shape}; expected [N] (one encoded file "
                             f"per element)")
    n = _count(shape, expect)
    data = _flatten(tensor.get("data"))
    if len(data) != n:
        raise V2RequestError(f'{BYTES} input of shape {shape} needs {n} elements in "data", '
                             f"got {len(data)}")
    out = []
    for i, value in enumerate(data):
        if not isinstance(value, str):
            raise V2RequestError(f"{BYTES} element {i} must be a base64 string, got "
                                 f"{type(value).__name__}")
        try:
            out.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise V2RequestError(f"{BYTES} element {i} is not valid base64: {exc}") from exc
    return out


def _fp32_inputs(tensor: dict, input_side: int) -> list[np.ndarray]:
    expect = f"{FP32} shape [N, 1, {input_side}, {input_side}]"
    shape = _shape(tensor, expect)
    if len(shape) != 4 or shape[1:] != [1, input_side, input_side]:
        raise V2RequestError(f"{FP32} input has shape {shape}; expected [N, 1, {input_side}, "
                             f"{input_side}] (this model's preprocessed input)")
    n = _count(shape, expect)
    data = _flatten(tensor.get("data"))
    want = n * input_side * input_side
    if len(data) != want:
        raise V2RequestError(f'{FP32} input of shape {shape} needs {want} values in "data", '
                             f"got {len(data)}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data):
        raise V2RequestError(f'{FP32} "data" must hold numbers only')
    array = np.asarray(data, dtype=np.float32).reshape(shape)
    if not np.isfinite(array).all():
        raise V2RequestError(f"{FP32} input holds NaN or infinity")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise V2RequestError(f"{FP32} input values span [{low:.3g}, {high:.3g}]; this model's "
                             f"preprocessed input is in [0, 1] (before normalisation)")
    return [array[i] for i in range(n)]


def parse_v2(body: dict, input_side: int) -> V2Request:
    """Check a v2 request against the model's input and take its images out.

    Args:
        body: the parsed JSON request.
        input_side: R of the model's (N, 1, R, R) input.

    Returns:
        The parsed request.

    Raises:
        V2RequestError: naming what was expected (400), or ``TooManyImages`` (413).
    """
    expect = expected_inputs(input_side)
    inputs = body.get("inputs")
    if isinstance(inputs, list) and all(isinstance(t, dict) for t in inputs):
        options = [t for t in inputs if t.get("name") in OPTION_INPUTS]
        inputs = [t for t in inputs if t.get("name") not in OPTION_INPUTS]
    else:
        options = []
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        count = len(inputs) if isinstance(inputs, list) else type(inputs).__name__
        raise V2RequestError(f'"inputs" must hold {expect}; got {count}')
    tensor = inputs[0]
    datatype = tensor.get("datatype")
    readers = {BYTES: _bytes_inputs, FP32: _fp32_inputs}
    if not isinstance(datatype, str) or datatype not in readers:
        raise V2RequestError(f"datatype {quote(datatype)} is not accepted; expected {expect}")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise V2RequestError(f'"parameters" must be an object, got {type(params).__name__}')
    params = {k: params[k] for k in PARAMETERS if k in params}
    for option in options:
        params.setdefault(option["name"], _option_text(option))
    return V2Request(readers[datatype](tensor, input_side), request_id(body), params)


def _option_text(tensor: dict) -> str:
    """The text of an option input (``OPTION_INPUTS``): one BYTES element, base64-encoded."""
    name = tensor["name"]
    data = _flatten(tensor.get("data"))
    if tensor.get("datatype") != BYTES or len(data) != 1 or not isinstance(data[0], str):
        raise V2RequestError(f'input "{name}" must be {BYTES} shape [1] holding one base64 text')
    try:
        return base64.b64decode(data[0], validate=True).decode("utf-8")
    except (binascii.Error, ValueError) as exc:
        raise V2RequestError(f'input "{name}" is not base64 of UTF-8 text: {exc}') from exc


def request_id(body: dict) -> str:
    """The request's ``id`` (echoed in the answer): a string of at most ``MAX_ID_CHARS``.

    Raises:
        V2RequestError: any other value.
    """
    value = body.get("id", "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or len(value) > MAX_ID_CHARS:
        raise V2RequestError(f'"id" must be a string of at most {MAX_ID_CHARS} characters, got '
                             f"{quote(value)}")
    return value


def output(name: str, datatype: str, shape: Sequence[int], data: list) -> dict:
    return {"name": name, "datatype": datatype, "shape": list(shape), "data": data}


def answer(model_name: str, version: str, request_id: str, outputs: list[dict],
           parameters: dict | None = None) -> dict:
    """A v2 inference response body."""
    body = {"id": request_id, "model_name": model_name, "model_version": version,
            "outputs": outputs}
    if parameters:
        body["parameters"] = parameters
    return body


def probabilities_outputs(class_names: Sequence[str], probs: np.ndarray,
                          weights: np.ndarray | None, learner_names: Sequence[str] = ()
                          ) -> list[dict]:
    """``probabilities``, ``prediction`` and ``classes`` (the columns' names) of N images, and
    for an ensemble ``learner_weights`` and ``learners``. The names travel as outputs because
    TorchServe's v2 gRPC answer drops response parameters."""
    probs = np.asarray(probs, dtype=np.float32)
    outs = [output("probabilities", FP32, probs.shape, [float(v) for v in probs.ravel()]),
            output("prediction", BYTES, [len(probs)],
                   [class_names[int(i)] for i in probs.argmax(axis=1)]),
            output("classes", BYTES, [len(class_names)], list(class_names))]
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float32)
        outs += [output("learner_weights", FP32, weights.shape,
                        [float(v) for v in weights.ravel()]),
                 output("learners", BYTES, [len(learner_names)], list(learner_names))]
    return outs


def policy_outputs(fields: Sequence[dict], class_names: Sequence[str],
                   card_sha256: str | None = None) -> list[dict]:
    """The answer policy's outputs of N images (``ServedPolicy.fields``; none without one)."""
    if not fields or not fields[0]:
        return []
    n = len(fields)
    sets = [name in f["prediction_set"] for f in fields for name in class_names]
    outs = [output("decision", BYTES, [n], [f["decision"] for f in fields]),
            output("prediction_set", BOOL, [n, len(class_names)], sets),
            output("refer", BOOL, [n], [f["refer"] for f in fields]),
            output("ood_score", FP32, [n], [float(f["ood_score"]) for f in fields])]
    if card_sha256:
        outs.append(output("model_card_sha256", BYTES, [1], [card_sha256]))
    return outs


def error_body(message: str, status: int, model_name: str, version: str, request_id: str,
               grpc: bool) -> dict:
    """A refused v2 request: ``{"error": ...}`` over REST (the protocol's error body). Over gRPC
    TorchServe 0.12 forwards only a response-shaped body and drops the handler's status, so the
    error travels as an ``error`` output (BYTES [1]) beside its HTTP ``code`` (INT32 [1])."""
    if not grpc:
        return {"error": message, "code": status}
    return answer(model_name, version, request_id,
                  [output("error", BYTES, [1], [message]), output("code", "INT32", [1], [status])])

