"""Grad-CAM explanations in the server: what a request asks for, and the eager model that answers.

    curl -H "Authorization: Bearer $KEY" --data-binary @chest.png \\
        http://127.0.0.1:8080/explanations/ensemble
    curl ... "http://127.0.0.1:8080/predictions/ensemble?explain=true&target=COVID-19"

An explanation is computed on the eager fp32 copy of the served graph (the archive's
``model.eager.pt``, loaded at the first explanation request), on the same preprocessed tensor the
backend predicted on, for the class the backend predicted unless ``target`` names another.
``learner`` explains one learner of an ensemble. Explanations cost a forward and a backward pass
of the eager graph, several times a prediction, so each handler call answers at most
``explain_per_batch`` of them (model-config.yaml ``handler.explain_per_batch``, default 1); the
others in that batch get 429 and can be retried, and predictions batched with them still run.
"""
from __future__ import annotations

import base64
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from flannel.artifacts import EAGER_FP32
from flannel.decode import InputError
from flannel.quoting import quote

log = logging.getLogger(__name__)

DEFAULT_PER_BATCH = 1
# A class index sent as text: ASCII digits only (str.isdigit also admits "²" and other digits
# that int() refuses).
_INDEX = re.compile(r"-?[0-9]{1,6}")
METHOD = "grad-cam"


class ExplanationUnavailable(InputError):
    """The archive carries no eager weights (built with ``--no-explanations``)."""

    status = 501


class ExplanationBusy(InputError):
    """This batch already used its explanation budget; retry."""

    status = 429


@dataclass(frozen=True)
class ExplainRequest:
    """What one request asks to have explained."""

    target: str | int | None = None  # class name or index; None: the served prediction
    learner: str | None = None  # one learner of an ensemble; None: the served graph


def as_flag(value: Any) -> bool:
    """A yes/no option as it arrives: a JSON or v2 bool, a number, or the text of a form field
    or gRPC input (true/false, 1/0, yes/no).

    Raises:
        InputError: any other value (400).
    """
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    if isinstance(value, (bool, int)) or (isinstance(value, float) and value == value):
        return bool(value)
    raise InputError(f"explain must be true or false, got {quote(value)}")


def _text(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", errors="replace")
    return value


def explain_request(headers: Mapping[str, str], item: Any, options: Mapping[str, Any]
                    ) -> ExplainRequest | None:
    """Whether a request asks for an explanation, and of what.

    Args:
        headers: the request's headers as TorchServe passes them (the ``/explanations`` route
            sets ``explain: True``).
        item: the TorchServe request item (query parameters arrive as its keys).
        options: ``explain``/``target``/``learner`` from a JSON body or v2 parameters.

    Returns:
        None when no explanation is asked for.

    Raises:
        InputError: an option of the wrong type or value (checked whether or not an explanation
            is asked for, so that a mistyped option never passes silently).
    """
    query = item if isinstance(item, dict) else {}
    merged = {k: _text(query[k]) for k in ("explain", "target", "learner") if k in query}
    merged.update({k: v for k, v in options.items() if v is not None})
    target, learner = _target(merged.get("target")), _learner(merged.get("learner"))
    asked = str(headers.get("explain", "")) == "True" or as_flag(merged.get("explain", False))
    return ExplainRequest(target, learner) if asked else None


def _target(value: Any) -> str | int | None:
    """A class to explain as sent: a name, or an index as a JSON integer or decimal text."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if not isinstance(value, str):
        raise InputError(f"target must be a class name or index, got {quote(value)}")
    if _INDEX.fullmatch(value.strip()):
        return int(value.strip())
    return value


def _learner(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise InputError(f"learner must be a learner's name, got {quote(value)}")


class Explainer:
    """The eager graph of one archive, loaded on first use (explanations may never be asked)."""

    def __init__(self, model_dir: str | Path, manifest: dict, class_names: list[str],
                 input_side: int, per_batch: int = DEFAULT_PER_BATCH, read=None) -> None:
        self.model_dir = Path(model_dir)
        self.manifest = manifest
        # An artifact key -> its bytes, checked as they are read (the worker's trust list; by
        # default the manifest): the eager weights may be read hours after the model loaded.
        self.read = read
        self.class_names = class_names
        self.input_side = input_side
        self.per_batch = max(0, int(per_batch))
        self.archs = {m["name"]: m["arch"] for m in manifest.get("members", [])}
        self._graph = None

    @property
    def available(self) -> bool:
        return EAGER_FP32 in self.manifest.get("artifacts", {}) and self.per_batch > 0

    def unavailable_reason(self) -> str:
        if self.per_batch == 0:
            return "explanations are turned off for this model (explain_per_batch 0)"
        return ("this archive carries no eager weights (built with --no-explanations); archive "
                "it again without that flag to serve explanations")

    def graph(self):
        from flannel.graphs import served_graph

        if self._graph is None:  # the handler answers one batch at a time: no lock needed
            import io

            from flannel.artifacts import read_artifact

            start = time.perf_counter()
            # Checked now, when it is read, and loaded from the bytes that were checked.
            data = (self.read(EAGER_FP32) if self.read else
                    read_artifact(self.model_dir, self.manifest, EAGER_FP32))
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            self._graph = served_graph(self.manifest["kind"], self.manifest["members"],
                                       len(self.class_names), self.input_side, state)
            log.info("loaded the eager graph for explanations in %.1f s",
                     time.perf_counter() - start)
        return self._graph

    def target_index(self, request: ExplainRequest, predicted: int) -> int:
        """The class to explain: the request's (by name or index), else the prediction."""
        from flannel.cam import resolve_target

        try:
            index = resolve_target(request.target, self.class_names)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        return predicted if index is None else index

    def check_learner(self, request: ExplainRequest) -> None:
        if request.learner is not None and request.learner not in self.archs:
            raise InputError(f"unknown learner {quote(request.learner)}; this model has "
                             f"{sorted(self.archs)}")
        if request.learner is not None and self.manifest.get("kind") != "ensemble":
            raise InputError("learner is for ensembles; this model is one learner")

    def explain(self, tensor: torch.Tensor, request: ExplainRequest, predicted: int) -> dict:
        """One explanation as JSON: the overlay PNG (base64) and what it explains.

        Args:
            tensor: the (1, R, R) input the backend predicted on.
            request: target and learner.
            predicted: the backend's predicted class index.
        """
        from flannel.cam import cam_overlay_png, graph_cam

        index = self.target_index(request, predicted)
        start = time.perf_counter()
        cam = graph_cam(self.graph(), self.archs, tensor, target=index, learner=request.learner)
        png = cam_overlay_png(tensor[0].numpy(), cam.heat)
        body = {"method": METHOD, "explained": request.learner or self.manifest["kind"],
                "target": self.class_names[index],
                "eager_probability": float(cam.probabilities[index]),
                "layers": {n: self.archs[n] for n in cam.learner_maps},
                "width": int(cam.heat.shape[1]), "height": int(cam.heat.shape[0]),
                "image_png_base64": base64.b64encode(png).decode("ascii"),
                "ms": round(1000 * (time.perf_counter() - start), 1)}
        if cam.learner_weights:
            body["learner_weights"] = {n: round(w, 6) for n, w in cam.learner_weights.items()}
        return body

