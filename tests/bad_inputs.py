"""A corpus of hostile, broken and unusual inputs, generated in memory (nothing is committed).

Each ``Case`` is one request body and what the service must do with it: answer (``status`` 200,
and where ``same_as`` names another case, give exactly that case's answer: a lossless
re-encoding of the same image) or refuse with that 4xx and words naming the problem.
"""
from __future__ import annotations

import base64
import io
import json
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


# A pickle that creates this file when it is unpickled: nothing in the service may unpickle it.
UNPICKLED_MARKER = Path(__import__("tempfile").gettempdir()) / "flannel-bad-input-unpickled"


class _CreatesMarker:
    def __reduce__(self):
        return (open, (str(UNPICKLED_MARKER), "w"))


@dataclass(frozen=True)
class Case:
    name: str
    body: bytes
    status: int | tuple[int, ...]  # a tuple: any of these refusals
    words: str = ""  # a regex the error must match (refusals)
    same_as: str | None = None  # answers: must equal this case's answer
    json_ok: bool = True  # also meaningful as JSON {"image": base64(body)}
    warns: str = ""  # answers: a regex the answer's "warnings" must match (else: no warnings)


def radiograph(side: int = 96, seed: int = 0) -> np.ndarray:
    """A [0, 1] chest-radiograph-like image (the synthetic dataset's renderer)."""
    from flannel.data.synth import SynthConfig, render

    img, _ = render("Normal", SynthConfig(size=side), np.random.default_rng(seed))
    return img


def _pil(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height and whose data is a few bytes: a bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _dataset(img: np.ndarray | None, *, sop_class: str = "1.2.840.10008.5.1.4.1.1.1",
             modality: str = "CR", frames: int = 1, body_part: str | None = None):
    """An explicit-VR little-endian DICOM dataset, 12-bit MONOCHROME2 pixels when ``img``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["bad-inputs", sop_class])
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if img is not None:
        pixels = np.round(img * 4095).astype(np.uint16)
        if frames > 1:
            pixels = np.stack([pixels] * frames)
            ds.NumberOfFrames = frames
        ds.Rows, ds.Columns = img.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels.tobytes()
    return ds


def _save(ds, *, implicit: bool = False) -> bytes:
    from pydicom.uid import ImplicitVRLittleEndian

    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _encapsulated(img: np.ndarray, syntax) -> bytes:
    """Pixel data declared in a compressed transfer syntax (an encapsulated fragment that is not
    a valid codestream): decoded by a maintained plugin it fails, without one it is refused;
    either way the answer must name the syntax."""
    from pydicom.encaps import encapsulate

    ds = _dataset(img)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(64)])
    ds["PixelData"].VR = "OB"
    return _save(ds)


def corpus(dicom_path: Path | None = None) -> list[Case]:
    """Thirty-odd kinds of input: refusals first, then inputs that must be answered."""
    from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless

    img = radiograph()
    gray = Image.fromarray(np.round(img * 255).astype(np.uint8))
    png = _pil(gray, "PNG")
    jpeg = _pil(gray, "JPEG", quality=95)
    dicom = _save(_dataset(img))
    frames = [gray, Image.fromarray(255 - np.asarray(gray))]
    apng = io.BytesIO()
    frames[0].save(apng, format="PNG", save_all=True, append_images=frames[1:])
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("cxr.png", png)
    sr = _dataset(None, sop_class="1.2.840.10008.5.1.4.1.1.88.22", modality="SR")  # Enhanced SR
    sr.ContentSequence = []
    ecg = _dataset(None, sop_class="1.2.840.10008.5.1.4.1.1.9.1.1", modality="ECG")  # 12-lead
    cases = [
        Case("empty", b"", 400, "EmptyInput|no payload"),
        Case("random bytes", np.random.default_rng(0).bytes(4096), 400, "not a readable image"),
        Case("plain text", b"chest x-ray, PA view, no findings\n", 400, "not a readable image"),
        Case("html", b"<!doctype html><html><body>hi</body></html>", 400, "text|JSON"),
        Case("pdf", b"%PDF-1.4\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF", 415, "PDF"),
        Case("zip", zipped.getvalue(), 415, "ZIP"),
        Case("python pickle", __import__("pickle").dumps(_CreatesMarker()), 400,
             "not a readable image"),
        Case("gzip", b"\x1f\x8b\x08" + bytes(32), 415, "gzip"),
        Case("truncated png", png[: len(png) // 2], 400, "truncated|corrupt|unreadable"),
        Case("truncated jpeg", jpeg[: len(jpeg) // 2], 400, "truncated|corrupt|unreadable"),
        Case("truncated dicom", dicom[: len(dicom) // 2], 400, "DICOM"),
        Case("1x1 png", _pil(Image.new("L", (1, 1)), "PNG"), 400, "at least 32"),
        Case("decompression bomb png", png_header_only(100_000, 100_000), 413, "limit"),
        Case("6001 px png header", png_header_only(6001, 6001), 413, "above the limit"),
        Case("animated png", apng.getvalue(), 415, "2 frames"),
        Case("gif", _pil(gray.convert("P"), "GIF"), 415, "GIF"),
        Case("bmp", _pil(gray, "BMP"), 415, "BMP"),
        Case("tiff", _pil(gray, "TIFF"), 415, "TIFF"),
        Case("webp", _pil(gray.convert("RGB"), "WEBP"), 415, "WebP"),
        Case("ico", _pil(gray.resize((64, 64)), "ICO"), 415, "ICO"),
        Case("dicom without pixels", _save(_dataset(None)), 415, "no pixel data"),
        Case("dicom structured report", _save(sr), 415, "no pixel data"),
        Case("dicom waveform (ECG)", _save(ecg), 415, "no pixel data"),
        Case("multi-frame dicom", _save(_dataset(img, frames=3)), 415, "multi-frame"),
        Case("dicom corrupt jpeg 2000", _encapsulated(img, JPEG2000Lossless), (400, 415),
             "JPEG 2000"),
        Case("dicom jpeg-ls", _encapsulated(img, JPEGLSLossless), (400, 415), "JPEG-LS"),
        Case("dicom jpeg lossless", _encapsulated(img, JPEGLosslessSV1), (400, 415),
             "JPEG Lossless"),
        Case("malformed json", b'{"image": "iVBOR', 400, "not valid JSON", json_ok=False),
        Case("json without image", b'{"picture": "abc"}', 400, "image", json_ok=False),
        Case("json image not a string", b'{"image": 12}', 400, "base64 string", json_ok=False),
        Case("malformed base64", b'{"image": "%%%not base64%%%"}', 400, "base64",
             json_ok=False),
        # answered
        Case("png 8-bit", png, 200),
        Case("png 16-bit", _pil(Image.fromarray(np.round(img * 65535).astype(np.uint16)), "PNG"),
             200),
        Case("png palette", _pil(gray.convert("P"), "PNG"), 200),
        Case("png rgba", _pil(gray.convert("RGBA"), "PNG"), 200, same_as="png 8-bit"),
        Case("png rgb", _pil(gray.convert("RGB"), "PNG"), 200, same_as="png 8-bit"),
        Case("jpeg", jpeg, 200),
        Case("jpeg cmyk", _pil(gray.convert("CMYK"), "JPEG", quality=95), 200),
        Case("dicom", dicom, 200),
        Case("dicom implicit vr", _save(_dataset(img), implicit=True), 200, same_as="dicom"),
        Case("dicom rle lossless", _rle(img), 200, same_as="dicom"),
        Case("dicom DX chest", _save(_dataset(img, modality="DX", body_part="CHEST")), 200,
             same_as="dicom"),
        Case("dicom CT", _save(_dataset(img, modality="CT", sop_class="1.2.840.10008.5.1.4.1.1.2")),
             200, warns="Modality CT is not a radiograph"),
        Case("dicom MR", _save(_dataset(img, modality="MR", sop_class="1.2.840.10008.5.1.4.1.1.4")),
             200, warns="Modality MR"),
        Case("dicom hand CR", _save(_dataset(img, body_part="HAND")), 200,
             warns="BodyPartExamined HAND is not the chest"),
        Case("dicom jpeg 2000 lossless", _j2k(img), 200, same_as="dicom"),
    ]
    if dicom_path is not None:
        real = Path(dicom_path).read_bytes()
        cases += [Case("real radiograph dicom", real, 200),
                  Case("real radiograph, implicit vr", _reencode_implicit(real), 200,
                       same_as="real radiograph dicom")]
    return cases


def _j2k(img: np.ndarray) -> bytes:
    """The same DICOM with its pixels JPEG 2000 lossless (a reversible codestream written by
    Pillow's OpenJPEG, decoded by pydicom's Pillow plugin)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    ds = _dataset(img)
    pixels = np.round(img * 4095).astype(np.uint16)
    stream = _pil(Image.fromarray(pixels), "JPEG2000", irreversible=False, no_jp2=True)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([stream])
    ds["PixelData"].VR = "OB"
    return _save(ds)


def _rle(img: np.ndarray) -> bytes:
    """The same DICOM, RLE Lossless (pydicom's own encoder and decoder)."""
    from pydicom.uid import RLELossless

    ds = _dataset(img)
    ds.compress(RLELossless)
    return _save(ds)


def _reencode_implicit(data: bytes) -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    return _save(ds, implicit=True)


def check(case: Case, status: int, body: dict | None, answered: dict[str, dict]) -> None:
    """Assert the answer ``(status, body)`` is the one ``case`` must get; ``answered`` maps the
    names of answered cases to their bodies (for ``same_as``)."""
    import re

    wanted = case.status if isinstance(case.status, tuple) else (case.status,)
    assert status in wanted, (case.name, status, body)
    assert body is not None, (case.name, status)
    if status == 200:
        # The out-of-distribution warning goes with the score (a random image fails it); the
        # rest are the decoder's doubts about the file, which each case names.
        ood = [w for w in body.get("warnings", []) if w.startswith("ood_score ")]
        assert bool(ood) == (body["ood_score"] > 1.0), (case.name, body)
        warnings = " | ".join(w for w in body.get("warnings", []) if w not in ood)
        assert re.search(case.warns, warnings) if case.warns else not warnings, (case.name, body)
        probs = np.array(list(body["probabilities"].values()))
        assert np.isfinite(probs).all() and abs(probs.sum() - 1) < 1e-4, case.name
        if case.same_as:
            np.testing.assert_allclose(probs, list(answered[case.same_as]["probabilities"].values()),
                                       atol=1e-6, err_msg=case.name)
    else:
        assert body["code"] == status, (case.name, body)
        assert re.search(case.words, body["error"]), (case.name, body["error"])


def as_json(case: Case) -> bytes:
    """The case as JSON {"image": base64}; malformed-JSON cases are sent as they are."""
    if not case.json_ok:
        return case.body
    return json.dumps({"image": base64.b64encode(case.body).decode()}).encode()
