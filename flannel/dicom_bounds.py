"""Bounded DICOM reading: what a DICOM file may make the decoder allocate and do, checked first.

    python -c "from flannel.dicom_bounds import read_dicom, pixel_array; print(pixel_array(read_dicom(open('x.dcm','rb').read(), 6000**2), 6000**2).shape)"

``flannel.decode`` reads every DICOM through here. A file of a few hundred kilobytes can declare
or expand to gigabytes; each way is closed before the work is done:

- the transfer syntax is one of ``ACCEPTED_SYNTAXES`` (``SYNTAX_FAMILIES`` names the plugin
  that decodes each), else 415 naming it and listing the accepted ones;
- a Deflated data set is inflated by ``inflate_bounded`` at most to the pixel bytes its header
  declares plus ``HEADER_BYTES``, never whole;
- the pixel module (rows, columns, samples, bits, frames, photometric interpretation) is checked
  against the pixel limit before any pixel is decoded (``PixelModule``);
- an encapsulated JPEG, JPEG-LS, JPEG 2000 or HTJ2K frame must be the kind of codestream its
  syntax names and declare, in its own SOF or SIZ marker, the size, samples and at most the bits
  the DICOM header declares (``flannel.codestream_size``);
- RLE segments are decoded by Pillow's PackBits decoder into a buffer of exactly the plane size,
  after a length check that refuses any segment longer than an encoding of that plane can be.

Errors are ``flannel.decode.InputError`` subclasses with their HTTP status.
"""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from pydicom import uid

from flannel.codestream_size import CodestreamError, codestream_size
from flannel.decode import (DecodeError, ImageTooLarge, InputError, UnsupportedImage,
                            check_size, error_detail)

# Every transfer syntax UID starts so (PS3.5 annex A); refusals list the accepted ones after it.
_UID_ROOT = "1.2.840.10008.1.2"


@dataclass(frozen=True)
class SyntaxFamily:
    """Transfer syntaxes decoded alike: their name in refusals, the decoder (a pydicom decoding
    plugin, one of ``OWN_DECODERS``, or ``""`` for native data, which pydicom reads itself) and
    the codestream kind of an encapsulated frame (``flannel.codestream_size``; None for native
    data and RLE)."""

    name: str
    plugin: str
    codestream: str | None
    syntaxes: tuple[uid.UID, ...]

    def describe(self) -> str:
        """"name (UID)", each UID after the first but its last part (".4.57/.70"), and written
        from ``_UID_ROOT`` on, so that every family fits one refusal."""
        first, *others = (s.removeprefix(_UID_ROOT) or _UID_ROOT for s in self.syntaxes)
        return f"{self.name} ({first}{''.join('/.' + s.rsplit('.', 1)[1] for s in others)})"


# The transfer syntaxes a DICOM may arrive in, each with the pydicom decoding plugin that decodes
# it (requirements.lock installs them all). One plugin per syntax, so a
# file decodes the same wherever it is served: Pillow (libjpeg-turbo) for 8-bit JPEG Baseline;
# libjpeg-turbo through imagecodecs for JPEG Extended (12-bit samples, which neither Pillow nor
# the GDCM build on PyPI decode) and JPEG Lossless (GDCM decodes it too, but a corrupt frame can
# make it abort the process: an uncaught C++ exception, found by mutating frames); CharLS
# (pyjpegls) for JPEG-LS; OpenJPEG (pylibjpeg-openjpeg) for JPEG 2000 and HTJ2K. Explicit VR Big
# Endian is decodable but refused: it was retired from DICOM in 2004 (PS3.5 2004, annex A.3), no
# current modality writes it, and byte-swapped reading is code no radiograph needs. JPEG 2000
# Part 2 (multi-component), JPIP, MPEG and video syntaxes hold no radiograph.
SYNTAX_FAMILIES = (
    SyntaxFamily("Implicit VR LE", "", None, (uid.ImplicitVRLittleEndian,)),
    SyntaxFamily("Explicit VR LE", "", None, (uid.ExplicitVRLittleEndian,)),
    SyntaxFamily("Deflated", "", None, (uid.DeflatedExplicitVRLittleEndian,)),
    SyntaxFamily("RLE Lossless", "rle", None, (uid.RLELossless,)),
    SyntaxFamily("JPEG Baseline", "pillow", "JPEG", (uid.JPEGBaseline8Bit,)),
    SyntaxFamily("JPEG Extended", "libjpeg-turbo", "JPEG", (uid.JPEGExtended12Bit,)),
    SyntaxFamily("JPEG Lossless", "libjpeg-turbo", "JPEG",
                 (uid.JPEGLossless, uid.JPEGLosslessSV1)),
    SyntaxFamily("JPEG-LS", "pyjpegls", "JPEG-LS", (uid.JPEGLSLossless, uid.JPEGLSNearLossless)),
    SyntaxFamily("JPEG 2000", "pylibjpeg", "JPEG 2000", (uid.JPEG2000Lossless, uid.JPEG2000)),
    SyntaxFamily("HTJ2K", "pylibjpeg", "JPEG 2000",
                 (uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.HTJ2K)),
)
SYNTAX_FAMILY = {syntax: family for family in SYNTAX_FAMILIES for syntax in family.syntaxes}
ACCEPTED_SYNTAXES = tuple(SYNTAX_FAMILY)

# Inflated bytes allowed besides the pixel data in a Deflated data set (the header before it and
# any elements after it). A chest radiograph's header is 2-50 KB, with vendors' private blocks
# and an icon image a few hundred KB; 4 MiB is ample and small beside the pixel data it bounds.
HEADER_BYTES = 4 << 20
# Decoded pixel bytes allowed per pixel of the limit: an 8-bit RGB image at the pixel limit
# (3 bytes a pixel; a 16-bit monochrome one needs 2). A 16-bit colour image is admitted up to
# half the pixel limit.
DECODED_BYTES_PER_PIXEL = 3
# DX images have 8 or 16 bits allocated (PS3.3 C.8.11.7); CR and RG in practice too. 32- and 64-bit
# integer pixels (and the Float Pixel Data elements) hold no radiograph and would decode to 4-8
# bytes a pixel, then to float64 in the modality LUT.
BITS_ALLOCATED = (8, 16)
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# Colour as DICOM stores it (PS3.3 C.7.6.3.1.2); reduced to luminance by the decoder.
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
# Reading a Deflated header stops at the first of the pixel-data elements (Float Pixel Data,
# Double Float Pixel Data, Pixel Data) or anything after them.
_PIXELS_START = 0x7FE00008
_FLOAT_PIXEL_DATA = {0x7FE00008: "Float Pixel Data", 0x7FE00009: "Double Float Pixel Data"}
# RLE (PS3.5 G.3.1, the PackBits scheme): every run yields at least one byte for at most one byte
# of overhead (a literal run of n bytes takes n + 1, a replicate run of n >= 2 takes 2), so no
# encoding of n bytes without no-op headers takes more than 2n; a segment is padded to an even
# length, hence a few bytes of slack. A longer segment expands to more than its plane.
RLE_SEGMENT_SLACK = 8
RLE_HEADER_BYTES = 64
RLE_MAX_SEGMENTS = 15
# Characters of a value from the file quoted in an error.
QUOTE_CHARS = 64


def _quote(value) -> str:
    return repr(str(value)[:QUOTE_CHARS])


def syntax_name(syntax) -> str:
    """A transfer syntax as "name (UID)", the UID quoted when it is not a known one."""
    name = getattr(syntax, "name", "")
    if name and name != str(syntax):
        return f"{name} ({syntax})"
    return f"{_quote(syntax)} (an unknown UID)"


def accepted_syntax(syntax) -> uid.UID:
    """``syntax`` as a UID when it is in ``ACCEPTED_SYNTAXES``.

    Raises:
        DecodeError: no TransferSyntaxUID in the file meta information.
        UnsupportedImage: any other syntax, named, with the accepted ones listed.
    """
    if syntax is None or str(syntax).strip() == "":
        raise DecodeError("DICOM file meta information has no TransferSyntaxUID")
    syntax = uid.UID(str(syntax)[:QUOTE_CHARS])
    if syntax not in ACCEPTED_SYNTAXES:
        accepted = ", ".join(family.describe() for family in SYNTAX_FAMILIES)
        raise UnsupportedImage(f"transfer syntax {syntax_name(syntax)} is not accepted: "
                               f"send one of {accepted}")
    return syntax


def _header_int(ds, keyword: str, default: int | None = None) -> int | None:
    value = ds.get(keyword, default)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DecodeError(f"DICOM {keyword} {_quote(value)} is not one integer") from None


@dataclass(frozen=True)
class PixelModule:
    """The pixel description a DICOM header declares, checked against the pixel limit.

    Attributes:
        rows, columns, samples, bits_allocated, frames: as declared.
        photometric: PhotometricInterpretation, upper case.
    """

    rows: int
    columns: int
    samples: int
    bits_allocated: int
    frames: int
    photometric: str

    @property
    def decoded_bytes(self) -> int:
        """Bytes of the decoded frame."""
        return self.rows * self.columns * self.samples * (self.bits_allocated // 8)

    @classmethod
    def of(cls, ds, max_pixels: int) -> "PixelModule":
        """Read and check ``ds``'s pixel module (missing PixelData included).

        Raises:
            UnsupportedImage: float pixel data, no pixel data, multi-frame, samples, bits or a
                photometric interpretation that is no radiograph's.
            ImageTooLarge, ImageTooSmall: declared sizes (``flannel.decode.check_size``) or a
                decoded frame above ``DECODED_BYTES_PER_PIXEL`` bytes per pixel of the limit.
            DecodeError: a value that is not an integer, bits stored above bits allocated.
        """
        for tag, name in _FLOAT_PIXEL_DATA.items():
            if tag in ds:
                raise UnsupportedImage(f"DICOM holds {name}, not integer pixels: no radiograph "
                                       f"is stored as floating point")
        if "PixelData" not in ds:
            raise UnsupportedImage("DICOM has no pixel data (PixelData element missing)")
        rows, columns = _header_int(ds, "Rows", 0), _header_int(ds, "Columns", 0)
        check_size(columns, rows, max_pixels)
        frames = _header_int(ds, "NumberOfFrames", 1) or 1
        if frames < 0:
            raise DecodeError(f"DICOM NumberOfFrames is {frames}")
        if frames > 1:
            raise UnsupportedImage(f"multi-frame DICOM with {frames} frames")
        samples = _header_int(ds, "SamplesPerPixel", 1)
        bits = _header_int(ds, "BitsAllocated", 0)
        stored = _header_int(ds, "BitsStored", bits)
        if bits not in BITS_ALLOCATED:
            raise UnsupportedImage(f"DICOM BitsAllocated {bits}: radiographs have "
                                   f"{' or '.join(map(str, BITS_ALLOCATED))} bits a sample")
        if not 1 <= stored <= bits:
            raise DecodeError(f"DICOM BitsStored {stored} does not fit BitsAllocated {bits}")
        photometric = str(ds.get("PhotometricInterpretation", "") or
                          ("MONOCHROME2" if samples == 1 else "")).strip().upper()
        allowed = {1: MONOCHROME, 3: COLOUR}.get(samples, ())
        if photometric not in allowed:
            raise UnsupportedImage(
                f"DICOM with SamplesPerPixel {samples} and PhotometricInterpretation "
                f"{_quote(photometric)} is not accepted: send {'/'.join(MONOCHROME)} (1 sample) "
                f"or {'/'.join(COLOUR)} (3 samples)")
        module = cls(rows, columns, samples, bits, frames, photometric)
        budget = max_pixels * DECODED_BYTES_PER_PIXEL
        if module.decoded_bytes > budget:
            raise ImageTooLarge(f"DICOM pixels ({columns}x{rows}, {samples} samples of {bits} "
                                f"bits) decode to {module.decoded_bytes} bytes, above the limit "
                                f"of {budget}")
        return module


def inflate_bounded(deflated, max_pixels: int) -> bytes:
    """Inflate a Deflated Explicit VR Little Endian data set (PS3.5 A.5) to at most the pixel
    bytes its own header declares plus ``HEADER_BYTES``.

    The header is inflated first (``HEADER_BYTES`` at most) and read up to the pixel data; the
    rest is inflated with ``zlib``'s ``max_length`` set from the rows, columns, samples and bits it
    declares, so a small file cannot make the decoder hold more than that.

    Args:
        deflated: the bytes after the file meta information (raw deflate, no zlib header).
        max_pixels: the pixel limit, checked on the declared pixel module first.

    Returns:
        The inflated data set, Explicit VR Little Endian.

    Raises:
        ImageTooLarge: the header or the whole data set inflates past its bound.
        DecodeError: not a deflate stream, or one that ends early.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        head = inflater.decompress(deflated, HEADER_BYTES)
        header, reached_pixels = _read_header(head)
        if not reached_pixels and len(head) >= HEADER_BYTES:
            raise ImageTooLarge(f"the Deflated DICOM's elements before its pixel data inflate to "
                                f"more than {HEADER_BYTES} bytes")
        pixel_bytes = PixelModule.of(header, max_pixels).decoded_bytes if reached_pixels else 0
        allowed = HEADER_BYTES + pixel_bytes
        rest = inflater.decompress(inflater.unconsumed_tail, allowed - len(head) + 1)
    except zlib.error as exc:
        raise DecodeError(f"the Deflated DICOM's data set is not a deflate stream: {exc}") from exc
    if len(head) + len(rest) > allowed:
        raise ImageTooLarge(f"the Deflated DICOM's data set inflates to more than {allowed} "
                            f"bytes: its declared pixels need {pixel_bytes}, and other elements "
                            f"may take {HEADER_BYTES}")
    if not inflater.eof:
        raise DecodeError("the Deflated DICOM's data set is truncated (its deflate stream does "
                          "not end)")
    return head + rest


def _read_header(head: bytes):
    """The elements of an Explicit VR Little Endian data set before the pixel-data group, and
    whether reading got there (so ``head`` held the whole header)."""
    from pydicom.filereader import read_dataset

    reached = []

    def at_pixels(tag, vr, length) -> bool:
        if tag >= _PIXELS_START:
            reached.append(tag)
            return True
        return False

    header = read_dataset(io.BytesIO(head), False, True, stop_when=at_pixels)
    if reached and reached[0] == 0x7FE00010:
        header.add_new(0x7FE00010, "OB", b"")  # a placeholder: the header declares pixel data
    return header, bool(reached)


def read_dicom(data: bytes, max_pixels: int):
    """Parse a DICOM Part 10 file whose transfer syntax is accepted; a Deflated one is inflated
    within its bound (``inflate_bounded``). Pixels are not decoded.

    Returns:
        pydicom ``FileDataset``.

    Raises:
        InputError: a subclass naming what is wrong.
    """
    from pydicom.dataset import FileDataset
    from pydicom.errors import InvalidDicomError
    # pydicom's own reader inflates a Deflated data set whole (zlib.decompress); its file-meta
    # reader is used alone so that the data set is read from bytes inflated here.
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble

    fp = io.BytesIO(data)
    try:
        preamble = read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        syntax = accepted_syntax(meta.get("TransferSyntaxUID"))
        if syntax.is_deflated:
            fp = io.BytesIO(inflate_bounded(memoryview(data)[fp.tell():], max_pixels))
        dataset = read_dataset(fp, syntax.is_implicit_VR, syntax.is_little_endian)
    except InputError:
        raise
    except RecursionError:
        raise DecodeError("corrupt DICOM: sequences nested too deep") from None
    except (InvalidDicomError, EOFError, ValueError, OSError, struct.error, KeyError) as exc:
        raise DecodeError(f"corrupt DICOM: {error_detail(exc)}") from exc
    ds = FileDataset(fp, dataset, preamble, meta, syntax.is_implicit_VR, syntax.is_little_endian)
    ds.set_original_encoding(syntax.is_implicit_VR, syntax.is_little_endian,
                             dataset._character_set)
    return ds


def _single_frame(ds) -> bytes:
    from pydicom.encaps import get_frame

    try:
        return get_frame(ds.PixelData, 0, number_of_frames=1)
    except (ValueError, KeyError, IndexError, struct.error) as exc:
        raise DecodeError(f"corrupt encapsulated DICOM pixel data: {error_detail(exc)}") from exc


def check_codestream(frame: bytes, module: PixelModule, max_pixels: int,
                     syntax: uid.UID | None = None) -> None:
    """Refuse an encapsulated JPEG, JPEG-LS or JPEG 2000 frame that is not the codestream its
    ``syntax`` names, or whose own header (SOF or SIZ) declares more than the pixel limit,
    another size or sample count than the DICOM header, more bits a sample than the header
    allocates, or more scans or tiles than ``flannel.codestream_size`` accepts, and a JPEG or
    JPEG-LS frame that does not end with its EOI marker."""
    name = syntax.name if syntax is not None else "encapsulated DICOM"
    try:
        size = codestream_size(frame)
    except CodestreamError as exc:
        raise DecodeError(f"corrupt {name} frame: {exc}") from exc
    family = SYNTAX_FAMILY.get(syntax)
    expected = family.codestream if family and family.codestream else size.kind
    if size.kind != expected:
        raise DecodeError(f"the DICOM's frame is a {size.kind} codestream, but its transfer "
                          f"syntax {name} carries {expected}")
    if size.width * size.height > max_pixels:
        raise ImageTooLarge(f"the DICOM's {size.kind} frame is {size.width}x{size.height} = "
                            f"{size.width * size.height} pixels, above the limit of {max_pixels}")
    if (size.width, size.height) != (module.columns, module.rows):
        raise DecodeError(f"the DICOM's {size.kind} frame is {size.width}x{size.height} but its "
                          f"header says {module.columns}x{module.rows}")
    if size.components != module.samples:
        raise DecodeError(f"the DICOM's {size.kind} frame has {size.components} components but "
                          f"its header says SamplesPerPixel {module.samples}")
    if size.bits > module.bits_allocated:
        raise DecodeError(f"the DICOM's {size.kind} frame has {size.bits}-bit samples but its "
                          f"header allocates {module.bits_allocated} bits")
    if problem := size.work_problem():
        raise UnsupportedImage(f"the DICOM's {problem}")
    if size.kind in ("JPEG", "JPEG-LS") and not bytes(frame[-8:]).rstrip(b"\x00").endswith(
            b"\xff\xd9"):
        # A JPEG or JPEG-LS stream ends with EOI (T.81 B.2.1, T.87 C.1), then at most the
        # fragment's padding byte. Without it, libjpeg-turbo fills the missing rows with grey
        # and carries on, and CharLS spends about 3 s on it whatever the image's size.
        raise DecodeError(f"the DICOM's {size.kind} frame is truncated (it does not end with "
                          f"an EOI marker)")


def rle_longest_segment(plane: int) -> int:
    """The most bytes an RLE encoding of a ``plane``-byte segment can take."""
    return 2 * plane + RLE_SEGMENT_SLACK


def rle_decode_frame(frame: bytes, module: PixelModule) -> bytes:
    """An RLE Lossless frame (PS3.5 G) as native little-endian pixel data in planar
    configuration 1, each segment decoded into exactly one plane's bytes.

    Raises:
        ImageTooLarge: a segment longer than any encoding of the declared plane.
        DecodeError: a header that does not fit the pixel module, a segment that ends early.
    """
    from PIL import Image

    sample_bytes = module.bits_allocated // 8
    wanted = module.samples * sample_bytes
    if len(frame) < RLE_HEADER_BYTES:
        raise DecodeError("RLE frame is shorter than its 64-byte header")
    count, *offsets = struct.unpack_from("<16I", frame)
    if count != wanted:
        raise DecodeError(f"RLE header declares {count} segments; {module.samples} "
                          f"samples of {module.bits_allocated} bits need {wanted}")
    bounds = offsets[:count] + [len(frame)]
    if bounds[0] != RLE_HEADER_BYTES or any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise DecodeError("RLE segment offsets are not increasing from the end of the header")
    plane = module.rows * module.columns
    longest = rle_longest_segment(plane)
    out = np.empty((module.samples, plane, sample_bytes), dtype=np.uint8)
    for index in range(count):
        segment = memoryview(frame)[bounds[index]:bounds[index + 1]]
        if len(segment) > longest:
            raise ImageTooLarge(f"RLE segment {index + 1} is {len(segment)} bytes, longer than any "
                                f"encoding of a {module.columns}x{module.rows} plane "
                                f"({longest} bytes at most)")
        try:
            # One row of the whole plane: Pillow's PackBits decoder (TIFF's) cuts a run at a row's
            # end, while a DICOM segment is one stream whose runs may (non-conformantly) cross.
            decoded = Image.frombytes("L", (plane, 1), bytes(segment), "packbits", "L")
        except ValueError as exc:
            raise DecodeError(f"RLE segment {index + 1} decodes to fewer than {plane} "
                              f"bytes") from exc
        sample, byte = divmod(index, sample_bytes)
        # Segments run from the most significant byte (PS3.5 G.2); native data is little endian.
        out[sample, :, sample_bytes - 1 - byte] = np.asarray(decoded).reshape(-1)
    return out.tobytes()


def jpeg_decode_frame(frame: bytes, module: PixelModule) -> tuple[bytes, str | None]:
    """A JPEG frame (DCT 8- or 12-bit, or lossless 2-16-bit) decoded by libjpeg-turbo
    (imagecodecs): native little-endian pixels, colour as interleaved RGB.

    Returns:
        The pixel bytes, and the photometric interpretation they are in when the decoder
        converted them (colour: "RGB"), else None.

    Raises:
        DecodeError: the stream does not decode, or to another shape or depth than the header's.
    """
    import imagecodecs

    try:
        pixels = imagecodecs.jpeg8_decode(frame)
    except (imagecodecs.Jpeg8Error, ValueError, RuntimeError) as exc:
        raise DecodeError(f"corrupt JPEG frame: {error_detail(exc)}") from exc
    expected = (module.rows, module.columns) + ((module.samples,) if module.samples > 1 else ())
    if pixels.shape != expected or pixels.itemsize > module.bits_allocated // 8:
        raise DecodeError(f"the JPEG frame decodes to {pixels.dtype} {pixels.shape}; the header "
                          f"declares {expected} of {module.bits_allocated} bits")
    native = pixels.astype(f"<u{module.bits_allocated // 8}", copy=False).tobytes()
    return native, ("RGB" if module.samples > 1 else None)


def _rle_frame(frame: bytes, module: PixelModule) -> tuple[bytes, str | None]:
    return rle_decode_frame(frame, module), None


# Encapsulated frames the project decodes itself, within the bounds above, into native pixel
# data (``SyntaxFamily.plugin`` names them): RLE, whose segments are length-checked first, and
# JPEG Extended and Lossless through libjpeg-turbo (see ``SYNTAX_FAMILIES``).
OWN_DECODERS = {"rle": _rle_frame, "libjpeg-turbo": jpeg_decode_frame}


def _set_native(ds, module: PixelModule, pixels: bytes, photometric: str | None) -> None:
    """Replace ``ds``'s encapsulated pixel data by decoded native data (planar configuration
    as ``OWN_DECODERS`` write it: RLE by plane, JPEG interleaved)."""
    ds.PixelData = pixels
    ds["PixelData"].VR = "OB" if module.bits_allocated == 8 else "OW"
    if module.samples > 1:
        ds.PlanarConfiguration = 0 if photometric else 1
    if photometric:
        ds.PhotometricInterpretation = photometric
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian


def pixel_array(ds, max_pixels: int) -> np.ndarray:
    """The pixels of a dataset read by ``read_dicom``, decoded only after the pixel module, the
    frame's own header and, for RLE, each segment's length fit the limits.

    Returns:
        pydicom's ``pixel_array``: (rows, columns) or (rows, columns, samples).

    Raises:
        InputError: a subclass naming what is wrong.
    """
    module = PixelModule.of(ds, max_pixels)
    syntax = ds.file_meta.TransferSyntaxUID
    family = SYNTAX_FAMILY[syntax]
    plugin = family.plugin
    if syntax.is_encapsulated:
        frame = _single_frame(ds)
        if family.codestream:
            check_codestream(frame, module, max_pixels, syntax)
        if plugin in OWN_DECODERS:
            # Decoded here into native pixel data, which pydicom then reads as it reads any.
            _set_native(ds, module, *OWN_DECODERS[plugin](frame, module))
            plugin = ""
        del frame
    try:
        if plugin:
            ds.pixel_array_options(decoding_plugin=plugin)
        pixels = ds.pixel_array
    except NotImplementedError as exc:  # no decoder for what the header declares
        raise UnsupportedImage(f"cannot decode DICOM pixels in {syntax_name(syntax)}: "
                               f"{error_detail(exc)}") from exc
    except (RuntimeError, ValueError, AttributeError, KeyError, TypeError, OSError) as exc:
        # pydicom raises RuntimeError when its plugin fails on the stream: a corrupt frame.
        raise DecodeError(f"corrupt DICOM pixel data ({syntax_name(syntax)}): "
                          f"{error_detail(exc)}") from exc
    if not np.may_share_memory(pixels, np.frombuffer(ds.PixelData, dtype=np.uint8)):
        del ds.PixelData  # decoded into a copy: the stored bytes are not needed any more
    return pixels


def keep_identifiers_out_of_logs() -> None:
    """Keep DICOM element values out of this process's logs (a serving worker's, the PACS
    bridge's): pydicom's value validation logs and warns with the offending value (a patient's
    name or birth date among them), so the process reads without it and keeps only pydicom's
    errors."""
    import logging
    import warnings

    import pydicom

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pydicom")
