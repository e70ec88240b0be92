"""The baseline a new TorchServe user would write: TorchServe's stock image-classifier style.

    packed by ``flannel.benchmarks.serve.build_stock_archive``; not used for serving the product

A TorchScript trace of the eager model loaded by ``BaseHandler``, each request decoded with PIL and
transformed with torchvision on its own, one eager forward per request (the archive sets batch
size 1), and the top class looked up in ``index_to_name.json``. It mirrors TorchServe's stock
``image_classifier`` handler, whose ``VisionHandler`` base imports captum (not installed here).
PNG and JPEG only, as there.
"""
from __future__ import annotations

import io
import json

import torch
from PIL import Image
from torchvision import transforms
from ts.torch_handler.base_handler import BaseHandler


class StockImageClassifier(BaseHandler):
    """Per-request preprocessing in the stock handler's style."""

    image_processing = None

    def initialize(self, context):
        super().initialize(context)  # torch.jit.load of the serialized file, eval mode
        props = context.system_properties
        with open(f"{props['model_dir']}/stock_config.json") as fh:
            config = json.load(fh)
        self.image_processing = transforms.Compose([
            transforms.Grayscale(1), transforms.Resize((config["side"], config["side"])),
            transforms.ToTensor()])
        with open(f"{props['model_dir']}/index_to_name.json") as fh:
            mapping = json.load(fh)
        self.classes = [mapping[str(i)] for i in range(len(mapping))]

    def preprocess(self, data):
        images = []
        for row in data:
            image = row.get("data") or row.get("body")
            images.append(self.image_processing(Image.open(io.BytesIO(image))))
        return torch.stack(images)

    def inference(self, data, *args, **kwargs):
        with torch.no_grad():
            out = self.model(data)
        return out[0] if isinstance(out, (tuple, list)) else out

    def postprocess(self, data):
        return [{"prediction": self.classes[int(p.argmax())],
                 "probabilities": dict(zip(self.classes, map(float, p)))} for p in data]
