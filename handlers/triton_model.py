"""Triton Python-backend model: wires ``flannel.handlers.serving`` to Triton Inference Server.

    flannel serve start --runtime triton      # writes a model repository whose model.py is this

The counterpart of the TorchServe handler (``image_classifier.py``): each model's ``model.py``
in the repository imports ``TritonPythonModel`` from here, so all logic stays in the installed
``flannel`` package. Triton's dynamic batcher hands ``execute`` a list of requests; each becomes
the same Open Inference Protocol (v2) body TorchServe would pass its handler, and the whole list
is answered by ``serving.answer_batch``: one backend call over the images that decoded, each bad
request refused alone. Before anything loads, the unpacked archive is checked against the
operator's trust list (``flannel.handlers.trust``), as a TorchServe worker does.

Inputs (``config.pbtxt``, batch dimension first): ``image`` (BYTES [N, 1]: PNG, JPEG or DICOM
files, raw over gRPC or Triton's binary extension, base64 text in a JSON body) or ``pixels``
(FP32 [N, 1, R, R], preprocessed). The options ``explain``, ``target``, ``learner`` and
``dicom_out`` are request parameters, over REST and gRPC alike. A refused request is a Triton
error whose message starts with its HTTP status (``"422: ..."``): Triton itself answers any
error 400, 500 or 503, and the client (``flannel.handlers.client``) reads the exact status back.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Input names of the served model (``flannel.handlers.triton_repository`` declares them).
IMAGE_INPUT = "image"
PIXELS_INPUT = "pixels"
# Model-config parameters this adapter reads.
ARCHIVE_PARAM = "archive_dir"  # the unpacked archive, relative to the model's version folder
TRUST_PARAM = "trust_list"  # the operator's trust list (absolute)
GRAPH_PARAM = "graph_model"  # run the graph on this Triton model (BLS) instead of in-process
DEFAULT_ARCHIVE_DIR = "archive"
# Requests are answered in REST form (errors as {"error", "code"} bodies; serving.read_request
# takes a request without a Host header for TorchServe's v2 gRPC, whose errors travel as
# outputs); this adapter turns those bodies into Triton errors for REST and gRPC alike.
REST_HEADERS = {"host": "triton"}
# A base64 text element of a JSON body, as opposed to a file's raw bytes.
_BASE64 = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
# The product's own metrics, beside Triton's nv_* families on its metrics port.
METRIC_ITEMS = "flannel_items_total"
METRIC_REFUSED = "flannel_items_refused_total"
METRIC_TIMES = {"decode_ms": "flannel_decode_ms_total", "preprocess_ms": "flannel_preprocess_ms_total",
                "inference_ms": "flannel_inference_ms_total", "explain_ms": "flannel_explain_ms_total"}
METRIC_BATCH = "flannel_batch_requests"


def element_base64(value: bytes) -> str:
    """One BYTES element as the base64 text a v2 JSON body carries: a JSON body's element
    already is such text (Triton passes it as sent); raw file bytes (gRPC, the binary extension)
    are encoded. No PNG, JPEG or DICOM file is valid base64 (their first bytes are outside its
    alphabet), so the two never mix up."""
    if len(value) % 4 == 0 and _BASE64.fullmatch(value):
        try:
            base64.b64decode(value, validate=True)
            return value.decode("ascii")
        except (binascii.Error, ValueError):
            pass
    return base64.b64encode(value).decode("ascii")


def v2_body(inputs: dict[str, np.ndarray], request_id: str, parameters: dict) -> dict:
    """The v2 request body TorchServe would pass the handler for one Triton request."""
    tensors = []
    if IMAGE_INPUT in inputs:
        array = inputs[IMAGE_INPUT]
        tensors.append({"name": IMAGE_INPUT, "datatype": "BYTES", "shape": list(array.shape),
                        "data": [element_base64(bytes(v)) for v in array.ravel()]})
    if PIXELS_INPUT in inputs:
        array = inputs[PIXELS_INPUT]
        tensors.append({"name": PIXELS_INPUT, "datatype": "FP32", "shape": list(array.shape),
                        "data": array.ravel().tolist()})
    body: dict[str, Any] = {"id": request_id, "inputs": tensors}
    if parameters:
        body["parameters"] = parameters
    return body


_NUMPY = {"BYTES": np.object_, "FP32": np.float32, "BOOL": np.bool_, "INT32": np.int32}


def output_arrays(body: dict) -> dict[str, np.ndarray]:
    """A v2 answer's outputs as arrays (BYTES as UTF-8 bytes)."""
    arrays = {}
    for out in body["outputs"]:
        data = out["data"]
        if out["datatype"] == "BYTES":
            data = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in data]
        arrays[out["name"]] = np.array(data, dtype=_NUMPY[out["datatype"]]).reshape(out["shape"])
    return arrays


def error_message(status: int, body: dict) -> str:
    """A refusal as Triton carries it: the HTTP status first, then the reason."""
    return f"{status}: {body.get('error', 'refused')}"


def _parameters(request) -> dict:
    try:
        value = json.loads(request.parameters() or "{}")
    except (AttributeError, TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _request_body(request) -> dict:
    """The v2 body of one Triton request (``pb_utils.InferenceRequest``)."""
    inputs = {t.name(): t.as_numpy() for t in request.inputs()}
    return v2_body(inputs, request.request_id() or "", _parameters(request))


class TritonGraphBackend:
    """The served graph run by another Triton model through BLS (business-logic scripting):
    the ONNX Runtime or TensorRT backend of a full Triton install, batched by its own dynamic
    batcher. Same call as ``flannel.backends.Backend.run``."""

    def __init__(self, model_name: str, input_name: str, output_names: list[str],
                 score_names: tuple[str, ...] = ()) -> None:
        self.model_name = model_name
        self.input_name = input_name
        self.output_names = output_names
        self.score_names = score_names

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        import triton_python_backend_utils as pb_utils

        request = pb_utils.InferenceRequest(
            model_name=self.model_name, requested_output_names=self.output_names,
            inputs=[pb_utils.Tensor(self.input_name, np.ascontiguousarray(batch, np.float32))])
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{self.model_name}: {response.error().message()}")
        outputs = {}
        for name in self.output_names:
            value = pb_utils.get_output_tensor_by_name(response, name).as_numpy()
            # A per-image score is declared dims [1] with a reshape to [] on the graph model
            # (a batching model's outputs need a dimension), and arrives as [N, 1].
            if value.ndim == 2 and value.shape[1] == 1 and name in self.score_names:
                value = value.reshape(len(batch))
            outputs[name] = value
        return outputs


class TritonPythonModel:
    """One archive served by Triton's Python backend."""

    def initialize(self, args: dict) -> None:
        from flannel.artifacts import graph_spec
        from flannel.handlers import serving, trust

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        model_dir = (Path(args["model_repository"]) / args["model_version"]
                     / params.get(ARCHIVE_PARAM, DEFAULT_ARCHIVE_DIR))
        # Raises TrustError unless the folder holds exactly the files of a listed archive:
        # Triton then reports the model as failed to load.
        archive = trust.TrustedArchive(model_dir, params.get(TRUST_PARAM) or None)
        handler_config = dict(archive.model_config().get("handler") or {})
        version = archive.mar_manifest().get("model", {}).get("modelVersion", "1")
        self.served = serving.load_served_model(model_dir, handler_config, version=version,
                                                name=args["model_name"], source=archive)
        if params.get(GRAPH_PARAM):
            graph = graph_spec(archive.manifest)
            self.served.backend = TritonGraphBackend(params[GRAPH_PARAM], graph.input_name,
                                                     list(graph.served_outputs),
                                                     graph.score_outputs)
        log.info("%s matches %s on the trust list %s", model_dir, archive.name,
                 archive.trust_list)
        self._metrics = _Metrics(args["model_name"])

    def execute(self, requests: list) -> list:
        """Answer one dynamic batch: one response per request, in order. A request that cannot
        even be read, or whose answer cannot be written, gets its own 500 with an error id; the
        others of the batch are answered as if it were not there."""
        from flannel.handlers import serving

        answers: list = []
        for request in requests:
            answers.append(serving.guarded("reading the request", _request_body, request))
        readable = [i for i, a in enumerate(answers) if not isinstance(a, serving.Answer)]
        stats = serving.BatchStats()
        for i, answer in zip(readable, serving.answer_batch(
                self.served, [answers[i] for i in readable], stats,
                [dict(REST_HEADERS) for _ in readable])):
            answers[i] = answer
        responses = [self._response(answer) for answer in answers]
        try:
            self._metrics.report(stats)
        except Exception as exc:  # noqa: BLE001 - metrics never cost a batch its answers
            log.warning("metrics of this batch not recorded: %s", type(exc).__name__)
        return responses

    @staticmethod
    def _response(answer):
        """One answer as Triton's response: its outputs, or an error whose message starts with
        the status; an answer whose outputs cannot be made into tensors becomes a 500."""
        import triton_python_backend_utils as pb_utils

        from flannel.handlers import serving

        if answer.status == 200:
            try:
                tensors = [pb_utils.Tensor(name, array)
                           for name, array in output_arrays(answer.body).items()]
                return pb_utils.InferenceResponse(output_tensors=tensors)
            except Exception as exc:  # noqa: BLE001 - the last boundary of this one answer
                answer = serving.internal_error(exc, "writing the answer")
        log.warning("request refused: %s", answer.reason)
        code = (pb_utils.TritonError.UNAVAILABLE if answer.status in (429, 503)
                else pb_utils.TritonError.INVALID_ARG if answer.status < 500
                else pb_utils.TritonError.INTERNAL)
        return pb_utils.InferenceResponse(
            output_tensors=[],
            error=pb_utils.TritonError(error_message(answer.status, answer.body), code))

    def finalize(self) -> None:
        log.info("unloading %s", self.served.name)


class _Metrics:
    """The handler's own counters and batch sizes on Triton's metrics endpoint."""

    def __init__(self, model: str) -> None:
        import triton_python_backend_utils as pb_utils

        family = pb_utils.MetricFamily
        self.labels = {"model": model}
        self.items = family(METRIC_ITEMS, "requests answered, by HTTP status", family.COUNTER)
        self.refused = family(METRIC_REFUSED, "requests refused, by reason", family.COUNTER)
        self.times = {attr: family(name, f"{attr.split('_')[0]} time summed over images (ms)",
                                   family.COUNTER) for attr, name in METRIC_TIMES.items()}
        self.batch = family(METRIC_BATCH, "requests per dynamic batch", family.HISTOGRAM)
        self._batch = self.batch.Metric(labels=self.labels,
                                        buckets=[1, 2, 4, 8, 16, 32, 64])
        self._times = {attr: fam.Metric(labels=self.labels) for attr, fam in self.times.items()}
        self._by_status: dict[int, Any] = {}
        self._by_reason: dict[str, Any] = {}

    def report(self, stats) -> None:
        for status, count in stats.statuses.items():
            metric = self._by_status.get(status)
            if metric is None:
                metric = self._by_status[status] = self.items.Metric(
                    labels={**self.labels, "status": str(status)})
            metric.increment(count)
        for reason, count in stats.refused.items():
            metric = self._by_reason.get(reason)
            if metric is None:
                metric = self._by_reason[reason] = self.refused.Metric(
                    labels={**self.labels, "reason": reason})
            metric.increment(count)
        for attr, metric in self._times.items():
            metric.increment(float(getattr(stats, attr)))
        if stats.items:
            self._batch.observe(float(stats.items))
