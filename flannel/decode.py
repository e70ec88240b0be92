"""Decode chest X-ray files (PNG, JPEG, DICOM) into one grayscale float image.

    python -c "from flannel.decode import read_image; print(read_image('x.dcm').shape)"

Every reader in the project (training, export calibration, the TorchServe handler) goes through
``decode_image``, so one file always becomes the same array. The output is a 2-D float32 array in
[0, 1]; colour is reduced to luminance because radiographs are grayscale and the sources that ship
RGB copies (papers, websites) only add a colour shortcut. On a GPU backend's worker the pixels of
an 8-bit baseline greyscale JPEG may come from nvJPEG instead (``flannel.nvjpeg``, the
``jpeg_levels`` hook): after the same checks, as the same levels.

Each format keeps its own scale here: PNG and JPEG by bit depth (stored value / 255 or
/ 65535), DICOM by the range of its modality-LUT and VOI-window output (then MONOCHROME1
inverted). Both are increasing affine maps of what a viewer shows; the preprocessing spec's
intensity policy (``flannel.preprocess.harmonize_intensity``) puts every format on one scale.

Decoding keeps what the file stores: ``GrayImage`` holds the image as integer grey levels plus a
table of each level's value (every 8- and 16-bit PNG, JPEG and integer DICOM), so the intensity
policy can work on the levels' histogram and write the full-resolution float image once, instead
of several passes over it; ``GrayImage.to_array`` is the float image, the same values either way.

Errors are typed (``InputError`` and subclasses) and say what is wrong with the file, so a caller can
turn them into a 4xx answer or a line in a data report without losing the other items.
"""
from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from PIL import Image, ImageFile, PngImagePlugin, UnidentifiedImageError

if TYPE_CHECKING:
    from flannel.codestream_size import CodestreamSize

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
# Text chunks (tEXt, zTXt, iTXt) one PNG may hold, decompressed: Pillow allows 64 MiB by default
# (PngImagePlugin.MAX_TEXT_MEMORY), which eight concurrent items would multiply; a radiograph
# needs none. Each compressed chunk, and an iCCP profile, stays capped at Pillow's 1 MiB
# (MAX_TEXT_CHUNK, ImageFile.SAFEBLOCK).
PNG_TEXT_BYTES = 1 << 20
# Characters of a decoder's own error message (which may quote the file) kept in a refusal.
ERROR_DETAIL_CHARS = 100
# Pixels of an image converted to grey levels at a time (a strip of rows): the copies a
# conversion makes (RGBA for compositing, 4 bytes a pixel, three of them) are a strip's, not the
# whole image's.
STRIP_PIXELS = 1 << 20
# Another decoder of a JPEG's pixels than Pillow's (``flannel.nvjpeg``): given the file, once it
# passed every check here, and its frame header, the (H, W) uint8 grey levels Pillow would give,
# or None to leave the file to Pillow.
JpegLevels = Callable[[bytes, "CodestreamSize"], "np.ndarray | None"]
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


def error_detail(exc: BaseException) -> str:
    """A decoder's own error message, which may quote the file: its first
    ``ERROR_DETAIL_CHARS`` characters, non-ASCII and control characters escaped."""
    return str(exc)[:ERROR_DETAIL_CHARS].encode("unicode_escape").decode("ascii")


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


def check_size(width: int, height: int, max_pixels: int) -> None:
    """Refuse declared dimensions above ``max_pixels`` (413) or below ``MIN_SIDE`` (400)."""
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}")
    if min(width, height) < MIN_SIDE:
        raise ImageTooSmall(f"image is {width}x{height}; each side must be at least {MIN_SIDE} pixels")


def _level_table(levels: int, top: float) -> np.ndarray:
    table = np.arange(levels, dtype=np.float32) / top
    table.setflags(write=False)
    return table


# The value of each stored level of an 8-bit and a 16-bit image: level / 255 and level / 65535.
TABLE_8BIT = _level_table(256, 255.0)
TABLE_16BIT = _level_table(65536, 65535.0)
# Levels are counted in slices of this many pixels: OpenCV counts in float32, exact below 2**24.
_COUNT_SLICE = 1 << 23


def count_levels(levels: np.ndarray, bins: int) -> np.ndarray:
    """int64 histogram of a uint8 or uint16 level image over ``bins`` levels (OpenCV's
    ``calcHist``, a few times faster than ``np.bincount``, in slices it counts exactly)."""
    import cv2

    rows = max(1, _COUNT_SLICE // max(1, levels.shape[1]))
    counts = np.zeros(bins, dtype=np.int64)
    for top in range(0, levels.shape[0], rows):
        part = np.ascontiguousarray(levels[top:top + rows])
        counts += cv2.calcHist([part], [0], None, [bins], [0, bins]).ravel().astype(np.int64)
    return counts


class GrayImage:
    """A decoded (H, W) grayscale image: integer grey levels and each level's value in [0, 1].

    ``table[levels]`` (``to_array``) is the float32 image. Keeping the levels costs a quarter or a
    half of the float image's memory and lets a per-pixel step that depends on the pixel's value
    alone (the intensity policy: percentiles, stretch, equalisation) run once per level, on the
    levels' histogram (``counts``), instead of once per pixel. An image whose pixels are not few
    integer levels (32-bit or float data, colour DICOM) is held as its float array
    (``levels`` None, ``table`` the image).

    Attributes:
        levels: (H, W) uint8 or uint16 level indices, or None.
        table: float32 value of each level (at least ``levels.max() + 1`` entries), or the
            (H, W) float32 image when ``levels`` is None.
    """

    def __init__(self, levels: np.ndarray | None, table: np.ndarray,
                 counts: np.ndarray | None = None) -> None:
        if levels is not None and (levels.ndim != 2 or levels.dtype not in (np.uint8, np.uint16)):
            raise ValueError(f"levels must be a 2-D uint8 or uint16 array, got "
                             f"{levels.dtype} {levels.shape}")
        self.levels, self.table, self._counts = levels, table, counts

    @classmethod
    def of_array(cls, image: np.ndarray) -> "GrayImage":
        return cls(None, np.asarray(image, dtype=np.float32))

    @property
    def counts(self) -> np.ndarray:
        """int64 number of pixels at each level (as long as ``table``), counted once."""
        if self.levels is None:
            raise ValueError("a GrayImage held as a float array has no level counts")
        if self._counts is None:
            self._counts = count_levels(self.levels, len(self.table))
        return self._counts

    def with_table(self, table: np.ndarray) -> "GrayImage":
        """The same levels (and counts) with other values, ``table`` as long as this one's."""
        if self.levels is None or len(table) != len(self.table):
            raise ValueError("with_table needs a level image and a table of the same length")
        return GrayImage(self.levels, np.asarray(table, dtype=np.float32), self._counts)

    def to_array(self) -> np.ndarray:
        """The (H, W) float32 image: each pixel's level looked up in ``table``."""
        if self.levels is None:
            return self.table
        if self.levels.dtype == np.uint8:
            import cv2

            table = np.zeros(256, dtype=np.float32)
            table[:len(self.table)] = self.table[:256]
            return cv2.LUT(np.ascontiguousarray(self.levels), table)
        # np.take turns uint16 indices into a whole-image intp (8 bytes a pixel) copy first: in
        # strips of rows that copy is a strip's.
        table = np.asarray(self.table, dtype=np.float32)
        out = np.empty(self.levels.shape, dtype=np.float32)
        rows = max(1, STRIP_PIXELS // max(1, self.levels.shape[1]))
        for top in range(0, self.levels.shape[0], rows):
            np.take(table, self.levels[top:top + rows], out=out[top:top + rows])
        return out


def limit_pillow(max_pixels: int) -> None:
    """Make Pillow's own checks agree with the pixel limit in effect: its decompression-bomb
    error (raised above twice ``Image.MAX_IMAGE_PIXELS``) fires above ``max_pixels``, PNG text
    chunks are capped at ``PNG_TEXT_BYTES``, and truncated images stay refused.

    Pillow keeps these as module globals, so they hold for the whole process: a serving worker
    decodes under one limit (its model's), and each decode sets them again before Pillow runs.
    """
    Image.MAX_IMAGE_PIXELS = (max_pixels + 1) // 2
    PngImagePlugin.MAX_TEXT_MEMORY = PNG_TEXT_BYTES
    ImageFile.LOAD_TRUNCATED_IMAGES = False


# Pillow warns between MAX_IMAGE_PIXELS and twice that, sizes ``limit_pillow`` admits: the
# decoder's own check has decided by then, so the warning would only fill logs.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _on_black(strip: Image.Image) -> Image.Image:
    """A transparent strip composited onto black, the background of a radiograph, as "L"."""
    black = Image.new("RGBA", strip.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, strip.convert("RGBA")).convert("L")


def _levels_in_strips(im: Image.Image, convert, dtype) -> np.ndarray:
    """``convert`` (a strip of rows -> an "L" or "I;16" strip) applied to ``im`` strip by strip,
    written into one array, so that no whole-image copy but the result is made besides ``im``
    (``np.asarray(im)`` alone makes two: Pillow's ``tobytes`` chunks and their join)."""
    width, height = im.size
    rows = max(1, STRIP_PIXELS // max(1, width))
    out = np.empty((height, width), dtype=dtype)
    for top in range(0, height, rows):
        out[top:top + rows] = np.asarray(convert(im.crop((0, top, width, min(height, top + rows)))))
    return out


def _pil_to_gray(im: Image.Image) -> GrayImage:
    """Convert any PIL mode to luminance in [0, 1]."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return GrayImage(_levels_in_strips(im, lambda strip: strip, np.uint16), TABLE_16BIT)
    if mode == "I":
        arr = np.asarray(im, dtype=np.float32)
        # 16-bit PNGs decode to mode "I" on some Pillow builds; keep their bit depth.
        arr /= 65535.0 if arr.max(initial=0) <= 65535 else float(2**32 - 1)
        return GrayImage.of_array(np.clip(arr, 0.0, 1.0, out=arr))
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        return GrayImage.of_array((arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr))
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        convert = _on_black  # transparent pixels become the radiograph's black background
    else:
        convert = (lambda strip: strip) if mode == "L" else (lambda strip: strip.convert("L"))
    return GrayImage(_levels_in_strips(im, convert, np.uint8), TABLE_8BIT)


def _declared_size(data: bytes, fmt: str) -> tuple[int, int]:
    """Width and height from a PNG's IHDR or a JPEG's frame header, without decoding."""
    if fmt == "png":
        return struct.unpack_from(">II", data, 16)
    from flannel.codestream_size import jpeg_size

    size = jpeg_size(data)
    return size.width, size.height


def _decode_pil(data: bytes, fmt: str, max_pixels: int,
                jpeg_levels: JpegLevels | None = None) -> GrayImage:
    if fmt == "unknown" and (name := other_format(data)):
        raise UnsupportedImage(f"{name} is not accepted: send {ACCEPTED}")
    try:
        im = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except Image.DecompressionBombError:
        # Pillow's own check (``limit_pillow``) fired first: refuse with the declared size.
        check_size(*_declared_size(data, fmt), max_pixels)
        raise
    except UnidentifiedImageError as exc:
        what = "unknown format" if fmt == "unknown" else f"{fmt.upper()} signature but unreadable"
        raise DecodeError(f"not a readable image ({what}; expected {ACCEPTED})") from exc
    check_size(*im.size, max_pixels)
    frame = None
    if im.format == "JPEG":
        from flannel.codestream_size import CodestreamError, jpeg_size

        try:
            frame = jpeg_size(data)
        except CodestreamError as exc:
            raise DecodeError(f"corrupt JPEG: {exc}") from exc
        if problem := frame.work_problem():
            raise UnsupportedImage(problem)
    if getattr(im, "n_frames", 1) > 1:
        raise UnsupportedImage(f"animated or multi-frame {im.format} with {im.n_frames} frames")
    if frame is not None and jpeg_levels is not None:
        levels = jpeg_levels(data, frame)
        if levels is not None:
            return GrayImage(levels, TABLE_8BIT)
    try:
        im.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise DecodeError(f"truncated or corrupt {im.format or fmt}: {exc}") from exc
    return _pil_to_gray(im)


def dicom_unit_values(stored: np.ndarray, ds, present: np.ndarray | None = None) -> np.ndarray:
    """Grey values in [0, 1] of a monochrome DICOM's stored pixel values: the modality LUT
    (rescale slope/intercept), then the VOI window or LUT the file chose, scaled by the range of
    the values present (``present``: a mask over ``stored``; all when None), MONOCHROME1
    inverted. Each step is per value, so ``stored`` may be the image or its distinct levels.

    Returns:
        float32, the shape of ``stored``.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    # pydicom computes both LUTs in float64; the result is narrowed at once (a writable copy) so
    # that one float64 image lives at a time.
    arr = apply_voi_lut(apply_modality_lut(stored, ds), ds).astype(np.float32)
    seen = arr if present is None else arr[present]
    lo, hi = float(seen.min()), float(seen.max())
    del seen
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise DecodeError("DICOM modality or VOI transform (rescale slope/intercept, window, "
                          "LUT) gives values that are not finite")
    if hi > lo:
        arr -= lo
        arr /= hi - lo
    else:
        arr[...] = 0.0
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "MONOCHROME1":  # MONOCHROME1 stores bone as dark: invert to the usual look.
        np.subtract(1.0, arr, out=arr)
    return arr


def _dicom_levels(pixels: np.ndarray, ds) -> GrayImage:
    """A monochrome DICOM's pixels as levels (stored value minus the smallest one) and the
    value of each, when the stored values span at most 65536 levels; else its float image."""
    if pixels.dtype.kind in "iu" and pixels.itemsize <= 2:
        low, high = int(pixels.min()), int(pixels.max())
        unsigned = np.uint8 if pixels.itemsize == 1 else np.uint16
        # Subtracting the smallest value in the unsigned view wraps modulo 2**bits, which gives
        # the exact offset because every offset fits.
        levels = pixels.view(unsigned)
        if low != 0:
            levels = levels - unsigned(low % (1 << (8 * pixels.itemsize)))
        stored = np.arange(low, high + 1).astype(pixels.dtype)
        counts = count_levels(levels, len(stored))
        return GrayImage(levels, dicom_unit_values(stored, ds, counts > 0), counts)
    return GrayImage.of_array(dicom_unit_values(pixels, ds))


def _colour_to_gray(pixels: np.ndarray, photometric: str) -> GrayImage:
    """A 3-sample DICOM's luminance, scaled by its range, computed in strips of rows so that
    the float and colour-converted copies are a strip's, not the image's."""
    from pydicom.pixels import convert_color_space

    luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    rows = max(1, STRIP_PIXELS // max(1, pixels.shape[1]))
    arr = np.empty(pixels.shape[:2], dtype=np.float32)
    for top in range(0, pixels.shape[0], rows):
        strip = pixels[top:top + rows]
        if photometric.startswith("YBR"):
            strip = convert_color_space(strip, photometric, "RGB")
        arr[top:top + rows] = strip.astype(np.float32) @ luma
    lo, hi = float(arr.min()), float(arr.max())
    if hi > lo:
        arr -= lo
        arr /= hi - lo
    else:
        arr[...] = 0.0
    return GrayImage.of_array(arr)


def _decode_dicom(data: bytes, max_pixels: int, strict: bool) -> tuple[GrayImage, list[str]]:
    from flannel.dicom_bounds import pixel_array, read_dicom

    ds = read_dicom(data, max_pixels)
    doubts = chest_doubts(ds)
    if doubts and strict:
        raise NotAChestRadiograph("; ".join(doubts) + " (this model is served strict)")
    pixels = pixel_array(ds, max_pixels)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        return _colour_to_gray(pixels, photometric), doubts
    if pixels.ndim != 2:
        raise UnsupportedImage(f"DICOM pixel array of shape {pixels.shape} is not a 2-D image")
    return _dicom_levels(pixels, ds), doubts


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
    return decode_gray(data, max_pixels=max_pixels)[0].to_array()


def decode_gray(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                strict: bool = False,
                jpeg_levels: JpegLevels | None = None) -> tuple[GrayImage, list[str]]:
    """``decode_image`` as levels and their values (``GrayImage``), plus the reasons a DICOM
    header gives to doubt the file is a chest radiograph (``chest_doubts``; none for PNG and
    JPEG), from the one parse of the file.

    Args:
        strict: refuse a doubtful DICOM (``NotAChestRadiograph``, 422) before its pixels are
            decoded, instead of returning the doubts.
        jpeg_levels: decodes the pixels of a JPEG that passed every check (``JpegLevels``; the
            GPU's, ``flannel.nvjpeg``); None, or its None for a file: Pillow's libjpeg-turbo.

    Raises:
        InputError: as ``decode_image``, or ``NotAChestRadiograph`` when strict.
    """
    if not data:
        raise EmptyInput("empty input: no bytes")
    fmt = sniff_format(data)
    limit_pillow(max_pixels)
    if fmt == "unknown" and data.lstrip()[:1] in (b"{", b"[", b"<"):
        raise DecodeError("input looks like text (JSON/XML/HTML), not an image")
    try:
        if fmt == "dicom":
            return _decode_dicom(data, max_pixels, strict)
        return _decode_pil(data, fmt, max_pixels, jpeg_levels), []
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
        raise DecodeError(f"corrupt {kind}: {type(exc).__name__}: {error_detail(exc)}") from exc


def read_gray(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> GrayImage:
    """Read and decode one file as a ``GrayImage``; errors name the path."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DecodeError(f"{path}: cannot read: {exc}") from exc
    try:
        return decode_gray(data, max_pixels=max_pixels)[0]
    except InputError as exc:
        raise type(exc)(f"{path}: {exc}") from exc


def read_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read and decode one file into a float32 (H, W) array in [0, 1]; errors name the path."""
    return read_gray(path, max_pixels=max_pixels).to_array()
