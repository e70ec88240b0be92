"""Decode chest X-ray files (PNG, JPEG, DICOM) into one grayscale float image.

    python -c "from flannel.decode import read_image; print(read_image('x.dcm').shape)"

Every reader in the project (training, export calibration, the TorchServe handler) goes through
``decode_image``, so one file always becomes the same array. The output is a 2-D float32 array in
[0, 1]; colour is reduced to luminance because radiographs are grayscale and the sources that ship
RGB copies (papers, websites) only add a colour shortcut.

Each format keeps its own scale here: PNG and JPEG by bit depth (stored value / 255 or
/ 65535), DICOM by the range of its modality-LUT and VOI-window output (then MONOCHROME1
inverted). Both are increasing affine maps of what a viewer shows; the preprocessing spec's
intensity policy (``flannel.preprocess.harmonize_intensity``) puts every format on one scale.

Errors are typed (``InputError`` and subclasses) and say what is wrong with the file, so a caller can
turn them into a 4xx answer or a line in a data report without losing the other items.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Largest flat-panel detectors are about 4300 x 4300 pixels (43 cm at 100 um); 6000 x 6000 leaves
# headroom and bounds memory to 144 MB per decoded float image.
DEFAULT_MAX_PIXELS = 6000 * 6000
# Below this a file cannot hold a radiograph (thumbnails, icons, 1x1 tracking pixels).
MIN_SIDE = 32

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
# The only formats handed to Pillow: its other decoders (GIF, BMP, TIFF, WebP, ICO, TGA, PCX, SGI,
# PPM, ...) are attack surface that no chest radiograph needs.
PIL_FORMATS = ("PNG", "JPEG")
ACCEPTED = "PNG, JPEG or DICOM"
# Files people send by mistake, named in the refusal (magic bytes -> name).
_OTHER_MAGIC = ((b"GIF8", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
                (b"%PDF", "PDF"), (b"PK\x03\x04", "ZIP"), (b"\x1f\x8b", "gzip"),
                (b"\x00\x00\x01\x00", "ICO"), (b"\xff\x4f\xff\x51", "JPEG 2000 codestream"),
                (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"8BPS", "Photoshop"),
                (b"P1", "PBM"), (b"P2", "PGM"), (b"P3", "PPM"), (b"P4", "PBM"), (b"P5", "PGM"),
                (b"P6", "PPM"))


class InputError(ValueError):
    """A file or request item that cannot become a model input. Maps to an HTTP 4xx."""

    status = 400


class EmptyInput(InputError):
    """No bytes at all."""


class DecodeError(InputError):
    """Bytes that are not a readable image (unknown format, truncated, corrupt)."""


class UnsupportedImage(InputError):
    """A readable file of a kind this project does not accept (animation, multi-frame, no pixels)."""

    status = 415


class ImageTooLarge(InputError):
    """Declared dimensions above the pixel limit; refused before the pixels are decoded."""

    status = 413


class ImageTooSmall(InputError):
    """Dimensions below ``MIN_SIDE``."""


def sniff_format(data: bytes) -> str:
    """Name the container format from magic bytes: 'png', 'jpeg', 'dicom' or 'unknown'."""
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    return "unknown"


def other_format(data: bytes) -> str | None:
    """The name of a known format this project does not accept, from its magic bytes."""
    if data[8:12] == b"WEBP" and data.startswith(b"RIFF"):
        return "WebP"
    return next((name for magic, name in _OTHER_MAGIC if data.startswith(magic)), None)


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}")
    if min(width, height) < MIN_SIDE:
        raise ImageTooSmall(f"image is {width}x{height}; each side must be at least {MIN_SIDE} pixels")


def _pil_to_gray(im: Image.Image) -> np.ndarray:
    """Convert any PIL mode to float32 luminance in [0, 1]."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(im, dtype=np.float32) / 65535.0
    if mode == "I":
        arr = np.asarray(im, dtype=np.float32)
        # 16-bit PNGs decode to mode "I" on some Pillow builds; keep their bit depth.
        arr /= 65535.0 if arr.max(initial=0) <= 65535 else float(2**32 - 1)
        return np.clip(arr, 0.0, 1.0, out=arr)
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        # Transparent pixels are composited onto black, the background of a radiograph.
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(black, rgba)
    return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def _decode_pil(data: bytes, fmt: str, max_pixels: int) -> np.ndarray:
    if fmt == "unknown" and (name := other_format(data)):
        raise UnsupportedImage(f"{name} is not accepted: send {ACCEPTED}")
    try:
        im = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except UnidentifiedImageError as exc:
        what = "unknown format" if fmt == "unknown" else f"{fmt.upper()} signature but unreadable"
        raise DecodeError(f"not a readable image ({what}; expected {ACCEPTED})") from exc
    _check_size(*im.size, max_pixels)
    if getattr(im, "n_frames", 1) > 1:
        raise UnsupportedImage(f"animated or multi-frame {im.format} with {im.n_frames} frames")
    try:
        im.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise DecodeError(f"truncated or corrupt {im.format or fmt}: {exc}") from exc
    return _pil_to_gray(im)


def _decode_dicom(data: bytes, max_pixels: int, strict: bool) -> tuple[np.ndarray, list[str]]:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, OSError) as exc:
        raise DecodeError(f"corrupt DICOM: {exc}") from exc
    doubts = chest_doubts(ds)
    if doubts and strict:
        raise NotAChestRadiograph("; ".join(doubts) + " (this model is served strict)")
    if "PixelData" not in ds:
        raise UnsupportedImage("DICOM has no pixel data (PixelData element missing)")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    _check_size(cols, rows, max_pixels)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise UnsupportedImage(f"multi-frame DICOM with {ds.NumberOfFrames} frames")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    syntax_name = f"{syntax.name} ({syntax})" if syntax else "unknown transfer syntax"
    try:
        pixels = ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        raise UnsupportedImage(f"cannot decode DICOM pixels in {syntax_name}: {exc}") from exc
    except (ValueError, AttributeError, KeyError, TypeError, OSError) as exc:
        raise DecodeError(f"corrupt DICOM pixel data ({syntax_name}): {exc}") from exc
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space
            pixels = convert_color_space(pixels, photometric, "RGB")
        arr = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    elif pixels.ndim == 2:
        # Rescale slope/intercept first (modality LUT), then the VOI window the modality chose.
        # pydicom computes both in float64; the result is narrowed at once (a writable copy) so
        # that one float64 image lives at a time.
        arr = apply_voi_lut(apply_modality_lut(pixels, ds), ds).astype(np.float32)
    else:
        raise UnsupportedImage(f"DICOM pixel array of shape {pixels.shape} is not a 2-D image")
    del pixels
    lo, hi = float(arr.min()), float(arr.max())
    if hi > lo:
        arr -= lo
        arr /= hi - lo
    else:
        arr[...] = 0.0
    if photometric == "MONOCHROME1":  # MONOCHROME1 stores bone as dark: invert to the usual look.
        np.subtract(1.0, arr, out=arr)
    return arr, doubts


# What the models were trained on: chest radiographs. DICOM says what a file holds; these are the
# values that fit (DICOM PS3.3 C.7.3.1 Modality, PS3.16 CID 4031 BodyPartExamined, with the
# free-text spellings seen in practice). A missing BodyPartExamined is common and not suspicious.
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR", "RG"})
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS", "PORT CHEST", "CHEST_LAT",
                              "CHEST PA", "CHEST AP", "TORAX", "THORAX PA", "THORAX AP"})


class NotAChestRadiograph(InputError):
    """A DICOM whose header says it is not a chest radiograph (refused in strict mode)."""

    status = 422


def chest_doubts(ds) -> list[str]:
    """Reasons, from a DICOM dataset's header, to doubt it is a chest radiograph (its modality
    or body part); empty for headers that fit or say nothing."""
    modality = str(ds.get("Modality", "") or "").strip().upper()
    body_part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    reasons = []
    if modality and modality not in RADIOGRAPH_MODALITIES:
        reasons.append(f"DICOM Modality {modality} is not a radiograph "
                       f"({'/'.join(sorted(RADIOGRAPH_MODALITIES))}): the model was trained on "
                       f"chest radiographs")
    if body_part and body_part not in CHEST_BODY_PARTS:
        reasons.append(f"DICOM BodyPartExamined {body_part} is not the chest: the model was "
                       f"trained on chest radiographs")
    return reasons


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode PNG, JPEG or DICOM bytes into a float32 (H, W) array in [0, 1].

    Args:
        data: the whole file.
        max_pixels: refuse images whose declared width x height is larger, before decoding.

    Returns:
        The grayscale image.

    Raises:
        InputError: a subclass naming what is wrong (empty, corrupt, unsupported, too large/small).
    """
    return decode_with_doubts(data, max_pixels=max_pixels)[0]


def decode_with_doubts(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                       strict: bool = False) -> tuple[np.ndarray, list[str]]:
    """``decode_image`` plus the reasons a DICOM header gives to doubt the file is a chest
    radiograph (``chest_doubts``; none for PNG and JPEG), from the one parse of the file.

    Args:
        strict: refuse a doubtful DICOM (``NotAChestRadiograph``, 422) before its pixels are
            decoded, instead of returning the doubts.

    Raises:
        InputError: as ``decode_image``, or ``NotAChestRadiograph`` when strict.
    """
    if not data:
        raise EmptyInput("empty input: no bytes")
    fmt = sniff_format(data)
    if fmt == "unknown" and data.lstrip()[:1] in (b"{", b"[", b"<"):
        raise DecodeError("input looks like text (JSON/XML/HTML), not an image")
    try:
        if fmt == "dicom":
            return _decode_dicom(data, max_pixels, strict)
        return _decode_pil(data, fmt, max_pixels), []
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc)) from exc
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a decoder's error on hostile bytes is the input's fault
        # Pillow and pydicom raise many kinds (OSError, SyntaxError, struct.error, KeyError,
        # AttributeError...) on corrupt headers; each means "this file cannot be read".
        kind = {"dicom": "DICOM", "unknown": "image"}.get(fmt, fmt.upper())
        raise DecodeError(f"corrupt {kind}: {type(exc).__name__}: {exc}") from exc


def read_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read and decode one file; errors name the path."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DecodeError(f"{path}: cannot read: {exc}") from exc
    try:
        return decode_image(data, max_pixels=max_pixels)
    except InputError as exc:
        raise type(exc)(f"{path}: {exc}") from exc
