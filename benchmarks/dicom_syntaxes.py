"""Every DICOM transfer syntax the service accepts, built from one real radiograph, and the time
each takes to decode: `flannel bench syntaxes`.

    flannel bench syntaxes --repeats 20 --out runs/bench/syntaxes
    python -c "from flannel.benchmarks.dicom_syntaxes import SYNTAX_CASES as c; print(c)"

``SYNTAX_CASES`` holds one entry per syntax: its UID, whether it keeps every stored value, and
how it is encoded. ``encode`` re-encodes a native single-frame monochrome dataset into one of
them as Part 10 bytes; ``variants`` gives the pixel modules a PACS sends besides the source's
(12- and 16-bit stored, the other photometric interpretation, signed pixels, a VOI LUT).
Encoders: pydicom's own (``Dataset.compress``: RLE, JPEG-LS through pyjpegls,
JPEG 2000 through pylibjpeg-openjpeg; Deflated by writing the data set deflated) and, for the
syntaxes pydicom cannot write, imagecodecs (the test extra): libjpeg-turbo for JPEG 8- and
12-bit and lossless with predictor 1, liblj92 for lossless with predictor 6, OpenJPH for HTJ2K.
Used by ``tests/test_dicom_syntaxes.py``; nothing built here is written but under ``--out``.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from pydicom import uid

from flannel.benchmarks.decode_inputs import dicom_file

log = logging.getLogger(__name__)

# libjpeg-turbo's quality for the DCT syntaxes: 90 is what modalities that write lossy JPEG
# commonly use; the decoded error it gives is measured in tests/test_dicom_syntaxes.py.
JPEG_QUALITY = 90
# JPEG-LS near-lossless: each stored value within NEAR of the source (T.87 A.2). 3 is a common
# PACS setting for 12-16 bit radiographs (about 1.5:1 more than lossless on RG1_UNCR).
JLS_NEAR = 3
# JPEG 2000 lossy: a compression ratio of 10:1, at the low end of what studies of chest
# radiographs found diagnostically lossless (10:1 to 20:1).
J2K_RATIO = 10
# HTJ2K lossy (OpenJPH's irreversible path): the quantisation step of the base band relative to
# the dynamic range; 0.002 gives about 9:1 on RG1_UNCR, close to the JPEG 2000 ratio above.
HTJ2K_QSTEP = 0.002
# DICOM LossyImageCompressionMethod (PS3.3 C.7.6.1.1.5.1) of each lossy family.
_LOSSY_METHOD = {"jpeg": "ISO_10918_1", "jpeg-ls": "ISO_14495_1", "j2k": "ISO_15444_1",
                 "htj2k": "ISO_15444_15"}


def _jpeg_dct(pixels: np.ndarray, bits: int) -> bytes:
    import imagecodecs

    return imagecodecs.jpeg8_encode(pixels, level=JPEG_QUALITY, bitspersample=bits)


def _jpeg_lossless_sv1(pixels: np.ndarray, bits: int) -> bytes:
    """SOF3, selection value (predictor) 1: what 1.2.840.10008.1.2.4.70 requires."""
    import imagecodecs

    return imagecodecs.jpeg8_encode(pixels, lossless=True, predictor=1, bitspersample=bits)


def _jpeg_lossless_lj92(pixels: np.ndarray, bits: int) -> bytes:
    """SOF3 with liblj92's predictor 6 (Rb + (Ra - Rc) / 2): process 14 with a predictor other
    than 1, which only 1.2.840.10008.1.2.4.57 allows."""
    import imagecodecs

    return imagecodecs.ljpeg_encode(pixels, bitspersample=bits)


def _htj2k(reversible: bool) -> Callable[[np.ndarray, int], bytes]:
    def encode_htj2k(pixels: np.ndarray, bits: int) -> bytes:
        # OpenJPH writes one tile in RPCL order with a TLM marker, as 1.2.840.10008.1.2.4.202
        # requires; its SIZ precision is the array's (16 bits for 9-16 stored).
        import imagecodecs

        return imagecodecs.htj2k_encode(pixels, None if reversible else HTJ2K_QSTEP,
                                        reversible=reversible, tlm=True)
    return encode_htj2k


@dataclass(frozen=True)
class SyntaxCase:
    """One transfer syntax and how a native dataset is re-encoded into it.

    Attributes:
        name: short name for tables and test ids.
        syntax: the transfer syntax UID.
        lossless: every stored value comes back (and the decoded image equals the source's).
        frame: encodes the (rows, columns) stored values at a bit depth into one codestream;
            None when pydicom writes the syntax itself (``compress`` set) or it is native.
        compress: keyword arguments of ``Dataset.compress`` when pydicom encodes it, else None.
        max_bits: most bits stored the syntax holds; a deeper source is requantized first
            (``fit_depth``), which makes the case lossy whatever the codec.
        signed: the encoder takes signed pixels (PixelRepresentation 1).
        family: the codec family, for LossyImageCompressionMethod.
    """

    name: str
    syntax: uid.UID
    lossless: bool
    frame: Callable[[np.ndarray, int], bytes] | None = field(default=None, compare=False)
    compress: dict | None = field(default=None, compare=False, hash=False)
    max_bits: int = 16
    signed: bool = True
    family: str = ""

    def unsupported(self, ds) -> str | None:
        """Why this encoder cannot hold ``ds``'s pixels, or None."""
        if not self.signed and int(ds.PixelRepresentation) == 1:
            return f"the {self.name} encoder writes unsigned samples only"
        return None


SYNTAX_CASES = (
    SyntaxCase("Explicit VR LE", uid.ExplicitVRLittleEndian, True),
    SyntaxCase("Implicit VR LE", uid.ImplicitVRLittleEndian, True),
    SyntaxCase("Deflated", uid.DeflatedExplicitVRLittleEndian, True),
    SyntaxCase("RLE Lossless", uid.RLELossless, True, compress={"encoding_plugin": "pydicom"}),
    SyntaxCase("JPEG Baseline 8-bit", uid.JPEGBaseline8Bit, False, _jpeg_dct, max_bits=8,
               signed=False, family="jpeg"),
    SyntaxCase("JPEG Extended 12-bit", uid.JPEGExtended12Bit, False, _jpeg_dct, max_bits=12,
               signed=False, family="jpeg"),
    SyntaxCase("JPEG Lossless", uid.JPEGLossless, True, _jpeg_lossless_lj92, signed=False),
    SyntaxCase("JPEG Lossless SV1", uid.JPEGLosslessSV1, True, _jpeg_lossless_sv1,
               signed=False),
    SyntaxCase("JPEG-LS Lossless", uid.JPEGLSLossless, True, compress={}),
    SyntaxCase("JPEG-LS Near-Lossless", uid.JPEGLSNearLossless, False,
               compress={"jls_error": JLS_NEAR}, family="jpeg-ls"),
    SyntaxCase("JPEG 2000 Lossless", uid.JPEG2000Lossless, True, compress={}),
    SyntaxCase("JPEG 2000", uid.JPEG2000, False, compress={"j2k_cr": [J2K_RATIO]}, family="j2k"),
    SyntaxCase("HTJ2K Lossless", uid.HTJ2KLossless, True, _htj2k(True)),
    SyntaxCase("HTJ2K Lossless RPCL", uid.HTJ2KLosslessRPCL, True, _htj2k(True)),
    SyntaxCase("HTJ2K", uid.HTJ2K, False, _htj2k(False), family="htj2k"),
)


def case_named(name: str) -> SyntaxCase:
    return next(c for c in SYNTAX_CASES if c.name == name)


def fit_depth(ds, bits: int) -> None:
    """Requantize ``ds``'s unsigned stored values onto ``bits`` bits in place, when it stores
    more: the range present maps linearly onto 0 .. 2**bits - 1, and RescaleSlope and
    RescaleIntercept map the new values back to the old modality values (within half a step),
    so the header says what the stored values mean. BitsAllocated becomes 8 for 8 bits."""
    if int(ds.BitsStored) <= bits:
        return
    pixels = ds.pixel_array.astype(np.float64)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    low, high = float(pixels.min()), float(pixels.max())
    step = float(f"{(high - low) / ((1 << bits) - 1):.10g}")  # as the DS string will hold it
    stored = np.clip(np.rint((pixels - low) / step), 0, (1 << bits) - 1)
    allocated = 8 if bits <= 8 else 16
    ds.PixelData = stored.astype(np.uint8 if allocated == 8 else np.uint16).tobytes()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, bits, bits - 1
    ds.RescaleSlope = f"{step * slope:.10g}"
    ds.RescaleIntercept = f"{low * slope + intercept:.10g}"
    ds.RescaleType = ds.get("RescaleType", "US")
    ds["PixelData"].VR = "OB" if allocated == 8 else "OW"


def _mark_lossy(ds, case: SyntaxCase, ratio: float) -> None:
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = f"{ratio:.4g}"
    ds.LossyImageCompressionMethod = _LOSSY_METHOD.get(case.family, "ISO_10918_1")


def encode(ds, case: SyntaxCase) -> bytes:
    """``ds`` (native, single frame, monochrome) re-encoded into ``case``'s syntax.

    Args:
        ds: a pydicom Dataset with file meta information, its pixels uncompressed.
        case: one of ``SYNTAX_CASES``.

    Returns:
        Part 10 bytes, the file meta TransferSyntaxUID ``case.syntax`` and the pixels
        encapsulated (one fragment) where the syntax is.

    Raises:
        ValueError: ``ds`` is compressed, multi-frame or colour, or ``case.unsupported``.
    """
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        raise ValueError(f"encode needs native pixels, not {ds.file_meta.TransferSyntaxUID.name}")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.SamplesPerPixel) != 1:
        raise ValueError("encode takes a single-frame monochrome dataset")
    if reason := case.unsupported(ds):
        raise ValueError(reason)
    ds = copy.deepcopy(ds)
    native_bytes = len(ds.PixelData)
    requantized = int(ds.BitsStored) > case.max_bits
    fit_depth(ds, case.max_bits)
    for keyword in ("PlanarConfiguration", "LossyImageCompression",
                    "LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        ds.pop(keyword, None)
    if case.compress is not None:
        ds.compress(case.syntax, **case.compress)
    elif case.frame is not None:
        from pydicom.encaps import encapsulate

        frame = case.frame(ds.pixel_array, int(ds.BitsStored))
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    if not (case.lossless and not requantized):
        data_bytes = len(ds.PixelData) if ds.file_meta.TransferSyntaxUID.is_compressed else 0
        _mark_lossy(ds, case, native_bytes / max(1, data_bytes or native_bytes))
    return dicom_file(ds, case.syntax)


def _with_pixels(ds, pixels: np.ndarray, **elements):
    out = copy.deepcopy(ds)
    out.PixelData = pixels.tobytes()
    out["PixelData"].VR = "OW" if pixels.itemsize == 2 else "OB"
    for keyword, value in elements.items():
        setattr(out, keyword, value)
    return out


def _scaled_window(ds, factor: float) -> dict:
    if "WindowCenter" not in ds:
        return {}
    return {"WindowCenter": f"{float(ds.WindowCenter) * factor:.10g}",
            "WindowWidth": f"{float(ds.WindowWidth) * factor:.10g}"}


def voi_lut_item(low: int, high: int):
    """A VOI LUT Sequence item over stored values ``low`` .. ``high``: a 16-bit sigmoid (the
    shape CR vendors ship for chest presentation), one entry per value."""
    from pydicom.dataset import Dataset

    values = np.arange(low, high + 1, dtype=np.float64)
    centre, width = (low + high) / 2, (high - low) / 4
    curve = 65535 / (1 + np.exp(-(values - centre) / width))
    item = Dataset()
    item.LUTDescriptor = [len(values) & 0xFFFF, low, 16]  # 65536 entries are written as 0
    item.LUTExplanation = "SIGMOID CHEST"
    item.LUTData = np.rint(curve).astype("<u2").tobytes()
    item["LUTData"].VR = "OW"
    return item


def variants(ds) -> dict:
    """The source and the pixel modules a PACS sends besides it, each a native dataset.

    Args:
        ds: a native, unsigned, single-frame monochrome dataset of 9 to 16 bits stored.

    Returns:
        name -> Dataset: "source" (``ds`` itself), "12-bit stored" (values shifted down to
        12 bits, the window scaled with them), "16-bit stored" (shifted up to use the top bit),
        the other photometric interpretation (values inverted, so the image reads the same),
        "signed" (PixelRepresentation 1, values offset by -2**(BitsStored - 1) and a
        RescaleIntercept putting it back) and "VOI LUT" (a VOI LUT Sequence besides the window).
    """
    bits = int(ds.BitsStored)
    pixels = ds.pixel_array.astype(np.int64)
    if int(ds.PixelRepresentation) != 0 or not 9 <= bits <= 16:
        raise ValueError("variants takes unsigned pixels of 9 to 16 bits stored")
    other = "MONOCHROME2" if ds.PhotometricInterpretation == "MONOCHROME1" else "MONOCHROME1"
    top = (1 << bits) - 1
    offset = 1 << (bits - 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return {
        "source": ds,
        "12-bit stored": _with_pixels(ds, (pixels >> (bits - 12)).astype(np.uint16),
                                      BitsStored=12, HighBit=11,
                                      **_scaled_window(ds, 2.0 ** (12 - bits))),
        "16-bit stored": _with_pixels(ds, (pixels << (16 - bits)).astype(np.uint16),
                                      BitsStored=16, HighBit=15,
                                      **_scaled_window(ds, 2.0 ** (16 - bits))),
        other: _with_pixels(ds, (top - pixels).astype(np.uint16), PhotometricInterpretation=other,
                            **{k: f"{top - float(v):.10g}" if k == "WindowCenter" else v
                               for k, v in _scaled_window(ds, 1.0).items()}),
        "signed": _with_pixels(ds, (pixels - offset).astype(np.int16), PixelRepresentation=1,
                               RescaleIntercept=f"{intercept + offset:g}",
                               RescaleSlope=ds.get("RescaleSlope", "1"), RescaleType="US"),
        "VOI LUT": _with_pixels(ds, pixels.astype(np.uint16),
                                VOILUTSequence=[voi_lut_item(int(pixels.min()),
                                                             int(pixels.max()))]),
    }


# --- mutated frames -----------------------------------------------------------------------------

# Mutations of one frame: byte flips anywhere, a truncation, an insertion of random bytes, and
# an edit inside the header (the first 200 bytes: markers, sizes, coding parameters).
MUTATIONS = ("flip", "truncate", "insert", "header")


def mutated(frame: bytes, rng) -> bytes:
    """``frame`` with one random mutation of ``MUTATIONS`` (``rng``: a ``random.Random``)."""
    out = bytearray(frame)
    kind = MUTATIONS[rng.randrange(len(MUTATIONS))]
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] = rng.randrange(256)
    elif kind == "truncate":
        out = out[:rng.randrange(4, len(out))]
    elif kind == "insert":
        at = rng.randrange(len(out))
        out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:
        end = rng.randrange(2, min(200, len(out)))
        out[end] = rng.randrange(256)
        out[rng.randrange(2, end + 1)] ^= 0xFF
    return bytes(out)


def mutated_files(case: SyntaxCase, count: int, seed: int = 0, side: int = 96):
    """``count`` DICOM files of a ``side`` x ``side`` 15-bit ramp encoded as ``case``, each
    with its frame mutated (``mutated``): what a decoder must survive."""
    import io
    import random

    import pydicom
    from pydicom.encaps import encapsulate, get_frame

    from flannel.benchmarks.decode_inputs import dicom_dataset, ramp

    ds = pydicom.dcmread(io.BytesIO(encode(dicom_dataset(ramp(side, 32767)), case)))
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    rng = random.Random(seed)
    for _ in range(count):
        ds.PixelData = encapsulate([mutated(frame, rng)])
        yield dicom_file(ds)


# --- decode time per syntax ----------------------------------------------------------------------

def source_dataset(path=None):
    """The dataset every syntax is built from: ``path``, or pydicom-data's real CR chest
    radiograph (``flannel.samples.real_chest_dicom``).

    Raises:
        FileNotFoundError: no ``path`` and pydicom-data is not installed.
    """
    import pydicom

    from flannel.samples import real_chest_dicom

    path = path or real_chest_dicom()
    if path is None:
        raise FileNotFoundError("no source DICOM: install pydicom-data (the test extra) or give "
                                "a native monochrome file")
    return pydicom.dcmread(path)


def time_decoding(data: bytes, repeats: int, warmup: int) -> tuple[list[float], object]:
    """``flannel.decode.decode_gray`` on ``data``, ``warmup`` calls then ``repeats`` timed.

    Returns:
        Milliseconds of each timed call, and the last decoded float image.
    """
    from flannel.decode import decode_gray

    for _ in range(warmup):
        decode_gray(data)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        gray, _ = decode_gray(data)
        times.append((time.perf_counter() - start) * 1000)
    return times, gray.to_array()


def measure_syntax(case: SyntaxCase, data: bytes, reference: np.ndarray, native_bytes: int,
                   repeats: int, warmup: int) -> dict:
    """One row: the encoded file's size and ratio, the decode time's median and p90, the
    largest difference from ``reference`` (the native file's decoded image), or the refusal."""
    from flannel.decode import InputError

    row = {"syntax": case.name, "uid": str(case.syntax), "lossless": case.lossless,
           "file_kb": round(len(data) / 1024, 1), "ratio": round(native_bytes / len(data), 2),
           "status": 200, "error": "", "median_ms": None, "p90_ms": None, "max_error": None}
    try:
        times, image = time_decoding(data, repeats, max(1, warmup))
    except InputError as exc:
        return {**row, "status": exc.status, "error": f"{type(exc).__name__}: {exc}"[:200]}
    return {**row, "median_ms": round(float(np.median(times)), 2),
            "p90_ms": round(float(np.percentile(times, 90)), 2),
            "max_error": float(np.abs(image - reference).max())}


def bench_syntaxes(repeats: int = 20, warmup: int = 2, source=None) -> dict:
    """Decode time of the source radiograph in every syntax of ``SYNTAX_CASES``, each encoded
    once and decoded ``repeats`` times after ``warmup`` calls, one syntax after another.

    Args:
        source: a native monochrome DICOM path; default pydicom-data's RG1_UNCR.dcm.

    Returns:
        The machine, the image, the settings and one row per syntax (``measure_syntax``).
    """
    from flannel import hardware
    from flannel.cpus import usable_cores
    from flannel.decode import decode_gray

    ds = source_dataset(source)
    native = dicom_file(copy.deepcopy(ds), uid.ExplicitVRLittleEndian)
    reference = decode_gray(native)[0].to_array()
    rows = []
    for case in SYNTAX_CASES:
        row = measure_syntax(case, encode(ds, case), reference, len(native), repeats, warmup)
        log.info("%s: %s ms median, %s KB", case.name, row["median_ms"], row["file_kb"])
        rows.append(row)
    base = next(r["median_ms"] for r in rows if r["uid"] == uid.ExplicitVRLittleEndian)
    for row in rows:
        row["vs_native"] = round(row["median_ms"] / base, 2) if row["median_ms"] and base else None
    return {"machine": {"cpu": hardware.cpu_model(), "cores": usable_cores()},
            "image": f"{ds.Columns}x{ds.Rows}, {ds.BitsStored} bits stored, "
                     f"{ds.PhotometricInterpretation}",
            "repeats": repeats, "warmup": warmup, "rows": rows}


def format_syntaxes(result: dict) -> str:
    """Markdown: one row per syntax, times beside the native file's, with the machine."""
    machine = result["machine"]
    lines = [f"Decode time per transfer syntax (`flannel.decode.decode_gray`), {result['image']}; "
             f"median and p90 of {result['repeats']} calls after {result['warmup']}: "
             f"{machine['cpu']}, {machine['cores']} cores.", "",
             "| syntax | UID | lossless | file KB | ratio | median ms | p90 ms | vs native | "
             "max error |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if r["status"] != 200:
            lines.append(f"| {r['syntax']} | {r['uid']} | {'yes' if r['lossless'] else 'no'} | "
                         f"{r['file_kb']:g} | {r['ratio']:.2f} | refused {r['status']}: "
                         f"{r['error'][:80].replace('|', '/')} | | | |")
            continue
        lines.append(f"| {r['syntax']} | {r['uid']} | {'yes' if r['lossless'] else 'no'} | "
                     f"{r['file_kb']:g} | {r['ratio']:.2f} | {r['median_ms']:.1f} | "
                     f"{r['p90_ms']:.1f} | {r['vs_native']:.2f}x | {r['max_error']:.4f} |")
    return "\n".join(lines)
