"""TorchServe handler: wires ``flannel.handlers.serving`` to TorchServe's context.

    flannel archive runs/x && flannel serve start --config config.properties

Packed into the .mar by ``flannel archive``; TorchServe imports it in each worker. All logic lives
in ``serving.py`` (the installed ``flannel`` package), so this class stays a thin adapter. Before
anything is loaded, the unpacked archive is checked against the operator's trust list
(``flannel.handlers.trust``), and every artifact is loaded from bytes checked as they are read.
"""
from __future__ import annotations

import os
import sys

# TorchServe puts the unpacked archive on the worker's PYTHONPATH, ahead of site-packages: a
# `flannel` package shipped inside an archive would be imported instead of the installed one,
# before any check could run. This folder leaves the path before anything else is imported;
# initialize() then refuses the extra files.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]

import logging  # noqa: E402

from ts.torch_handler.base_handler import BaseHandler  # noqa: E402

from flannel.handlers import serving, trust  # noqa: E402

log = logging.getLogger(__name__)

JSON_CONTENT_TYPE = "application/json"


class ImageClassifier(BaseHandler):
    """Chest X-ray classifier served from a verified export on the archive's backend."""

    def initialize(self, context) -> None:
        """Check the unpacked archive against the trust list, then load spec, classes and the
        backend from checked bytes."""
        self.context = context
        model_dir = context.system_properties["model_dir"]
        # Raises TrustError unless the folder holds exactly the files of an archive on the
        # operator's trust list: TorchServe then reports the load as failed.
        archive = trust.TrustedArchive(model_dir)
        # model-config.yaml and MANIFEST.json as listed: TorchServe read them before the check.
        handler_config = dict(archive.model_config().get("handler") or {})
        if context.system_properties.get("gpu_id") is not None:  # deviceType gpu
            handler_config.setdefault("device_id", int(context.system_properties["gpu_id"]))
        version = archive.mar_manifest().get("model", {}).get("modelVersion", "1")
        self.served = serving.load_served_model(model_dir, handler_config, version=version,
                                                name=getattr(context, "model_name", None),
                                                source=archive)
        log.info("%s matches %s on the trust list %s", model_dir, archive.name,
                 archive.trust_list)
        self.initialized = True

    def handle(self, data, context):
        """Answer a whole TorchServe batch: one JSON string per request, in order."""
        stats = serving.BatchStats()
        headers = [request_headers(context, idx) for idx in range(len(data))]
        answers = serving.answer_batch(self.served, data, stats, headers)
        request_ids = getattr(context, "request_ids", None) or {}
        for idx, answer in enumerate(answers):
            context.set_response_content_type(idx, JSON_CONTENT_TYPE)
            if answer.status != 200:
                context.set_response_status(answer.status, answer.phrase, idx)
                log.warning("request %s refused: %s", request_ids.get(idx, f"#{idx}"),
                            answer.reason)
        try:
            report_metrics(context.metrics, stats)
        except Exception as exc:  # noqa: BLE001 - metrics never cost a batch its answers
            log.warning("metrics of this batch not recorded: %s", type(exc).__name__)
        return [answer.to_json() for answer in answers]


def request_headers(context, idx: int) -> dict:
    """One request's headers (TorchServe's request properties); empty when it keeps none."""
    try:
        return dict(context.get_all_request_header(idx) or {})
    except (AttributeError, IndexError, KeyError, TypeError):
        return {}


# Custom metrics on TorchServe's metrics endpoint (config.properties turns on
# model_metrics_auto_detect, so the frontend registers them as they first appear).
ITEMS = "FlannelItems"  # counter, by HTTP status
REFUSED = "FlannelItemsRefused"  # counter, by error kind (DecodeError, UnsupportedImage, ...)
BATCH_SIZE = "FlannelBatchSize"  # histogram of the items per handler call
# Histograms, per batch (item times summed).
TIMES = {"decode_ms": "FlannelDecodeMs", "preprocess_ms": "FlannelPreprocessMs",
         "inference_ms": "FlannelInferenceMs", "explain_ms": "FlannelExplainMs"}


def report_metrics(metrics, stats: serving.BatchStats) -> None:
    """Add one batch's outcomes and costs to TorchServe's metric cache."""
    from ts.metrics.dimension import Dimension
    from ts.metrics.metric_type_enum import MetricTypes

    for status, count in sorted(stats.statuses.items()):
        metrics.add_counter(ITEMS, count, dimensions=[Dimension("Status", str(status))])
    for kind, count in sorted(stats.refused.items()):
        metrics.add_counter(REFUSED, count, dimensions=[Dimension("Reason", kind)])
    metrics.add_metric(BATCH_SIZE, stats.items, "Count", metric_type=MetricTypes.HISTOGRAM)
    for attr, name in TIMES.items():
        metrics.add_time(name, getattr(stats, attr), metric_type=MetricTypes.HISTOGRAM)
