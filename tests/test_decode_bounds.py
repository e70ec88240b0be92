"""Bounded work and memory for every decoded input: hostile files, built here at test time, are
refused with a status and words naming the problem, after bounded work (``tracemalloc`` peaks,
the largest ``max_length`` zlib was asked for, a decoder that must not be called); admitted
ones of each accepted DICOM syntax decode to the image they hold.
"""
from __future__ import annotations

import io
import re
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from flannel import dicom_bounds
from flannel.benchmarks.decode_inputs import dicom_dataset as dataset
from flannel.benchmarks.decode_inputs import dicom_file as save
from flannel.benchmarks.decode_inputs import (MIB, deflated_with_private_element,
                                              encapsulated_file, idat_bomb,
                                              iccp_bomb, j2k_tile_bomb, jpeg_frame_bomb,
                                              jpeg_scan_bomb, meta_end,
                                              nested_sequences, pil_bytes, ramp, rle_bomb,
                                              rle_frame, with_j2k_size, with_jpeg_size,
                                              ztxt_bomb)
from flannel.codestream_size import CodestreamError, codestream_size, j2k_size, jpeg_size
from flannel.decode import DEFAULT_MAX_PIXELS, InputError, decode_gray, decode_image


def refused(data: bytes, status: int, words: str, **kw) -> InputError:
    with pytest.raises(InputError) as info:
        decode_gray(data, **kw)
    assert info.value.status == status, (info.value.status, str(info.value))
    assert re.search(words, str(info.value)), str(info.value)
    assert len(str(info.value)) < 600, "an error must not echo the input"
    return info.value


def traced_peak(fn) -> int:
    """Bytes ``fn`` allocated at its peak (Python allocations: bytes, numpy arrays)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


# --- transfer syntaxes ---------------------------------------------------------------------------

def test_each_accepted_uncompressed_syntax_decodes_the_same_image():
    from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian,
                             ImplicitVRLittleEndian, RLELossless)

    pixels = ramp(64)
    reference = decode_image(save(dataset(pixels), ExplicitVRLittleEndian))
    for syntax in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        np.testing.assert_array_equal(decode_image(save(dataset(pixels), syntax)), reference)
    ds = dataset(pixels)
    ds.compress(RLELossless)
    np.testing.assert_array_equal(decode_image(save(ds)), reference)


@pytest.mark.parametrize("syntax, name", [
    ("1.2.840.10008.1.2.2", "Explicit VR Big Endian"),
    ("1.2.840.10008.1.2.4.92", "JPEG 2000 Part 2 Multi-component"),
    ("1.2.840.10008.1.2.4.100", "MPEG2"),
    ("1.2.840.10008.1.2.4.204", "JPIP HTJ2K Referenced"),
    ("1.2.3.4.5", "transfer syntax '1.2.3.4.5' (an unknown UID) is not accepted"),
])
def test_syntaxes_outside_the_allowlist_are_refused_by_name_before_the_data_set(
        syntax, name, monkeypatch):
    import pydicom.filereader

    starts = []
    read_dataset = pydicom.filereader.read_dataset

    def recording(fp, *args, **kwargs):
        starts.append(fp.tell())
        return read_dataset(fp, *args, **kwargs)

    data = with_syntax(syntax)
    monkeypatch.setattr(pydicom.filereader, "read_dataset", recording)
    err = refused(data, 415, re.escape(name))
    assert starts == [132], "only the file meta information may be read"
    assert syntax in str(err)
    for accepted in ("Explicit VR LE (.1)", "RLE Lossless (.5)", "JPEG Baseline (.4.50)",
                     "JPEG Lossless (.4.57/.70)", "JPEG-LS (.4.80/.81)", "HTJ2K (.4.201/.202/.203)"):
        assert accepted in str(err)


def with_syntax(syntax: str) -> bytes:
    """A 64x64 DICOM declaring ``syntax``; its pixel data is a stand-in, encapsulated when the
    syntax is, since it is refused before the pixels are read."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID

    ds = dataset(ramp(64))
    ds.file_meta.TransferSyntaxUID = syntax
    if not UID(syntax).is_private and UID(syntax).is_encapsulated:
        ds.PixelData = encapsulate([bytes(64)])
        ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    little = not UID(syntax).is_private and UID(syntax).is_little_endian
    ds.save_as(buf, enforce_file_format=True, implicit_vr=False, little_endian=little)
    return buf.getvalue()


def test_missing_transfer_syntax_is_a_400():
    ds = dataset(ramp(64))
    data = save(ds)
    # Blank the UID's value in the file meta (same length, so the group length still fits).
    uid = b"1.2.840.10008.1.2.1\x00"
    assert data.count(uid) == 1
    refused(data.replace(uid, b" " * len(uid)), 400, "no TransferSyntaxUID")


# --- Deflate -------------------------------------------------------------------------------------

class _RecordingInflater:
    """zlib.decompressobj that records the largest ``max_length`` asked and the bytes given."""

    asked: list[int] = []
    given = 0
    _original = staticmethod(zlib.decompressobj)

    def __init__(self, *args):
        self._inner = self._original(*args)

    def decompress(self, data, max_length=0):
        _RecordingInflater.asked.append(max_length)
        out = self._inner.decompress(data, max_length)
        _RecordingInflater.given += len(out)
        return out

    def __getattr__(self, name):
        return getattr(self._inner, name)


@pytest.fixture
def recording_inflater(monkeypatch):
    _RecordingInflater.asked, _RecordingInflater.given = [], 0
    monkeypatch.setattr(dicom_bounds.zlib, "decompressobj", _RecordingInflater)
    return _RecordingInflater


@pytest.mark.parametrize("after_pixels", [False, True], ids=["before pixels", "after pixels"])
def test_a_deflate_bomb_is_refused_after_inflating_a_bounded_amount(after_pixels,
                                                                      recording_inflater):
    """A 200 KB Deflated DICOM holding a 200 MB private element: refused with 413 naming the
    inflation, and zlib never asked for (nor gave) more than the header allowance plus the
    declared 64x64 16-bit pixels."""
    data = deflated_with_private_element(200 * MIB, after_pixels=after_pixels)
    assert len(data) < 300_000
    bound = dicom_bounds.HEADER_BYTES + 64 * 64 * 2 + 1
    peak = traced_peak(lambda: refused(data, 413, "Deflated DICOM.*inflate"))
    assert 0 < max(recording_inflater.asked) <= bound
    assert recording_inflater.given <= bound
    assert peak < 3 * dicom_bounds.HEADER_BYTES, peak


def test_deflated_pixels_at_their_declared_size_inflate_whole(recording_inflater):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    pixels = ramp(256)
    out = decode_image(save(dataset(pixels), DeflatedExplicitVRLittleEndian))
    assert out.shape == (256, 256)
    assert recording_inflater.given > pixels.nbytes  # the pixels came through the bounded path


def test_deflated_header_declaring_too_many_pixels_is_refused_before_inflating_them(
        recording_inflater):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    data = save(dataset(ramp(64)), DeflatedExplicitVRLittleEndian)
    refused(data, 413, "above the limit of 1000", max_pixels=1000)
    assert recording_inflater.asked == [dicom_bounds.HEADER_BYTES]


def test_a_truncated_or_false_deflate_stream_is_a_400():
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    data = save(dataset(ramp(64)), DeflatedExplicitVRLittleEndian)
    refused(data[:len(data) // 2], 400, "truncated")
    refused(data[:meta_end(data)] + b"\xff" * 64, 400, "not a deflate stream")


# --- RLE -----------------------------------------------------------------------------------------

def test_an_rle_segment_expanding_past_its_plane_is_refused_without_decoding(monkeypatch):
    """64x64 declared, one segment of 1 M replicate runs (2 MiB, 128 MiB decoded): 413 naming
    the segment, and the segment is never handed to a decoder."""
    def no_decoding(*args, **kwargs):
        raise AssertionError("a segment longer than its plane allows must not be decoded")

    data = rle_bomb(128 * MIB)
    monkeypatch.setattr(Image, "frombytes", no_decoding)
    peak = traced_peak(lambda: refused(data, 413, r"RLE segment 1 is 2097152 bytes.*64x64"))
    assert peak < 16 * MIB, peak


def test_rle_runs_may_cross_rows_and_decode_exactly():
    """Literal and replicate runs that straddle row ends decode to the pixels they encode."""
    from pydicom.uid import RLELossless

    side = 40
    pixels = (np.arange(side * side) // 7 % 256).astype(np.uint8)
    segment = bytearray()
    for start in range(0, pixels.size, 7):  # runs of 7 equal bytes, across row ends
        segment += bytes([257 - 7, pixels[start]])
    data = encapsulated_file(rle_frame([bytes(segment)]), RLELossless, side, side)
    levels = decode_gray(data)[0]
    np.testing.assert_array_equal(levels.table[levels.levels], decode_image(
        save(dataset(pixels.reshape(side, side), bits=8))))


@pytest.mark.parametrize("case, words", [
    ("short", "RLE segment 1 decodes to fewer than 4096 bytes"),
    ("segments", "RLE header declares 2 segments; 1 samples of 8 bits need 1"),
    ("offsets", "offsets are not increasing"),
])
def test_broken_rle_headers_and_segments_are_400s(case, words):
    from pydicom.uid import RLELossless

    frame = {"short": rle_frame([b"\x81\x00" * 4]),
             "segments": rle_frame([b"\x81\x00" * 32, b"\x81\x00" * 32]),
             "offsets": rle_frame([b"\x81\x00" * 32])[:4] + struct.pack("<I", 10)
             + rle_frame([b"\x81\x00" * 32])[8:]}[case]
    refused(encapsulated_file(frame, RLELossless, 64, 64), 400, words)


def test_rle_colour_and_16_bit_match_the_native_file():
    from pydicom.uid import RLELossless

    rng = np.random.default_rng(0)
    for pixels, bits, photometric in ((ramp(64), 16, "MONOCHROME2"),
                                      (rng.integers(0, 256, (48, 40, 3), dtype=np.uint8), 8,
                                       "RGB")):
        native = decode_image(save(dataset(pixels, bits=bits, photometric=photometric)))
        ds = dataset(pixels, bits=bits, photometric=photometric)
        ds.compress(RLELossless)
        np.testing.assert_array_equal(decode_image(save(ds)), native)


# --- encapsulated JPEG and JPEG 2000 ---------------------------------------------------------------

@pytest.fixture
def no_pixel_decoding(monkeypatch):
    import pydicom.dataset

    def decoded(self):
        raise AssertionError("the frame must be refused before it is decoded")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(decoded))


def test_jpeg_frame_larger_than_its_header_is_refused_before_decoding(no_pixel_decoding):
    """Header 512x512, JPEG frame 12000x12000 (144 M pixels): 413 from the SOF marker."""
    from pydicom.uid import JPEGBaseline8Bit

    refused(jpeg_frame_bomb(12000), 413,
            "JPEG frame is 12000x12000 = 144000000 pixels, above the limit")
    # Within the limit but not what the header says: a 400 naming both.
    jpeg = with_jpeg_size(pil_bytes(Image.new("L", (512, 512), 90), "JPEG"), 600, 500)
    data = encapsulated_file(jpeg, JPEGBaseline8Bit, 512, 512)
    refused(data, 400, "JPEG frame is 600x500 but its header says 512x512")


def test_j2k_frame_larger_than_its_header_is_refused_before_decoding(no_pixel_decoding):
    from pydicom.uid import JPEG2000Lossless

    stream = pil_bytes(Image.new("L", (64, 64), 90), "JPEG2000", no_jp2=True)
    data = encapsulated_file(with_j2k_size(stream, 12000, 12000), JPEG2000Lossless, 64, 64)
    refused(data, 413, "JPEG 2000 frame is 12000x12000")
    data = encapsulated_file(with_j2k_size(stream, 128, 64), JPEG2000Lossless, 64, 64)
    refused(data, 400, "JPEG 2000 frame is 128x64 but its header says 64x64")


def test_a_frame_with_other_components_than_the_header_is_a_400(no_pixel_decoding):
    from pydicom.uid import JPEGBaseline8Bit

    jpeg = pil_bytes(Image.new("RGB", (64, 64), (90, 10, 10)), "JPEG")
    refused(encapsulated_file(jpeg, JPEGBaseline8Bit, 64, 64), 400,
            "3 components but its header says SamplesPerPixel 1")


def test_streams_asking_for_work_beyond_their_pixels_are_refused(no_pixel_decoding):
    """A progressive JPEG of 300 scans (each a pass over the whole coefficient buffer) and a
    JPEG 2000 codestream of 36 million 1x1 tiles: 415 naming the count, before decoding."""
    from pydicom.uid import JPEGExtended12Bit

    many = jpeg_scan_bomb(300)
    refused(many, 415, "JPEG stream has 30[0-9] scans, above the 256 accepted")
    refused(encapsulated_file(many, JPEGExtended12Bit, 64, 64), 415, "scans, above the 256")
    refused(j2k_tile_bomb(6000), 415, "36000000 tiles, above the 4096 accepted")


def test_matching_jpeg_and_j2k_frames_decode():
    from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit

    gray = Image.fromarray((ramp(64, 255, np.uint8)).astype(np.uint8))
    out = decode_image(encapsulated_file(pil_bytes(gray, "JPEG", quality=95), JPEGBaseline8Bit, 64, 64))
    assert np.abs(out * 255 - np.asarray(gray)).max() < 6  # lossy, range-scaled
    stream = pil_bytes(Image.fromarray(ramp(64)), "JPEG2000", irreversible=False, no_jp2=True)
    out = decode_image(encapsulated_file(stream, JPEG2000Lossless, 64, 64, bits=16))
    np.testing.assert_array_equal(out, decode_image(save(dataset(ramp(64)))))


def test_codestream_sizes_from_their_markers():
    im = Image.new("L", (70, 50))
    assert jpeg_size(pil_bytes(im, "JPEG")).__dict__ == dict(
        kind="JPEG", width=70, height=50, components=1, bits=8, scans=1, tiles=1,
        sof_marker=0xC0)
    progressive = jpeg_size(pil_bytes(im.convert("RGB"), "JPEG", progressive=True))
    assert (progressive.components, progressive.sof_marker) == (3, 0xC2)
    # JPEG-LS (SOF55, T.87): SOI, an APP0 to skip, then the frame header.
    jpegls = (b"\xff\xd8" + b"\xff\xe0\x00\x04ab" + b"\xff\xf7\x00\x0b\x10\x00\x32\x00\x46\x01"
              + b"\x01\x11\x00")
    assert codestream_size(jpegls).__dict__ == dict(kind="JPEG-LS", width=70, height=50,
                                                    components=1, bits=16, scans=0, tiles=1,
                                                    sof_marker=0xF7)
    j2k = pil_bytes(Image.fromarray(np.zeros((50, 70), np.uint16)), "JPEG2000", no_jp2=True)
    jp2 = pil_bytes(im, "JPEG2000")
    assert j2k_size(j2k).__dict__ == dict(kind="JPEG 2000", width=70, height=50, components=1,
                                          bits=16, scans=1, tiles=1, sof_marker=0)
    assert jp2.startswith(b"\x00\x00\x00\x0cjP  ") and codestream_size(jp2).width == 70
    for broken in (b"\xff\xd8\xff\xda\x00\x02", b"\xff\xd8", b"\xff\x4f\xff\x51\x00",
                   b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 8):
        with pytest.raises(CodestreamError):
            codestream_size(broken)


# --- the pixel module ------------------------------------------------------------------------------

def test_pixel_modules_no_radiograph_has_are_refused_by_name():
    pixels = ramp(64)
    ds = dataset(pixels)
    ds.NumberOfFrames = 1_000_000_000
    refused(save(ds), 415, "multi-frame DICOM with 1000000000 frames")
    ds = dataset(np.zeros((64, 64), np.uint32), bits=32)
    refused(save(ds), 415, "BitsAllocated 32")
    ds = dataset(pixels, PhotometricInterpretation="PALETTE COLOR")
    refused(save(ds), 415, "PALETTE COLOR")
    ds = dataset(None)
    ds.FloatPixelData = np.zeros((64, 64), np.float32).tobytes()
    refused(save(ds), 415, "Float Pixel Data")
    ds = dataset(pixels, SamplesPerPixel=4)
    refused(save(ds), 415, "SamplesPerPixel 4")
    ds = dataset(pixels, BitsStored=20)
    refused(save(ds), 400, "BitsStored 20 does not fit BitsAllocated 16")


def test_a_colour_frame_above_its_byte_budget_is_refused_before_decoding(no_pixel_decoding):
    """A 16-bit RGB DICOM decodes to 6 bytes a pixel: above DECODED_BYTES_PER_PIXEL per pixel
    of the limit it is refused, even with its pixel count under the limit."""
    ds = dataset(np.zeros((64, 64, 3), np.uint16), photometric="RGB")
    refused(save(ds), 413, "decode to 24576 bytes, above the limit of 18000", max_pixels=6000)


def test_planar_colour_decodes_to_its_luminance():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    planar = dataset(rgb, bits=8, photometric="RGB", PlanarConfiguration=1)
    planar.PixelData = np.moveaxis(rgb, -1, 0).tobytes()
    interleaved = decode_image(save(dataset(rgb, bits=8, photometric="RGB")))
    np.testing.assert_array_equal(decode_image(save(planar)), interleaved)
    luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(interleaved, (luma - luma.min()) / (luma.max() - luma.min()),
                               atol=1e-6)


def test_a_voi_lut_of_65536_entries_is_answered_within_a_bound():
    """A VOI LUT Sequence item of 2**16 entries (descriptor 0 = 65536): applied to the stored
    levels, not to every pixel, so the work is bounded by the table, not by its product with
    the image."""
    from pydicom.dataset import Dataset

    pixels = ramp(512)
    item = Dataset()
    item.LUTDescriptor = [0, 0, 16]
    item.LUTData = (65535 - np.arange(65536, dtype="<u2")).tobytes()
    ds = dataset(pixels)
    ds.VOILUTSequence = [item]
    data = save(ds)
    peak = traced_peak(lambda: decode_gray(data))
    out = decode_image(data)
    assert out[0, 0] == 1.0 and out[-1, -1] == 0.0  # the LUT inverts the ramp
    assert peak < 12 * pixels.nbytes, peak


def test_a_rescale_slope_that_overflows_is_a_400():
    ds = dataset(ramp(64), RescaleSlope="1e308", RescaleIntercept="1e308")
    refused(save(ds), 400, "not finite")


def test_sequences_nested_past_the_recursion_limit_are_a_400():
    """5000 undefined-length sequences, each in the item of the one before (180 KB)."""
    refused(nested_sequences(5000), 400, "nested too deep")


# --- Pillow ------------------------------------------------------------------------------------------

def test_pillows_own_bomb_check_follows_the_pixel_limit():
    decode_gray(pil_bytes(Image.new("L", (64, 64)), "PNG"), max_pixels=10_000)
    assert 2 * Image.MAX_IMAGE_PIXELS in (10_000, 10_001)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(pil_bytes(Image.new("L", (101, 100)), "PNG")))
    decode_gray(pil_bytes(Image.new("L", (64, 64)), "PNG"))
    assert 2 * Image.MAX_IMAGE_PIXELS - DEFAULT_MAX_PIXELS in (0, 1)


def test_png_text_and_profile_bombs_are_refused_within_a_megabyte_each():
    bomb = ztxt_bomb(3)
    assert len(bomb) < 20_000
    peak = traced_peak(lambda: refused(bomb, 400, "text chunks"))
    assert peak < 4 * MIB, peak
    icc = iccp_bomb(64 * MIB)
    peak = traced_peak(lambda: refused(icc, 400, "too large"))
    assert peak < 4 * MIB, peak


def test_truncated_images_stay_refused_whatever_pillow_was_told(monkeypatch):
    from PIL import ImageFile

    png = pil_bytes(Image.fromarray(ramp(128, 255).astype(np.uint8)), "PNG")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    refused(png[:len(png) // 2], 400, "truncated|corrupt")


def test_an_idat_that_inflates_past_the_image_decodes_only_the_image():
    """A 64x64 PNG whose IDAT holds 256 MiB of zeros (a few hundred KB): Pillow fills the
    declared image and stops; the answer is the image."""
    from flannel.benchmarks.memory import RssSampler

    png = idat_bomb(256 * MIB)
    assert len(png) < MIB
    with RssSampler() as rss:
        out = decode_image(png)
    assert out.shape == (64, 64) and not out.any()
    assert rss.peak() - rss.first() < 64, rss.peak() - rss.first()


def test_transparent_images_composite_in_strips_like_the_whole(monkeypatch):
    from flannel import decode

    rng = np.random.default_rng(2)
    im = Image.fromarray(rng.integers(0, 256, (300, 64, 4), dtype=np.uint8), "RGBA")
    whole = np.asarray(Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)),
                                             im).convert("L"), np.float32) / 255
    monkeypatch.setattr(decode, "STRIP_PIXELS", 64 * 7)  # strips of 7 rows
    np.testing.assert_array_equal(decode_image(pil_bytes(im, "PNG")), whole)


# --- the benchmark's inputs, through the handler's preparation -------------------------------------

def test_every_hostile_input_gets_its_status_through_the_handlers_preparation():
    from flannel.benchmarks.decode_inputs import hostile_inputs
    from flannel.benchmarks.decode_memory import decoding_model, prepare_item
    from flannel.handlers.serving import Answer

    model = decoding_model(DEFAULT_MAX_PIXELS, 1)
    for item in hostile_inputs():
        answer = prepare_item(model, item.build())
        status = answer.status if isinstance(answer, Answer) else 200
        assert status == item.status, (item.name, status, getattr(answer, "body", None))


def test_the_decode_benchmark_reports_each_input_it_measures():
    from flannel.benchmarks.decode_memory import format_decode, measure_input

    row = measure_input("admitted", 0, 128 * 128, 2, 1)
    assert row["input"] == "PNG 8-bit grey" and row["statuses"] == [200, 200]
    assert row["rss_peak_mb"] >= row["rss_before_mb"] > 0
    table = format_decode({"machine": {"cpu": "test cpu", "cores": 1}, "max_pixels": 128 * 128,
                           "batch": 2, "prepare_threads": 1, "rows": [row]})
    assert "| PNG 8-bit grey |" in table and "test cpu" in table and "200x2" in table



def test_jpeg_extended_frames_decode_at_12_and_8_bits_and_in_colour():
    """JPEG Extended (.51) is decoded by libjpeg-turbo within the header's bounds: 12-bit
    samples exactly as libjpeg-turbo decodes them, 8-bit ones too, colour as RGB luminance."""
    import imagecodecs
    from pydicom.uid import JPEGExtended12Bit

    rng = np.random.default_rng(3)
    twelve = (ramp(64, 4079).astype(np.int64) + rng.integers(0, 16, (64, 64))).astype(np.uint16)
    stream = imagecodecs.jpeg8_encode(twelve, level=95, bitspersample=12)
    want = imagecodecs.jpeg8_decode(stream)
    data = encapsulated_file(stream, JPEGExtended12Bit, 64, 64, bits=16)
    levels, _ = decode_gray(data)
    assert levels.levels.dtype == np.uint16
    assert np.array_equal(levels.levels.astype(np.int64) + int(want.min()), want)
    eight = imagecodecs.jpeg8_encode(ramp(64, 255, np.uint8), level=95)
    assert decode_image(encapsulated_file(eight, JPEGExtended12Bit, 64, 64)).shape == (64, 64)
    colour = imagecodecs.jpeg8_encode(np.repeat(ramp(64, 255, np.uint8)[..., None], 3, axis=2),
                                      level=95)
    grey = decode_image(encapsulated_file(colour, JPEGExtended12Bit, 64, 64, samples=3))
    assert grey.shape == (64, 64) and np.corrcoef(grey.ravel(), ramp(64).ravel())[0, 1] > 0.99


def test_jpeg_extended_frames_that_break_the_header_are_refused_before_decoding():
    import imagecodecs
    from pydicom.uid import JPEGExtended12Bit

    twelve = imagecodecs.jpeg8_encode(ramp(64), bitspersample=12)
    refused(encapsulated_file(twelve, JPEGExtended12Bit, 64, 64, bits=8), 400,
            "12-bit samples but its header allocates 8 bits")
    refused(encapsulated_file(twelve, JPEGExtended12Bit, 128, 64, bits=16), 400,
            "frame is 64x64 but its header says 64x128")
    refused(encapsulated_file(twelve[:len(twelve) // 3], JPEGExtended12Bit, 64, 64, bits=16),
            400, "JPEG frame is truncated")
    j2k = imagecodecs.jpeg2k_encode(ramp(64), codecformat="J2K")
    refused(encapsulated_file(j2k, JPEGExtended12Bit, 64, 64, bits=16), 400,
            "JPEG 2000 codestream, but its transfer syntax JPEG Extended")
