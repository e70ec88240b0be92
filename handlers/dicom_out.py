"""Answers as DICOM: a request for a DICOM image can ask for its result as DICOM objects.

    curl -H "Authorization: Bearer $KEY" -F data=@cxr.dcm -F dicom_out=sr \\
        http://127.0.0.1:8080/predictions/resnet18

A request asks with the option ``dicom_out``: ``"sr"`` (a Structured Report of the answer) or
``"sr,sc"`` (also a Secondary Capture of the Grad-CAM overlay, which makes the request an
explaining one). It travels as a JSON field beside ``image``, a form field or query parameter,
an input of TorchServe's gRPC ``Predictions`` call, a v2 request parameter, or, for v2 over
gRPC (whose request parameters TorchServe 0.12 does not forward), a second BYTES input named
``dicom_out``. The objects come back base64-encoded as DICOM Part 10 files: under ``"dicom"``
in a plain answer (``{"sr": ..., "sc": ...}``), as the outputs ``dicom_sr`` and ``dicom_sc``
(BYTES [N]) in a v2 one. Every image of such a request must be DICOM: the objects reference
the source image and copy its patient and study modules (``flannel.dicom_results``).
"""
from __future__ import annotations

import base64
import io
from typing import Any, Sequence

import numpy as np

from flannel.decode import InputError, sniff_format
from flannel.quoting import quote

OPTION = "dicom_out"
# The objects a request may ask for, in the order they are made.
KINDS = ("sr", "sc")
KIND_NAMES = {"sr": "a Structured Report of the answer",
              "sc": "a Secondary Capture of the Grad-CAM overlay"}
# Characters of the option's text read: "sr,sc" and spaces fit many times over.
MAX_OPTION_CHARS = 32
# Images of one request that may ask for DICOM results: a report is 10-20 KB (20 KB for four
# classes and five learners, 27 KB in base64), so 8 of them and their overlays' captures stay
# far below the answer's 768 KiB (flannel.handlers.serving.MAX_ANSWER_BYTES).
MAX_IMAGES = 8


# What a result references of its source image (PS3.3 C.17.2.1, C.12.1): without them a PACS
# cannot file it beside the image.
REFERENCED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


class DicomOutError(InputError):
    """A ``dicom_out`` option that names no object, or a request whose images are not DICOM."""


class MissingReference(DicomOutError):
    """A DICOM image whose header lacks a UID its results must reference."""

    status = 422


def parse_dicom_out(value: Any) -> tuple[str, ...]:
    """The objects ``value`` asks for, in ``KINDS`` order; () when it asks for none.

    Accepts a comma-separated text (bytes from a form field or a gRPC input), a list of kinds
    (JSON or v2), or None, "" and false for none.

    Raises:
        DicomOutError: any other value, or a kind not in ``KINDS`` (400).
    """
    if value is None or value is False:
        return ()
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value[:MAX_OPTION_CHARS + 1]).decode("utf-8", errors="replace")
    if isinstance(value, str):
        if len(value) > MAX_OPTION_CHARS:
            raise DicomOutError(f"{OPTION} must be one of {', '.join(KINDS)} or a comma-separated "
                                f"list of them, got {quote(value)}")
        parts = [p.strip().lower() for p in value.split(",") if p.strip()]
    elif isinstance(value, list) and len(value) <= len(KINDS) and all(
            isinstance(p, str) for p in value):
        parts = [p.strip().lower() for p in value]
    else:
        raise DicomOutError(f"{OPTION} must be a text such as \"sr\" or \"sr,sc\" or a list of "
                            f"kinds, got {quote(value)}")
    unknown = [p for p in parts if p not in KINDS]
    if unknown:
        raise DicomOutError(f"{OPTION} asks for {quote(unknown[0])}; the kinds are "
                            + "; ".join(f"{k}: {n}" for k, n in KIND_NAMES.items()))
    return tuple(k for k in KINDS if k in parts)


class TooManyForResults(DicomOutError):
    status = 413


def check_dicom_inputs(inputs: Sequence[Any]) -> None:
    """Refuse a request for DICOM results whose images are not all DICOM files, or that holds
    more than ``MAX_IMAGES``.

    Raises:
        DicomOutError: naming the first image that is not (400); ``TooManyForResults`` (413).
    """
    if len(inputs) > MAX_IMAGES:
        raise TooManyForResults(f"{OPTION} is answered for at most {MAX_IMAGES} images a "
                                f"request, got {len(inputs)}: send them in several requests")
    for index, data in enumerate(inputs):
        if isinstance(data, np.ndarray):
            raise DicomOutError(f"{OPTION} needs DICOM images; image {index} is a preprocessed "
                                f"FP32 tensor")
        if sniff_format(bytes(data[:132])) != "dicom":
            raise DicomOutError(f"{OPTION} needs DICOM images; image {index} is not a DICOM "
                                f"file")


def source_header(data: bytes, max_pixels: int):
    """The header of a DICOM that was answered (its pixel data dropped), read within the
    decoder's bounds (``flannel.dicom_bounds.read_dicom``).

    Raises:
        MissingReference: the header lacks a UID a result must reference (422).
    """
    from pydicom.uid import UID

    from flannel.dicom_bounds import read_dicom

    ds = read_dicom(data, max_pixels)
    if "PixelData" in ds:
        del ds.PixelData
    for keyword in REFERENCED_UIDS:
        value = str(ds.get(keyword, "") or "")
        if not UID(value).is_valid:
            raise MissingReference(f"{OPTION}: the image's {keyword} is "
                                   f"{quote(value) if value else 'missing'}; a DICOM result "
                                   f"must reference a valid one")
    return ds


def overlay_rgb(png_base64: str) -> np.ndarray:
    """An explanation's overlay PNG as an (H, W, 3) uint8 array."""
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(png_base64)), formats=("PNG",)) as im:
        return np.asarray(im.convert("RGB"))


def dicom_objects(kinds: Sequence[str], data: bytes, body: dict, class_names: Sequence[str],
                  artifact_sha256: str, max_pixels: int,
                  explanation: dict | None = None) -> dict[str, str]:
    """The DICOM objects asked for one answered image, base64-encoded Part 10 files.

    Args:
        kinds: from ``parse_dicom_out``.
        data: the image's DICOM file.
        body: its plain answer (``flannel.handlers.serving.prediction_body``).
        class_names: the model's classes, in output order.
        artifact_sha256: the sha256 of the artifact that computed the answer.
        max_pixels: the serving pixel limit (the header is read again within it).
        explanation: the image's explanation (``Explainer.explain``), needed for "sc".

    Returns:
        kind -> base64 text.
    """
    from flannel.dicom_results import (ResultContent, overlay_capture, structured_report,
                                       to_part10)

    source = source_header(data, max_pixels)
    result = ResultContent.from_answer(body, list(class_names), artifact_sha256)
    made = {}
    for kind in kinds:
        if kind == "sr":
            ds = structured_report(source, result)
        else:
            if explanation is None:
                raise ValueError("a Secondary Capture needs the image's explanation")
            ds = overlay_capture(source, overlay_rgb(explanation["image_png_base64"]), result)
        made[kind] = base64.b64encode(to_part10(ds)).decode("ascii")
    return made
