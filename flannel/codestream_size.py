"""Dimensions of JPEG, JPEG-LS and JPEG 2000 codestreams, read from their markers without decoding.

    python -c "from flannel.codestream_size import codestream_size; print(codestream_size(open('x.jpg','rb').read()))"

A DICOM's encapsulated frame carries its own size in its frame header (JPEG and JPEG-LS: the SOF
marker segment, ITU-T T.81 B.2.2 and T.87 C.2.2) or its image and tile size marker (JPEG 2000:
SIZ, ITU-T T.800 A.5.1, inside a ``jp2c`` box when the stream is wrapped in JP2). The decoder
trusts those, not the DICOM header, so ``flannel.dicom_bounds`` compares the two and refuses a
mismatch before any pixel is decoded.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

# JPEG start-of-frame markers (T.81 Table B.1): C0-C3, C5-C7, C9-CB, CD-CF; F7 is JPEG-LS SOF55
# (T.87 Table C.1). C4 (DHT), C8 (JPG) and CC (DAC) share the range but are not frames.
SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
                         0xCF, 0xF7})
# Markers without a length field (T.81 B.1.1.3): TEM, RSTn, SOI, EOI.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xDA)})
J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
# The SIZ marker segment's fixed part: Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz YTOsiz
# Csiz (T.800 Table A.9), then 3 bytes per component.
_SIZ = struct.Struct(">HHIIIIIIIIH")
# Decoding work a header can ask for beyond its pixel count. A progressive JPEG's decoder passes
# over the whole coefficient buffer once per scan: encoders write about 10 (libjpeg's default
# script), libjpeg-turbo's own fuzzing caps scans at 500; 256 leaves room for any real file.
MAX_JPEG_SCANS = 256
# OpenJPEG builds a header structure for every tile before decoding any: a 6000 x 6000 image in
# 1 x 1 tiles would ask for 36 million. Radiograph codestreams are one tile or a few hundred.
MAX_J2K_TILES = 4096
# Enough of a JP2 codestream box for SOC and the largest SIZ (38 bytes + 3 per component, at
# most 16384 components).
_MAIN_HEADER_BYTES = 64 << 10


class CodestreamError(ValueError):
    """A codestream whose header cannot be read (no frame header, truncated marker segment)."""


@dataclass(frozen=True)
class CodestreamSize:
    """What a codestream's header declares.

    Attributes:
        kind: "JPEG", "JPEG-LS" or "JPEG 2000".
        width, height: pixels.
        components: samples per pixel.
        bits: sample precision (the largest over components).
        scans: JPEG start-of-scan markers (an upper bound: a thumbnail's are counted too).
        tiles: JPEG 2000 tiles.
        sof_marker: the second byte of a JPEG's frame header marker, which names its process
            (0xC0 baseline, 0xC1 extended Huffman, 0xC2 progressive, ...); 0 for JPEG 2000.
    """

    kind: str
    width: int
    height: int
    components: int
    bits: int
    scans: int = 1
    tiles: int = 1
    sof_marker: int = 0

    def work_problem(self) -> str | None:
        """Why decoding this stream would cost far more than its pixels, or None."""
        if self.scans > MAX_JPEG_SCANS:
            return f"{self.kind} stream has {self.scans} scans, above the {MAX_JPEG_SCANS} accepted"
        if self.tiles > MAX_J2K_TILES:
            return f"{self.kind} codestream has {self.tiles} tiles, above the {MAX_J2K_TILES} accepted"
        return None


def jpeg_size(stream: bytes) -> CodestreamSize:
    """The frame header of a JPEG or JPEG-LS stream: the first SOF marker segment after SOI."""
    if not stream.startswith(b"\xff\xd8"):
        raise CodestreamError("frame is not a JPEG stream (no SOI marker)")
    pos = 2
    while pos + 4 <= len(stream):
        if stream[pos] != 0xFF:
            raise CodestreamError(f"JPEG marker expected at byte {pos}")
        marker = stream[pos + 1]
        if marker == 0xFF:  # fill byte (T.81 B.1.1.2)
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", stream, pos + 2)
        if marker in SOF_MARKERS:
            if length < 8 or pos + 10 > len(stream):
                raise CodestreamError("JPEG frame header is truncated")
            bits, height, width, components = struct.unpack_from(">BHHB", stream, pos + 4)
            # In entropy-coded data 0xFF is followed by 0x00 or a restart marker, so every
            # FF DA is a start of scan (or sits in metadata, such as an embedded thumbnail).
            return CodestreamSize("JPEG-LS" if marker == 0xF7 else "JPEG", width, height,
                                  components, bits, scans=stream.count(b"\xff\xda"),
                                  sof_marker=marker)
        if marker == 0xDA:
            raise CodestreamError("JPEG scan starts before any frame header (SOF)")
        if length < 2:
            raise CodestreamError(f"JPEG marker segment of length {length} at byte {pos}")
        pos += 2 + length
    raise CodestreamError("JPEG stream has no frame header (SOF marker)")


def j2k_size(stream: bytes) -> CodestreamSize:
    """The SIZ marker segment of a JPEG 2000 codestream, or of the ``jp2c`` box of a JP2 file."""
    if stream.startswith(JP2_SIGNATURE):
        stream = _jp2_codestream(stream)
    if not stream.startswith(J2K_SOC_SIZ):
        raise CodestreamError("frame is not a JPEG 2000 codestream (no SOC and SIZ markers)")
    if len(stream) < 4 + _SIZ.size:
        raise CodestreamError("JPEG 2000 SIZ marker segment is truncated")
    (_, _, xsiz, ysiz, xosiz, yosiz, xtsiz, ytsiz, xtosiz, ytosiz,
     csiz) = _SIZ.unpack_from(stream, 4)
    if xosiz >= xsiz or yosiz >= ysiz:
        raise CodestreamError("JPEG 2000 SIZ declares an empty image area")
    if xtsiz == 0 or ytsiz == 0 or xtosiz > xosiz or ytosiz > yosiz:
        raise CodestreamError("JPEG 2000 SIZ declares an invalid tile grid")
    tiles = (-(-(xsiz - xtosiz) // xtsiz)) * (-(-(ysiz - ytosiz) // ytsiz))  # T.800 B.3
    if csiz == 0 or len(stream) < 4 + _SIZ.size + 3 * csiz:
        raise CodestreamError("JPEG 2000 SIZ component list is truncated")
    depths = stream[4 + _SIZ.size::3][:csiz]  # Ssiz: bit 7 the sign, the rest depth - 1
    return CodestreamSize("JPEG 2000", xsiz - xosiz, ysiz - yosiz, csiz,
                          max((d & 0x7F) + 1 for d in depths), tiles=tiles)


def _jp2_codestream(data: bytes) -> bytes:
    """The contents of the first contiguous codestream box (``jp2c``) of a JP2 file."""
    pos = 0
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if length == 1:  # the length is in the 8 bytes after the type (ISO 15444-1 I.4)
            if pos + 16 > len(data):
                break
            (length,) = struct.unpack_from(">Q", data, pos + 8)
            header = 16
        elif length == 0:  # the box runs to the end of the file
            length = len(data) - pos
        if length < header:
            raise CodestreamError(f"JP2 box of length {length} at byte {pos}")
        if kind == b"jp2c":  # only its main header is read: SOC, then SIZ
            return data[pos + header:min(pos + length, pos + header + _MAIN_HEADER_BYTES)]
        pos += length
    raise CodestreamError("JP2 file has no codestream box (jp2c)")


def codestream_size(stream: bytes) -> CodestreamSize:
    """The declared size of a JPEG, JPEG-LS or JPEG 2000 stream, whichever it is."""
    if stream.startswith(b"\xff\xd8"):
        return jpeg_size(stream)
    return j2k_size(stream)
