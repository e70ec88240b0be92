"""The shared decoder: every format and failure mode the pipeline accepts or refuses."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from flannel.decode import (
    DecodeError,
    EmptyInput,
    ImageTooLarge,
    ImageTooSmall,
    InputError,
    UnsupportedImage,
    decode_image,
    read_image,
    sniff_format,
)
from flannel.samples import real_chest_dicom


def encode(im: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def dicom_bytes(pixels: np.ndarray | None, photometric: str = "MONOCHROME2", bits: int = 12,
                **elements) -> bytes:
    """A minimal CR DICOM file; ``pixels=None`` leaves PixelData out."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = (64, 64) if pixels is None else pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    for key, value in elements.items():
        setattr(ds, key, value)
    if pixels is not None:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def ramp(n: int = 64, top: int = 4095) -> np.ndarray:
    """(n, n) horizontal ramp 0..top."""
    return np.tile(np.linspace(0, top, n).round().astype(np.uint16), (n, 1))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR declaring width x height, with no pixel data at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")




def test_png_8bit_exact():
    arr = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) % 256
    out = decode_image(encode(Image.fromarray(arr.astype(np.uint8))))
    assert out.dtype == np.float32 and out.shape == (64, 64)
    np.testing.assert_array_equal(out, arr.astype(np.float32) / 255)


def test_png_16bit_keeps_precision():
    arr = np.full((64, 64), 1000, dtype=np.uint16)
    arr[0, 0], arr[0, 1] = 0, 65535
    data = encode(Image.fromarray(arr))
    assert data[24] == 16  # IHDR bit depth: really a 16-bit PNG
    out = decode_image(data)
    assert out[5, 5] == pytest.approx(1000 / 65535, abs=1e-7)
    assert (out[0, 0], out[0, 1]) == (0.0, 1.0)
    assert out[5, 5] != pytest.approx(round(1000 / 257) / 255, abs=1e-6)  # not squashed to 8 bits


def test_jpeg():
    out = decode_image(encode(Image.new("L", (64, 64), 128), "JPEG", quality=95))
    assert sniff_format(encode(Image.new("L", (64, 64)), "JPEG")) == "jpeg"
    assert np.abs(out - 128 / 255).max() <= 2 / 255


def test_rgb_to_luminance():
    out = decode_image(encode(Image.new("RGB", (64, 64), (255, 0, 0))))
    assert out[0, 0] == pytest.approx(76 / 255)  # ITU-R 601: 0.299 * 255


def test_rgba_transparent_is_black():
    im = Image.new("RGBA", (64, 64), (255, 255, 255, 255))
    im.paste((200, 200, 200, 0), (0, 0, 32, 64))
    out = decode_image(encode(im))
    assert out[0, 0] == 0.0 and out[0, 63] == 1.0


def test_palette():
    im = Image.new("P", (64, 64), 1)
    im.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    im.paste(0, (0, 0, 32, 64))
    out = decode_image(encode(im))
    assert out[0, 0] == 0.0 and out[0, 63] == 1.0


def test_dicom_monochrome2_and_monochrome1_inverted():
    mono2 = decode_image(dicom_bytes(ramp()))
    mono1 = decode_image(dicom_bytes(ramp(), photometric="MONOCHROME1"))
    assert sniff_format(dicom_bytes(ramp())) == "dicom"
    assert mono2[0, 0] == 0.0 and mono2[0, -1] == 1.0
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)


def test_dicom_rescale_and_voi_window():
    # Raw 0..1000, slope 2 and intercept -1000 -> -1000..1000; window centre 0 width 1001 shows
    # -500..500, i.e. raw 250..750. Without the rescale the window would cover raw -500..500.
    raw = np.tile(np.arange(0, 1001, dtype=np.uint16), (40, 1))
    data = dicom_bytes(raw, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0,
                       WindowWidth=1001)
    out = decode_image(data)[0]
    assert (out[:250] == 0).all() and (out[751:] == 1).all()
    assert out[500] == pytest.approx(0.5, abs=2e-3)
    assert (np.diff(out[250:751]) > 0).all()


def test_dicom_without_pixels_is_unsupported():
    with pytest.raises(UnsupportedImage, match="PixelData") as info:
        decode_image(dicom_bytes(None))
    assert info.value.status == 415


def test_truncated_png():
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)))
    with pytest.raises(DecodeError, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2])


def test_empty_text_and_tiny():
    with pytest.raises(EmptyInput):
        decode_image(b"")
    with pytest.raises(DecodeError):
        decode_image(b"hello, this is not an image")
    with pytest.raises(DecodeError, match="text"):
        decode_image(b'{"image": "base64..."}')
    with pytest.raises(ImageTooSmall):
        decode_image(encode(Image.new("L", (1, 1))))


@pytest.mark.parametrize("side", [100_000, 7_000])  # Pillow's own bomb check, then ours
def test_huge_declared_size_refused_before_decoding(side):
    # The file holds no pixel data at all: any decoding attempt would fail with DecodeError.
    with pytest.raises(ImageTooLarge) as info:
        decode_image(png_header_only(side, side))
    assert info.value.status == 413


def test_animated_png_is_unsupported():
    frames = [Image.new("L", (64, 64), v) for v in (0, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:], duration=100)
    with pytest.raises(UnsupportedImage, match="2 frames"):
        decode_image(buf.getvalue())


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP", "ICO", "TGA", "PCX", "SGI", "PPM",
                                 "JPEG2000"])
def test_pillow_formats_beyond_png_and_jpeg_are_refused(fmt):
    """Pillow reads all of these; none reaches its decoder here (attack surface), and the
    refusal says what is accepted, naming the format where its magic bytes tell it."""
    buf = io.BytesIO()
    Image.new("L" if fmt not in ("WEBP", "JPEG2000") else "RGB", (64, 64), 128).save(
        buf, format=fmt)
    named = {"GIF": "GIF", "BMP": "BMP", "TIFF": "TIFF", "WEBP": "WebP", "ICO": "ICO",
             "PPM": "PGM", "JPEG2000": "JPEG 2000"}
    with pytest.raises((UnsupportedImage, DecodeError),
                       match=f"{named.get(fmt, 'unknown format')}.*PNG, JPEG or DICOM"):
        decode_image(buf.getvalue())


def test_errors_are_input_errors_naming_the_path(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    with pytest.raises(InputError, match="bad.png"):
        read_image(bad)


def test_real_radiograph_rg1_uncr():
    path = real_chest_dicom()
    if path is None:
        pytest.skip("pydicom-data (RG1_UNCR.dcm) is not installed")
    import pydicom
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert (ds.Rows, ds.Columns, ds.PhotometricInterpretation) == (1955, 1841, "MONOCHROME1")
    out = read_image(path)
    assert out.shape == (1955, 1841) and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    # MONOCHROME1 is inverted: the collimated border (stored bright) must come out dark.
    assert out[:20, :20].mean() < out[900:1100, 800:1000].mean()
