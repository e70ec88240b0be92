"""nvJPEG decoding for GPU backends: which JPEGs go to the GPU, that every check of the CPU path
runs first and that its image comes back, and that CPU backends refuse the setting.

Where no GPU exists, torchvision's own CPU JPEG decoder (libjpeg-turbo, like Pillow's) stands in
for nvJPEG behind the same hook; the real nvJPEG runs in the ``gpu``-marked test."""
from __future__ import annotations

import io
from functools import partial

import numpy as np
import pytest
from PIL import Image

from flannel import hardware
from flannel.backends import BACKENDS
from flannel.codestream_size import jpeg_size
from flannel.decode import ImageTooLarge, decode_gray
from flannel.nvjpeg import (CPU, NVJPEG, JpegDecoderError, NvJpegLevels, auto_jpeg_decoder,
                            compare_decoders, gpu_decodable, jpeg_decoder_for, nvjpeg_gray,
                            radiograph_jpegs, verdict)

NO_GPU = hardware.cuda_problem()


def _jpeg(array: np.ndarray, **save) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG", **{"quality": 90, **save})
    return out.getvalue()


def _grey(side: int = 96, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.add.outer(np.arange(side), np.arange(side)) * 255 // (2 * side)
    return np.clip(ramp + rng.integers(-20, 20, (side, side)), 0, 255).astype(np.uint8)


def _stand_in() -> NvJpegLevels:
    """The hook with torchvision's CPU decoder in nvJPEG's place."""
    return NvJpegLevels(decode=partial(nvjpeg_gray, device="cpu"))


def test_only_8bit_sequential_greyscale_jpegs_that_end_whole_go_to_the_gpu():
    grey = _grey()
    baseline = _jpeg(grey)
    cases = {"baseline grey": (baseline, True),
             "progressive grey": (_jpeg(grey, progressive=True), False),
             "colour": (_jpeg(np.stack([grey] * 3, axis=-1)), False),
             "bytes after EOI": (baseline + b"\x00\x00", False)}
    for name, (data, expected) in cases.items():
        assert gpu_decodable(data, jpeg_size(data)) is expected, name


def test_the_gpu_levels_replace_pillows_and_the_image_is_the_same():
    hook = _stand_in()
    for name, data in radiograph_jpegs((64, 333)):  # 333: blocks cut at the edges
        cpu, gpu = decode_gray(data)[0], decode_gray(data, jpeg_levels=hook)[0]
        assert gpu.levels.dtype == np.uint8 and gpu.table is cpu.table, name
        np.testing.assert_array_equal(gpu.levels, cpu.levels)
    assert (hook.decoded, hook.fallbacks) == (2, 0)


def test_other_files_and_failures_keep_the_cpu_path():
    hook = _stand_in()
    grey = _grey()
    png = io.BytesIO()
    Image.fromarray(grey).save(png, format="PNG")
    for data in (png.getvalue(), _jpeg(grey, progressive=True)):
        np.testing.assert_array_equal(decode_gray(data, jpeg_levels=hook)[0].levels,
                                      decode_gray(data)[0].levels)
    assert hook.decoded == 0

    def failing(data: bytes) -> np.ndarray:
        raise RuntimeError("nvjpegDecode failed")

    for broken in (NvJpegLevels(decode=failing), NvJpegLevels(decode=lambda d: grey[:8])):
        data = _jpeg(grey)
        np.testing.assert_array_equal(decode_gray(data, jpeg_levels=broken)[0].levels,
                                      decode_gray(data)[0].levels)
        assert (broken.decoded, broken.fallbacks) == (0, 1)


def test_the_cpu_paths_checks_run_before_the_gpu_decode():
    calls = []
    data = _jpeg(_grey(200))
    with pytest.raises(ImageTooLarge, match="above the limit of 1000"):
        decode_gray(data, max_pixels=1000, jpeg_levels=lambda d, f: calls.append(d))
    assert calls == []


def test_compare_decoders_reports_each_file_and_a_verdict():
    result = compare_decoders(radiograph_jpegs((64, 128)), _stand_in(), repeats=2, warmup=1)
    assert [r["file"] for r in result["rows"]] == ["cxr64.jpg", "cxr128.jpg"]
    for row in result["rows"]:
        assert row["on_gpu"] and row["identical"] and row["max_abs_diff"] == 0
        assert row["cpu_ms"] > 0 and row["nvjpeg_ms"] > 0
    assert result["favours"] in (CPU, NVJPEG) and "ms against" in result["reason"]


def test_verdict_favours_nvjpeg_only_for_the_same_levels_in_less_time():
    same = {"file": "a.jpg", "on_gpu": True, "identical": True, "max_abs_diff": 0}
    assert verdict([{**same, "cpu_ms": 9.0, "nvjpeg_ms": 3.0}])["favours"] == NVJPEG
    slower = verdict([{**same, "cpu_ms": 3.0, "nvjpeg_ms": 9.0}])
    assert slower["favours"] == CPU and "not faster" in slower["reason"]
    differ = verdict([{**same, "identical": False, "max_abs_diff": 1, "pixels_differing": 7,
                       "cpu_ms": 9.0, "nvjpeg_ms": 3.0}])
    assert differ["favours"] == CPU and "differ from libjpeg-turbo's on 1 of 1" in differ["reason"]
    left = verdict([{**same, "on_gpu": False, "cpu_ms": 9.0, "nvjpeg_ms": 3.0}])
    assert left["favours"] == CPU and "did not decode a.jpg" in left["reason"]


def test_a_worker_refuses_nvjpeg_that_decodes_the_probe_otherwise():
    gpu_backend = BACKENDS["tensorrt-fp16"]
    decode = jpeg_decoder_for(NVJPEG, gpu_backend, levels=_stand_in())
    data = _jpeg(_grey())
    np.testing.assert_array_equal(decode(data)[0].levels, decode_gray(data)[0].levels)
    off_by_one = NvJpegLevels(decode=lambda d: nvjpeg_gray(d, device="cpu") ^ 1)
    with pytest.raises(JpegDecoderError, match="otherwise than libjpeg-turbo") as err:
        jpeg_decoder_for(NVJPEG, gpu_backend, levels=off_by_one)
    assert "\n" not in str(err.value)
    assert jpeg_decoder_for(None, gpu_backend) is decode_gray


def test_cpu_backends_refuse_nvjpeg_in_one_line(tmp_path, capsys):
    from flannel.cli import main
    from flannel.handlers.archive import ArchiveError, ArchiveSettings
    from flannel.handlers.serving import load_served_model

    for name in ("ort-fp32", "ort-int8", "torch-bf16", "torch-fp32"):
        with pytest.raises(JpegDecoderError, match=f"{name} runs on the CPU") as err:
            jpeg_decoder_for(NVJPEG, BACKENDS[name])
        assert "\n" not in str(err.value)
        with pytest.raises(ArchiveError, match="jpeg_decoder nvjpeg is for GPU backends"):
            ArchiveSettings(backend=name, jpeg_decoder=NVJPEG)
        assert auto_jpeg_decoder(BACKENDS[name]) == CPU  # nothing measured
        assert "jpeg_decoder" not in ArchiveSettings(backend=name).model_config()["handler"]
    # Before any artifact is read: the folder holds none.
    with pytest.raises(JpegDecoderError, match="ort-fp32 runs on the CPU"):
        load_served_model(tmp_path, {"backend": "ort-fp32", "jpeg_decoder": NVJPEG})
    with pytest.raises(JpegDecoderError, match="'gpu' is not one of"):
        jpeg_decoder_for("gpu", BACKENDS["tensorrt-fp16"])
    assert main(["archive", str(tmp_path), "--backend", "ort-fp32", "--jpeg-decoder",
                 NVJPEG]) == 2
    assert capsys.readouterr().out.strip().count("\n") == 0
    config = ArchiveSettings(backend="tensorrt-fp16", jpeg_decoder=NVJPEG).model_config()
    assert config["handler"]["jpeg_decoder"] == NVJPEG and config["deviceType"] == "gpu"


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU is not None, reason=f"nvJPEG: {NO_GPU}")
def test_nvjpeg_gives_the_cpu_decoders_image():
    hook = NvJpegLevels(0)
    jpegs = [*radiograph_jpegs((512, 2048)), ("odd.jpg", _jpeg(_grey(1001)[:777])),
             ("q75.jpg", _jpeg(_grey(640, seed=1), quality=75)),
             ("q100.jpg", _jpeg(_grey(640, seed=2), quality=100))]
    for name, data in jpegs:
        cpu, gpu = decode_gray(data)[0], decode_gray(data, jpeg_levels=hook)[0]
        diff = np.abs(cpu.levels.astype(int) - gpu.levels.astype(int))
        print(f"{name}: {np.count_nonzero(diff)} pixels differ, max |diff| {diff.max()}")
        np.testing.assert_array_equal(gpu.levels, cpu.levels, err_msg=name)
    assert (hook.decoded, hook.fallbacks) == (len(jpegs), 0)
