"""Inputs for the decoder's memory bounds, built in memory: the worst each format admits at a
pixel limit, and hostile files that try to make a small input cost gigabytes.

    python -c "from flannel.benchmarks.decode_inputs import hostile_inputs; print([h.name for h in hostile_inputs()])"

Used by ``flannel bench decode`` (``benchmarks/decode_memory.py``) and by
``tests/test_decode_bounds.py``; nothing here is committed as a file.
"""
from __future__ import annotations

import io
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

MIB = 1 << 20
# The hostile files of issue 17's probe: a 200 MB private element in a Deflated data set, an RLE
# segment that decodes to 128 MiB behind a 64x64 header, a 12000 x 12000 JPEG behind 512 x 512.
DEFLATE_BOMB_BYTES = 200 * MIB
RLE_BOMB_BYTES = 128 * MIB
FRAME_BOMB_SIDE = 12000


@dataclass(frozen=True)
class Input:
    """One input to decode: its name, how to build it, and what the decoder must answer
    (200, or the 4xx of a refusal)."""

    name: str
    build: Callable[[], bytes]
    status: int = 200


def ramp(side: int, top: int = 4095, dtype=np.uint16) -> np.ndarray:
    """A (side, side) diagonal ramp 0..top: every level present, compresses well."""
    rows = np.arange(side, dtype=np.int64)
    return (np.add.outer(rows, rows) * top // max(1, 2 * side - 2)).astype(dtype)


def dicom_dataset(pixels: np.ndarray | None = None, *, bits: int = 16,
                  photometric: str = "MONOCHROME2", **elements):
    """A CR dataset, Explicit VR Little Endian, holding ``pixels`` natively ((rows, columns) or
    (rows, columns, 3)); ``None`` declares 64 x 64 and leaves PixelData out."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["decode-inputs"])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    shape = (64, 64) if pixels is None else pixels.shape
    ds.Rows, ds.Columns = shape[:2]
    ds.SamplesPerPixel = 3 if len(shape) == 3 else 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    if pixels is not None:
        ds.PixelData = pixels.tobytes()
    for key, value in elements.items():
        setattr(ds, key, value)
    return ds


def dicom_file(ds, syntax=None) -> bytes:
    """``ds`` written as a Part 10 file, in ``syntax`` when given."""
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def encapsulated_file(frame: bytes, syntax, rows: int, columns: int, *, samples: int = 1,
                      bits: int = 8) -> bytes:
    """A DICOM whose one frame is ``frame``, encapsulated in ``syntax``, declaring
    rows x columns."""
    from pydicom.encaps import encapsulate

    ds = dicom_dataset(None, bits=bits,
                       photometric="MONOCHROME2" if samples == 1 else "YBR_FULL_422")
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, samples
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    return dicom_file(ds, syntax)


def pil_bytes(im, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rle_frame(segments: list[bytes]) -> bytes:
    """An RLE frame: the 64-byte header (segment count, offsets), then the segments."""
    offsets, at = [], 64
    for segment in segments:
        offsets.append(at)
        at += len(segment)
    header = struct.pack("<16I", len(segments), *offsets, *[0] * (15 - len(segments)))
    return header + b"".join(segments)


def rle_rows(row_values: np.ndarray, columns: int) -> bytes:
    """One RLE segment of rows that are each one value (``row_values``), each row encoded on
    its own in replicate runs of 128 (PS3.5 G.3.1)."""
    runs, tail = divmod(columns, 128)
    out = bytearray()
    for value in row_values.tolist():
        out += bytes([129, value]) * runs  # 129: repeat the next byte 257 - 129 = 128 times
        if tail:
            out += bytes([257 - tail, value]) if tail > 1 else bytes([0, value])
    return bytes(out)


def explicit_element(tag: int, vr: bytes, length: int) -> bytes:
    """An Explicit VR Little Endian element header of the long form (OB, OW, SQ, UN)."""
    return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, length)


def meta_end(data: bytes) -> int:
    """Where a Part 10 file's data set starts: after the preamble and the file meta group."""
    return 132 + 12 + struct.unpack_from("<I", data, 140)[0]


def group_start(body: bytes, group: int) -> int:
    """Offset of the first element of an Explicit VR Little Endian ``body`` whose group is
    ``group`` or above."""
    import pydicom.filereader

    for element in pydicom.filereader.data_element_generator(io.BytesIO(body), False, True):
        if element.tag.group >= group:
            long_form = element.VR in ("OB", "OW", "SQ", "UN", "UT")
            return element.value_tell - (12 if long_form else 8)
    return len(body)


def deflated_with_private_element(size: int = DEFLATE_BOMB_BYTES, *,
                                  after_pixels: bool = False) -> bytes:
    """A Deflated DICOM holding 64x64 16-bit pixels and a ``size``-byte private OB element of
    zeros, before the pixels (group 0009) or after them (group 7FE1), deflated in pieces so
    that the element is never whole in memory."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    pixels = ramp(64)
    small = dicom_file(dicom_dataset(pixels), DeflatedExplicitVRLittleEndian)
    start = meta_end(small)
    body = zlib.decompress(small[start:], -zlib.MAX_WBITS)
    pixel_at = body.index(explicit_element(0x7FE00010, b"OW", pixels.nbytes))
    before, pixel_element = body[:pixel_at], body[pixel_at:]
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [small[:start]]
    if after_pixels:
        parts.append(deflater.compress(before + pixel_element
                                       + explicit_element(0x7FE11000, b"OB", size)))
    else:  # group 0009 sorts after group 0008, before the pixel module (0028)
        split = group_start(before, 0x0009)
        parts.append(deflater.compress(before[:split] + explicit_element(0x00091000, b"OB", size)))
    block = bytes(MIB)
    for done in range(0, size, MIB):
        parts.append(deflater.compress(block[:min(MIB, size - done)]))
    if not after_pixels:
        parts.append(deflater.compress(before[split:] + pixel_element))
    parts.append(deflater.flush())
    return b"".join(parts)


def rle_bomb(decoded: int = RLE_BOMB_BYTES) -> bytes:
    """An RLE DICOM declaring 64x64 8-bit whose one segment decodes to ``decoded`` bytes."""
    from pydicom.uid import RLELossless

    segment = b"\x81\x00" * (decoded // 128)
    return encapsulated_file(rle_frame([segment]), RLELossless, 64, 64)


def with_jpeg_size(stream: bytes, width: int, height: int) -> bytes:
    """A JPEG stream with its frame header (SOF) declaring width x height."""
    from flannel.codestream_size import jpeg_size

    size = jpeg_size(stream)
    old = struct.pack(">BHH", size.bits, size.height, size.width)
    at = stream.index(old)
    return stream[:at] + struct.pack(">BHH", size.bits, height, width) + stream[at + len(old):]


def with_j2k_size(stream: bytes, width: int, height: int) -> bytes:
    """A JPEG 2000 codestream with its SIZ marker declaring width x height (no offsets)."""
    return stream[:8] + struct.pack(">II", width, height) + stream[16:]


def jpeg_frame_bomb(side: int = FRAME_BOMB_SIDE) -> bytes:
    """A JPEG-in-DICOM whose header says 512 x 512 and whose JPEG frame says side x side."""
    from PIL import Image
    from pydicom.uid import JPEGBaseline8Bit

    jpeg = with_jpeg_size(pil_bytes(Image.new("L", (512, 512), 90), "JPEG"), side, side)
    return encapsulated_file(jpeg, JPEGBaseline8Bit, 512, 512)


def j2k_frame_bomb(side: int = FRAME_BOMB_SIDE) -> bytes:
    """A JPEG 2000 DICOM whose header says 64 x 64 and whose SIZ marker says side x side."""
    from PIL import Image
    from pydicom.uid import JPEG2000Lossless

    stream = pil_bytes(Image.new("L", (64, 64), 90), "JPEG2000", no_jp2=True)
    return encapsulated_file(with_j2k_size(stream, side, side), JPEG2000Lossless, 64, 64)


def jpeg_scan_bomb(scans: int = 300) -> bytes:
    """A 64x64 progressive JPEG whose last scan is repeated to ``scans`` more."""
    from PIL import Image

    stream = pil_bytes(Image.fromarray(ramp(64, 255, np.uint8)), "JPEG", progressive=True)
    last_scan = stream[stream.rindex(b"\xff\xda"):-2]
    return stream[:-2] + last_scan * scans + b"\xff\xd9"


def j2k_tile_bomb(side: int = 6000) -> bytes:
    """A JPEG 2000 DICOM of side x side (within the default limit) in 1x1 tiles."""
    from PIL import Image
    from pydicom.uid import JPEG2000Lossless

    stream = with_j2k_size(pil_bytes(Image.new("L", (64, 64)), "JPEG2000", no_jp2=True),
                           side, side)
    tiny_tiles = stream[:24] + struct.pack(">II", 1, 1) + stream[32:]  # XTsiz, YTsiz
    return encapsulated_file(tiny_tiles, JPEG2000Lossless, side, side)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_with_chunks(chunks: bytes) -> bytes:
    """A 64x64 grey PNG with ``chunks`` inserted after its IHDR."""
    from PIL import Image

    png = pil_bytes(Image.new("L", (64, 64), 100), "PNG")
    return png[:33] + chunks + png[33:]


def ztxt_bomb(chunks: int = 64) -> bytes:
    """A PNG with ``chunks`` zTXt chunks that each inflate to 1 MiB (Pillow's per-chunk cap)."""
    block = zlib.compress(bytes(MIB), 9)
    return png_with_chunks(b"".join(png_chunk(b"zTXt", b"k%d\x00\x00" % i + block)
                                    for i in range(chunks)))


def iccp_bomb(size: int = 64 * MIB) -> bytes:
    """A PNG whose iCCP profile inflates to ``size`` bytes."""
    return png_with_chunks(png_chunk(b"iCCP", b"p\x00\x00" + zlib.compress(bytes(size), 9)))


def idat_bomb(size: int = 256 * MIB) -> bytes:
    """A 64x64 PNG whose IDAT inflates to ``size`` bytes of zeros (a few hundred KB)."""
    ihdr = struct.pack(">IIBBBBB", 64, 64, 8, 0, 0, 0, 0)
    deflater = zlib.compressobj(9)
    idat = b"".join(deflater.compress(bytes(MIB)) for _ in range(size // MIB)) + deflater.flush()
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def png_header_bomb(side: int = 100_000) -> bytes:
    """A PNG declaring side x side pixels with a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(bytes(64))) + png_chunk(b"IEND", b""))


def nested_sequences(depth: int = 5000) -> bytes:
    """A DICOM holding ``depth`` undefined-length sequences, each in an item of the one before
    (36 bytes a level)."""
    data = dicom_file(dicom_dataset(ramp(64)))
    split = meta_end(data) + group_start(data[meta_end(data):], 0x0009)
    opening = (explicit_element(0x00081140, b"SQ", 0xFFFFFFFF)
               + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF))
    closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return data[:split] + opening * depth + closing * depth + data[split:]


def _dicom_at(side: int, syntax, *, colour: bool = False) -> bytes:
    if colour:
        gray = ramp(side, 255, np.uint8)
        pixels = np.stack([gray, gray[::-1], gray.T], axis=-1)
        return dicom_file(dicom_dataset(pixels, bits=8, photometric="RGB"), syntax)
    return dicom_file(dicom_dataset(ramp(side)), syntax)


def _rle_at(side: int) -> bytes:
    """A 16-bit RLE DICOM of side x side whose rows each hold one level (encoded here: pydicom's
    own encoder is pure Python and takes minutes at a detector's size)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    levels = np.arange(side, dtype=np.uint16) * 4095 // max(1, side - 1)
    ds = dicom_dataset(None)
    ds.Rows = ds.Columns = side
    ds.PixelData = encapsulate([rle_frame([rle_rows(levels >> 8, side),
                                           rle_rows(levels & 0xFF, side)])])
    ds["PixelData"].VR = "OB"
    return dicom_file(ds, RLELossless)


def _encapsulated_at(side: int, fmt: str) -> bytes:
    from PIL import Image
    from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit

    if fmt == "JPEG":
        stream = pil_bytes(Image.fromarray(ramp(side, 255, np.uint8)), "JPEG", quality=90)
        return encapsulated_file(stream, JPEGBaseline8Bit, side, side)
    stream = pil_bytes(Image.fromarray(ramp(side)), "JPEG2000", irreversible=False, no_jp2=True)
    return encapsulated_file(stream, JPEG2000Lossless, side, side, bits=16)


def _syntax_at(side: int, case: str) -> bytes:
    """A 12-bit ramp DICOM of side x side encoded as ``case`` of ``SYNTAX_CASES``."""
    from flannel.benchmarks.dicom_syntaxes import case_named, encode

    return encode(dicom_dataset(ramp(side)), case_named(case))


def _pil_at(side: int, kind: str) -> bytes:
    from PIL import Image

    gray8 = ramp(side, 255, np.uint8)
    if kind == "png8":
        return pil_bytes(Image.fromarray(gray8), "PNG")
    if kind == "png16":
        return pil_bytes(Image.fromarray(ramp(side, 65535)), "PNG")
    if kind == "rgba":
        rgba = np.stack([gray8, gray8[::-1], gray8.T, 255 - gray8], axis=-1)
        return pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG")
    if kind == "jpeg":
        return pil_bytes(Image.fromarray(gray8), "JPEG", quality=90)
    # Progressive colour without chroma subsampling: libjpeg holds every coefficient of the
    # full-size components until the last scan; CMYK has four of them, the most a JPEG can have.
    rgb = Image.fromarray(np.stack([gray8, gray8[::-1], gray8.T], axis=-1))
    image = rgb.convert("CMYK") if kind == "jpeg-cmyk" else rgb
    return pil_bytes(image, "JPEG", quality=90, progressive=True, subsampling=0)


def admitted_inputs(max_pixels: int) -> list[Input]:
    """The largest input of each accepted format and DICOM syntax that ``max_pixels`` admits
    (square, side the integer square root of the limit)."""
    from pydicom import uid

    side = math.isqrt(max_pixels)
    return [
        Input("PNG 8-bit grey", lambda: _pil_at(side, "png8")),
        Input("PNG 16-bit grey", lambda: _pil_at(side, "png16")),
        Input("PNG RGBA 8-bit", lambda: _pil_at(side, "rgba")),
        Input("JPEG baseline grey", lambda: _pil_at(side, "jpeg")),
        Input("JPEG progressive RGB 4:4:4", lambda: _pil_at(side, "jpeg-rgb")),
        Input("DICOM Explicit VR LE 16-bit", lambda: _dicom_at(side, uid.ExplicitVRLittleEndian)),
        Input("DICOM Implicit VR LE 16-bit", lambda: _dicom_at(side, uid.ImplicitVRLittleEndian)),
        Input("DICOM Deflated 16-bit",
              lambda: _dicom_at(side, uid.DeflatedExplicitVRLittleEndian)),
        Input("DICOM Explicit VR LE RGB 8-bit",
              lambda: _dicom_at(side, uid.ExplicitVRLittleEndian, colour=True)),
        Input("DICOM RLE Lossless 16-bit", lambda: _rle_at(side)),
        Input("DICOM JPEG Baseline 8-bit", lambda: _encapsulated_at(side, "JPEG")),
        Input("DICOM JPEG 2000 Lossless 16-bit", lambda: _encapsulated_at(side, "J2K")),
        *(Input(f"DICOM {case}", lambda case=case: _syntax_at(side, case))
          for case in ("JPEG Extended 12-bit", "JPEG Lossless SV1", "JPEG-LS Lossless",
                       "HTJ2K Lossless")),
        Input("JPEG progressive CMYK 4:4:4", lambda: _pil_at(side, "jpeg-cmyk")),
    ]


def hostile_inputs() -> list[Input]:
    """Small files built to make the decoder do or hold far more than their size, and the
    status each must get."""
    return [
        Input("Deflated DICOM, 200 MB private element before the pixels",
              deflated_with_private_element, 413),
        Input("Deflated DICOM, 200 MB private element after the pixels",
              lambda: deflated_with_private_element(after_pixels=True), 413),
        Input("RLE DICOM 64x64, segment decoding to 128 MiB", rle_bomb, 413),
        Input("JPEG-in-DICOM 512x512 header, 12000x12000 JPEG frame", jpeg_frame_bomb, 413),
        Input("JPEG 2000 DICOM 64x64 header, 12000x12000 SIZ", j2k_frame_bomb, 413),
        Input("PNG declaring 100000x100000", png_header_bomb, 413),
        Input("PNG 64x64, IDAT inflating to 256 MiB", idat_bomb, 200),
        Input("PNG with 64 zTXt chunks of 1 MiB each", ztxt_bomb, 400),
        Input("PNG with a 64 MiB iCCP profile", iccp_bomb, 400),
        Input("DICOM NumberOfFrames 10^9",
              lambda: dicom_file(dicom_dataset(ramp(64), NumberOfFrames=10**9)), 415),
        Input("DICOM BitsAllocated 32",
              lambda: dicom_file(dicom_dataset(np.zeros((64, 64), np.uint32), bits=32)), 415),
        Input("DICOM 5000 nested sequences", nested_sequences, 400),
        Input("Progressive JPEG 64x64 with 300 scans", jpeg_scan_bomb, 415),
        Input("JPEG 2000 DICOM 6000x6000 in 1x1 tiles", j2k_tile_bomb, 415),
    ]
