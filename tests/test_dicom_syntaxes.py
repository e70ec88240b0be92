"""Every accepted DICOM transfer syntax, built at test time from a real chest radiograph
(pydicom-data's RG1_UNCR.dcm, ``flannel.benchmarks.dicom_syntaxes``): lossless ones decode to
exactly the native file's image and model input, lossy ones within the bounds below, other
syntaxes are refused by name, and each new codestream kind keeps the decoder's size checks.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from flannel.benchmarks.decode_inputs import dicom_file, encapsulated_file, ramp
from flannel.benchmarks.decode_inputs import with_j2k_size, with_jpeg_size
from flannel.benchmarks.dicom_syntaxes import SYNTAX_CASES, encode, source_dataset, variants
from flannel.decode import decode_gray
from flannel.preprocess import PreprocessSpec, to_tensor
from flannel.samples import real_chest_dicom
from test_decode_bounds import no_pixel_decoding, refused, with_syntax  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(real_chest_dicom() is None,
                                reason="pydicom-data (RG1_UNCR.dcm) is not installed")


@dataclass(frozen=True)
class Tolerance:
    """Largest and mean absolute difference from the native file's decoded image (in [0, 1]),
    and largest difference of the model input (``to_tensor``, ImageNet-normalised)."""

    image_max: float
    image_mean: float
    tensor_max: float


# Measured on RG1_UNCR.dcm (1841x1955, 15 bits stored) with the encoder settings of
# benchmarks/dicom_syntaxes.py, then given about 1.5x margin (image max, image mean, tensor max):
LOSSY_TOLERANCE = {
    # 15 -> 8 bits (half a step is 0.002 of the range) plus libjpeg-turbo quality 90: measured
    # 0.058 / 0.0036 / 0.014; the largest errors sit on the collimator's edges.
    "JPEG Baseline 8-bit": Tolerance(0.08, 0.006, 0.025),
    # 15 -> 12 bits plus quality 90: measured 0.0049 / 0.00073 / 0.00078, the frame decoded by
    # libjpeg-turbo (imagecodecs), since no installed pydicom plugin decodes 12-bit JPEG.
    "JPEG Extended 12-bit": Tolerance(0.008, 0.0012, 0.0015),
    # NEAR 3 stored values of a 25606-value range: 0.00012, plus the shifted range; measured
    # 0.00020 / 0.000081 / 0.00031.
    "JPEG-LS Near-Lossless": Tolerance(0.0004, 0.00015, 0.0006),
    # OpenJPEG at 10:1: measured 0.0171 / 0.0026 / 0.0066.
    "JPEG 2000": Tolerance(0.03, 0.004, 0.012),
    # OpenJPH, quantisation step 0.002 (about 9:1): measured 0.0137 / 0.0022 / 0.0043.
    "HTJ2K": Tolerance(0.025, 0.0035, 0.008),
}
SPEC = PreprocessSpec()


def case_params(cases):
    return [pytest.param(c, id=c.name) for c in cases]


LOSSLESS = [c for c in SYNTAX_CASES if c.lossless]
LOSSY = [c for c in SYNTAX_CASES if not c.lossless]


@pytest.fixture(scope="module")
def source():
    return source_dataset()


@pytest.fixture(scope="module")
def reference(source):
    """The native file's decoded image and model input."""
    gray = decode_gray(dicom_file(source))[0]
    return gray.to_array(), to_tensor(gray, SPEC)


@pytest.fixture(scope="module")
def encoded(source):
    """The source in every syntax, encoded once for the module."""
    return {case.name: encode(source, case) for case in SYNTAX_CASES}


def decoded(data: bytes) -> tuple[np.ndarray, torch.Tensor]:
    gray = decode_gray(data)[0]
    return gray.to_array(), to_tensor(gray, SPEC)


def test_every_accepted_syntax_has_a_case():
    from flannel.dicom_bounds import ACCEPTED_SYNTAXES

    assert sorted(c.syntax for c in SYNTAX_CASES) == sorted(ACCEPTED_SYNTAXES)
    assert set(LOSSY_TOLERANCE) == {c.name for c in LOSSY}


@pytest.mark.parametrize("case", SYNTAX_CASES, ids=lambda c: c.name)
def test_each_file_declares_its_syntax_and_pixel_module(case, encoded):
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(encoded[case.name]))
    assert ds.file_meta.TransferSyntaxUID == case.syntax
    assert ds["PixelData"].is_undefined_length == case.syntax.is_encapsulated
    assert (ds.get("LossyImageCompression") == "01") == (not case.lossless)
    assert (ds.Rows, ds.Columns, ds.SamplesPerPixel) == (1955, 1841, 1)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and "PlanarConfiguration" not in ds
    bits = {"JPEG Baseline 8-bit": (8, 8), "JPEG Extended 12-bit": (16, 12)}.get(case.name,
                                                                                 (16, 15))
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (*bits, bits[1] - 1)
    if case.name == "JPEG Baseline 8-bit":  # requantized: the header maps 0..255 back
        assert float(ds.RescaleSlope) == pytest.approx((26479 - 874) / 255)
        assert float(ds.RescaleIntercept) == 874


def test_the_codestreams_are_the_ones_their_syntaxes_name(encoded):
    """.70 is process 14 with predictor 1 (SOS Ss = 1); .57 here uses predictor 6; .202 is
    RPCL (COD progression order 2) with a TLM marker; .203 is irreversible (9/7 wavelet)."""
    import pydicom
    from pydicom.encaps import generate_frames

    def frame(name: str) -> bytes:
        ds = pydicom.dcmread(io.BytesIO(encoded[name]))
        return next(generate_frames(ds.PixelData, number_of_frames=1))

    def predictor(stream: bytes) -> int:
        assert b"\xff\xc3" in stream  # SOF3, lossless
        sos = stream.index(b"\xff\xda")
        return stream[sos + 4 + 1 + 2]  # Ls, Ns, one component (Cs, Td/Ta), then Ss

    assert predictor(frame("JPEG Lossless SV1")) == 1
    assert predictor(frame("JPEG Lossless")) == 6
    rpcl = frame("HTJ2K Lossless RPCL")
    cod = rpcl.index(b"\xff\x52")
    assert rpcl[cod + 5] == 2 and rpcl.index(b"\xff\x55") < rpcl.index(b"\xff\x90")
    lossy = frame("HTJ2K")
    assert lossy[lossy.index(b"\xff\x52") + 13] == 0 and rpcl[cod + 13] == 1


@pytest.mark.parametrize("case", case_params(LOSSLESS), ids=lambda c: c.name)
def test_lossless_syntaxes_decode_to_the_native_image_exactly(case, encoded, reference):
    image, tensor = decoded(encoded[case.name])
    assert np.array_equal(image, reference[0]), np.abs(image - reference[0]).max()
    assert torch.equal(tensor, reference[1])


@pytest.mark.parametrize("case", case_params(LOSSY), ids=lambda c: c.name)
def test_lossy_syntaxes_decode_within_their_tolerance(case, encoded, reference):
    bound = LOSSY_TOLERANCE[case.name]
    image, tensor = decoded(encoded[case.name])
    error = np.abs(image - reference[0])
    tensor_error = float((tensor - reference[1]).abs().max())
    print(f"{case.name}: image max {error.max():.5f} mean {error.mean():.6f}, "
          f"tensor max {tensor_error:.5f}")
    assert 0 < error.max() <= bound.image_max
    assert error.mean() <= bound.image_mean
    assert tensor_error <= bound.tensor_max


@pytest.fixture(scope="module")
def variant_datasets(source):
    return variants(source)


def test_variants_are_radiographs_that_read_as_the_source(variant_datasets, reference):
    """Each variant decodes; those that only re-express the same values (the other
    photometric interpretation with inverted values, signed with an intercept) give the
    source's image, the bit depths nearly it, and the VOI LUT a different presentation."""
    images = {name: decode_gray(dicom_file(ds))[0].to_array()
              for name, ds in variant_datasets.items()}
    assert list(images) == ["source", "12-bit stored", "16-bit stored", "MONOCHROME2",
                            "signed", "VOI LUT"]
    np.testing.assert_array_equal(images["signed"], reference[0])
    np.testing.assert_allclose(images["MONOCHROME2"], reference[0], atol=1e-6)
    np.testing.assert_allclose(images["16-bit stored"], reference[0], atol=1e-6)
    assert np.abs(images["12-bit stored"] - reference[0]).max() < 2 / 25605 * 8
    voi = variant_datasets["VOI LUT"]
    item = voi.VOILUTSequence[0]
    looked_up = np.frombuffer(item.LUTData, "<u2")[voi.pixel_array - item.LUTDescriptor[1]]
    sigmoid = (looked_up - looked_up.min()) / float(looked_up.max() - looked_up.min())
    np.testing.assert_allclose(images["VOI LUT"], 1 - sigmoid, atol=1e-6)  # the LUT, not the window
    signed = variant_datasets["signed"]
    assert (signed.PixelRepresentation, signed.pixel_array.min()) == (1, 874 - 16384)


@pytest.mark.slow
@pytest.mark.parametrize("case", case_params(LOSSLESS), ids=lambda c: c.name)
def test_lossless_syntaxes_keep_every_variant_exactly(case, variant_datasets):
    """12- and 16-bit stored, MONOCHROME2, signed and a VOI LUT: exact wherever the encoder
    takes the pixels (the JPEG encoders write unsigned samples only)."""
    checked = []
    for name, ds in variant_datasets.items():
        if name == "source" or case.unsupported(ds):
            continue
        native = decode_gray(dicom_file(ds))[0].to_array()
        image = decode_gray(encode(ds, case))[0].to_array()
        assert np.array_equal(image, native), (name, np.abs(image - native).max())
        checked.append(name)
    assert len(checked) >= 4, checked


# --- refusals and bounds ---------------------------------------------------------------------------

@pytest.mark.parametrize("syntax, name", [
    ("1.2.840.10008.1.2.2", "Explicit VR Big Endian"),
    ("1.2.840.10008.1.2.4.92", "JPEG 2000 Part 2 Multi-component Image Compression"),
    ("1.2.840.10008.1.2.4.100", "MPEG2 Main Profile / Main Level"),
    ("1.2.826.0.1.3680043.9.9999.1", "'1.2.826.0.1.3680043.9.9999.1' (an unknown UID) is not"),
])
def test_other_syntaxes_are_refused_naming_them_and_the_accepted_ones(syntax, name):
    error = str(refused(with_syntax(syntax), 415, re.escape(name)))
    assert syntax in error
    for case in SYNTAX_CASES:  # each accepted UID, written as "(1.2...", "(.4.57/.70)"...
        last = case.syntax.rsplit(".", 1)[1]
        assert re.search(rf"[./]{last}[/)]", error), (case.name, error)
    for family in ("RLE Lossless", "JPEG Lossless", "JPEG-LS", "JPEG 2000", "HTJ2K"):
        assert family in error


def _ljpeg(pixels: np.ndarray) -> bytes:
    import imagecodecs

    return imagecodecs.ljpeg_encode(pixels, bitspersample=12)


def _jpegls(pixels: np.ndarray) -> bytes:
    import imagecodecs

    return imagecodecs.jpegls_encode(pixels)


def _htj2k(pixels: np.ndarray) -> bytes:
    import imagecodecs

    return imagecodecs.htj2k_encode(pixels, reversible=True)


@pytest.mark.parametrize("syntax_name, encoder, resize, kind", [
    ("JPEGLossless", _ljpeg, with_jpeg_size, "JPEG"),
    ("JPEGLSLossless", _jpegls, with_jpeg_size, "JPEG-LS"),
    ("HTJ2KLossless", _htj2k, with_j2k_size, "JPEG 2000"),
], ids=["JPEG Lossless", "JPEG-LS", "HTJ2K"])
def test_a_frame_declaring_another_size_than_its_header_is_refused_before_decoding(
        syntax_name, encoder, resize, kind, no_pixel_decoding):
    from pydicom import uid

    stream = encoder(ramp(64))
    syntax = getattr(uid, syntax_name)
    data = encapsulated_file(resize(stream, 128, 64), syntax, 64, 64, bits=16)
    refused(data, 400, f"{kind} frame is 128x64 but its header says 64x64")
    data = encapsulated_file(resize(stream, 12000, 12000), syntax, 64, 64, bits=16)
    refused(data, 413, f"{kind} frame is 12000x12000 = 144000000 pixels, above the limit")


# --- the benchmark -------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_syntax_benchmark_times_every_syntax(tmp_path):
    from flannel.benchmarks.dicom_syntaxes import bench_syntaxes, format_syntaxes
    from flannel.benchmarks.output import write_outputs

    result = bench_syntaxes(repeats=1, warmup=1)
    rows = {r["syntax"]: r for r in result["rows"]}
    assert list(rows) == [c.name for c in SYNTAX_CASES]
    for name, row in rows.items():
        assert row["status"] == 200 and 0 < row["median_ms"] <= row["p90_ms"]
        assert (row["max_error"] == 0) == row["lossless"], row
    assert rows["Explicit VR LE"]["vs_native"] == 1.0
    assert rows["JPEG 2000"]["ratio"] > 5 > rows["JPEG 2000 Lossless"]["ratio"] > 1
    table = format_syntaxes(result)
    assert result["machine"]["cpu"] in table and "| HTJ2K Lossless RPCL |" in table
    files = write_outputs(result, table, tmp_path, "syntaxes")
    assert {f.name for f in files} == {"syntaxes.json", "syntaxes.md", "syntaxes.csv"}


# Mutated frames per compressed syntax in the test; `flannel`'s decoders were run on 3,000 each.
MUTATED_PER_SYNTAX = 150
# A 96 x 96 frame decodes in milliseconds; a decoder stuck on a hostile one would take seconds.
MUTATED_DECODE_S = 1.0
_DECODE_MUTATED = """
import sys, time
from flannel.benchmarks.dicom_syntaxes import case_named, mutated_files
from flannel.decode import InputError, decode_gray
slowest, outcomes = 0.0, {}
for data in mutated_files(case_named(sys.argv[1]), int(sys.argv[2]), seed=int(sys.argv[3])):
    start = time.perf_counter()
    try:
        decode_gray(data)
        outcome = "200"
    except InputError as exc:
        outcome = str(exc.status)
    slowest = max(slowest, time.perf_counter() - start)
    outcomes[outcome] = outcomes.get(outcome, 0) + 1
print(outcomes, slowest)
"""


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in SYNTAX_CASES if c.syntax.is_encapsulated],
                         ids=lambda c: c.name)
def test_mutated_frames_never_crash_or_stall_the_decoder(case):
    """The decoders run in the worker's process: a corrupt frame must end as an answer or a
    4xx, never as a crash (a child process runs them, so a crash fails this test instead of
    ending pytest), an exception of another kind, or seconds of work."""
    import ast
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _DECODE_MUTATED, case.name,
                           str(MUTATED_PER_SYNTAX), "7"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"{case.name}: exit {done.returncode}\n{done.stderr[-2000:]}"
    outcomes, slowest = done.stdout.strip().rsplit("}", 1)
    outcomes = ast.literal_eval(outcomes + "}")
    assert sum(outcomes.values()) == MUTATED_PER_SYNTAX
    assert set(outcomes) <= {"200", "400", "413", "415"}, outcomes
    assert int(outcomes.get("400", 0)) > 0, "mutations that no decoder notices test nothing"
    assert float(slowest) < MUTATED_DECODE_S, f"{case.name}: {float(slowest):.2f} s"
