"""TorchServe handler: wires ``flannel.handlers.serving`` to TorchServe's context.

    flannel archive runs/x && torchserve --start --ts-config config.properties

Packed into the .mar by ``flannel archive``; TorchServe imports it in each worker. All logic lives
in ``serving.py`` (the installed ``flannel`` package), so this class stays a thin adapter.
"""
from __future__ import annotations

import logging

from ts.torch_handler.base_handler import BaseHandler

from flannel.handlers import serving

log = logging.getLogger(__name__)

JSON_CONTENT_TYPE = "application/json"


class ImageClassifier(BaseHandler):
    """Chest X-ray classifier served from a verified export on the archive's backend."""

    def initialize(self, context) -> None:
        """Verify the archive's manifest (sha256), then load spec, classes and the backend."""
        self.context = context
        model_dir = context.system_properties["model_dir"]
        handler_config = dict((context.model_yaml_config or {}).get("handler") or {})
        if context.system_properties.get("gpu_id") is not None:  # deviceType gpu
            handler_config.setdefault("device_id", int(context.system_properties["gpu_id"]))
        version = (context.manifest or {}).get("model", {}).get("modelVersion", "1")
        # Raises ManifestError on a modified artifact: TorchServe then reports the load as failed.
        self.served = serving.load_served_model(model_dir, handler_config, version=version,
                                                name=getattr(context, "model_name", None))
        self.initialized = True

    def handle(self, data, context):
        """Answer a whole TorchServe batch: one JSON string per request, in order."""
        answers = serving.answer_batch(self.served, data)
        for idx, answer in enumerate(answers):
            context.set_response_content_type(idx, JSON_CONTENT_TYPE)
            if answer.status != 200:
                context.set_response_status(answer.status, answer.phrase, idx)
        return [answer.to_json() for answer in answers]
