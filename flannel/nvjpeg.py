"""JPEG decoding on the GPU (nvJPEG, through torchvision) for the workers of GPU backends.

    python -c "from flannel import nvjpeg as n; print(n.compare_decoders(n.radiograph_jpegs(), n.NvJpegLevels())['reason'])"

``flannel.decode`` stays the one decoder. Every check and refusal it makes runs first; then the
pixels of an 8-bit baseline greyscale JPEG (one component, SOF0 or SOF1, ending with its EOI
marker) are decoded by nvJPEG instead of libjpeg-turbo (``NvJpegLevels``, the decoder's
``jpeg_levels`` hook) and come back to host memory as grey levels, where preprocessing continues
as for any file. Every other file, and any JPEG nvJPEG fails on, takes the CPU path.

Serving turns it on with model-config.yaml's ``handler.jpeg_decoder: nvjpeg`` (``flannel archive
--jpeg-decoder nvjpeg``, or ``auto``: nvJPEG only where ``compare_decoders`` finds it gives the
same levels and is faster on this host), for GPU backends only; a CPU backend with it is refused
in one line. A worker told to use it first decodes a probe JPEG both ways and refuses to load if
the levels differ. ``flannel gpu-check`` reports the same comparison.
"""
from __future__ import annotations

import logging
import tempfile
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from flannel.decode import decode_gray
from flannel.timing import median_seconds

if TYPE_CHECKING:
    from flannel.backends.base import BackendSpec
    from flannel.codestream_size import CodestreamSize

log = logging.getLogger(__name__)

CPU = "cpu"
NVJPEG = "nvjpeg"
# `flannel archive --jpeg-decoder auto`: resolved to one of JPEG_DECODERS when archiving.
AUTO = "auto"
JPEG_DECODERS = (CPU, NVJPEG)
# Frame header markers (T.81 Table B.1) whose JPEGs go to nvJPEG: baseline and extended
# sequential Huffman. Progressive, lossless and arithmetic-coded JPEGs keep the CPU path.
GPU_SOF_MARKERS = frozenset({0xC0, 0xC1})
_EOI = b"\xff\xd9"
# Sides of the JPEGs the decoders are compared on: the public datasets' median (512 px) and a
# detector's radiograph (2048 px), as in `flannel bench model`'s preprocessing rows.
COMPARE_SIDES = (512, 2048)
# Side of the JPEG a worker decodes both ways before it serves with nvJPEG: thousands of 8x8
# blocks of varied content, for a few milliseconds.
PROBE_SIDE = 256


class JpegDecoderError(ValueError):
    """A jpeg_decoder setting this backend or this GPU cannot serve with."""


def setting_problem(setting: str, backend: "BackendSpec") -> str | None:
    """Why ``handler.jpeg_decoder: setting`` cannot go with ``backend``, in one line (None: it
    can)."""
    if setting not in JPEG_DECODERS:
        return f"jpeg_decoder {setting!r} is not one of {list(JPEG_DECODERS)}"
    if setting == NVJPEG and backend.device != "gpu":
        return (f"jpeg_decoder nvjpeg is for GPU backends; {backend.name} runs on the CPU, where "
                f"libjpeg-turbo decodes JPEGs: use jpeg_decoder cpu")
    return None


def gpu_decodable(data: bytes, frame: "CodestreamSize") -> bool:
    """Whether nvJPEG takes this JPEG: 8-bit samples, one component (Pillow turns colour into
    grey with its own rounding, which nvJPEG does not share), a sequential Huffman frame, and the
    EOI marker as its last bytes (libjpeg-turbo refuses a stream cut short; nvJPEG might not)."""
    return (frame.kind == "JPEG" and frame.bits == 8 and frame.components == 1
            and frame.sof_marker in GPU_SOF_MARKERS and data.endswith(_EOI))


def nvjpeg_gray(data: bytes, device: str = "cuda:0") -> np.ndarray:
    """One greyscale JPEG decoded by ``torchvision.io.decode_jpeg`` on ``device`` (nvJPEG on a
    CUDA device): its (H, W) uint8 levels, in host memory."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return decode_jpeg(encoded, mode=ImageReadMode.GRAY, device=device)[0].cpu().numpy()


class NvJpegLevels:
    """The decoder's ``jpeg_levels`` hook on one GPU: the grey levels of the JPEGs nvJPEG takes
    (``gpu_decodable``); None for the others and for any it fails on, which Pillow decodes.

    Attributes:
        device: the CUDA device.
        decoded: JPEGs decoded on the GPU so far.
        fallbacks: JPEGs nvJPEG took and failed on, left to Pillow.
    """

    def __init__(self, device_id: int = 0,
                 decode: Callable[[bytes], np.ndarray] | None = None) -> None:
        self.device = f"cuda:{int(device_id)}"
        self._decode = decode or partial(nvjpeg_gray, device=self.device)
        self.decoded = self.fallbacks = 0

    def __call__(self, data: bytes, frame: "CodestreamSize") -> np.ndarray | None:
        if not gpu_decodable(data, frame):
            return None
        try:
            levels = self._decode(data)
        except Exception as exc:  # noqa: BLE001 - whatever nvJPEG fails on, Pillow decodes
            self.fallbacks += 1
            log.debug("nvJPEG failed (%s): Pillow decodes this JPEG", type(exc).__name__)
            return None
        if levels.shape != (frame.height, frame.width) or levels.dtype != np.uint8:
            self.fallbacks += 1
            return None
        self.decoded += 1
        return levels


def radiograph_jpegs(sides: Sequence[int] = COMPARE_SIDES, seed: int = 0
                     ) -> list[tuple[str, bytes]]:
    """Synthetic radiographs of each side as 8-bit greyscale JPEGs, as ``flannel data synth``
    writes them: (name, bytes)."""
    from flannel.data.synth import SynthConfig, render, write_image

    out = []
    with tempfile.TemporaryDirectory(prefix="flannel-jpeg-") as tmp:
        for side in sides:
            img, _ = render("Normal", SynthConfig(size=side), np.random.default_rng(seed))
            path = Path(tmp) / f"cxr{side}.jpg"
            write_image(path, img, "jpeg")
            out.append((path.name, path.read_bytes()))
    return out


def compare_levels(data: bytes, levels: NvJpegLevels) -> dict:
    """One JPEG decoded by the CPU path and through ``levels``: whether the GPU took it, and how
    far the two level images are apart."""
    before = levels.decoded
    cpu = decode_gray(data)[0].levels
    gpu = decode_gray(data, jpeg_levels=levels)[0].levels
    diff = np.abs(cpu.astype(np.int16) - gpu.astype(np.int16))
    return {"on_gpu": levels.decoded > before, "identical": bool(np.array_equal(cpu, gpu)),
            "pixels_differing": int(np.count_nonzero(diff)), "max_abs_diff": int(diff.max())}


def compare_decoders(jpegs: Sequence[tuple[str, bytes]], levels: NvJpegLevels,
                     repeats: int = 10, warmup: int = 2) -> dict:
    """CPU (Pillow's libjpeg-turbo) against ``levels`` (nvJPEG) on the same JPEGs: per file the
    median ms of the whole ``decode_gray`` call each way and whether the levels are the same;
    then which decoder the figures favour (``verdict``)."""
    rows = []
    for name, data in jpegs:
        row = {"file": name, "bytes": len(data), **compare_levels(data, levels)}
        row["cpu_ms"] = 1000 * median_seconds(lambda: decode_gray(data), warmup, repeats)
        row["nvjpeg_ms"] = 1000 * median_seconds(
            lambda: decode_gray(data, jpeg_levels=levels), warmup, repeats)
        rows.append(row)
    return {"device": levels.device, "repeats": repeats, "rows": rows, **verdict(rows)}


def verdict(rows: Sequence[dict]) -> dict:
    """Which decoder ``compare_decoders``' rows favour, and why in one line: nvJPEG only when it
    took every file, gave the same levels for each, and took less time in all."""
    cpu_ms, gpu_ms = sum(r["cpu_ms"] for r in rows), sum(r["nvjpeg_ms"] for r in rows)
    if not rows:
        return {"favours": CPU, "reason": "no JPEG was compared"}
    if not all(r["on_gpu"] for r in rows):
        left = [r["file"] for r in rows if not r["on_gpu"]]
        return {"favours": CPU, "reason": f"nvJPEG did not decode {', '.join(left)}"}
    differ = [r for r in rows if not r["identical"]]
    if differ:
        worst = max(r["max_abs_diff"] for r in differ)
        return {"favours": CPU, "reason": f"nvJPEG's levels differ from libjpeg-turbo's on "
                                          f"{len(differ)} of {len(rows)} JPEGs (up to {worst} "
                                          f"levels): not the image the CPU path gives"}
    if gpu_ms >= cpu_ms:
        return {"favours": CPU, "reason": f"same levels, but nvJPEG is not faster: {gpu_ms:.1f} "
                                          f"ms against {cpu_ms:.1f} ms for all {len(rows)} JPEGs"}
    return {"favours": NVJPEG, "reason": f"same levels, {cpu_ms / gpu_ms:.2f}x faster: "
                                         f"{gpu_ms:.1f} ms against {cpu_ms:.1f} ms for all "
                                         f"{len(rows)} JPEGs"}


def auto_jpeg_decoder(backend: "BackendSpec", device_id: int = 0) -> str:
    """``flannel archive --jpeg-decoder auto``: cpu for a CPU backend (nothing is measured);
    for a GPU backend, what ``compare_decoders`` favours on this host."""
    if backend.device != "gpu":
        return CPU
    result = compare_decoders(radiograph_jpegs(), NvJpegLevels(device_id))
    log.info("jpeg decoder auto: %s (%s)", result["favours"], result["reason"])
    return result["favours"]


def jpeg_decoder_for(setting: str | None, backend: "BackendSpec", device_id: int = 0,
                     levels: NvJpegLevels | None = None) -> Callable[..., tuple]:
    """The ``decode_gray`` a worker of ``backend`` decodes with under ``handler.jpeg_decoder``
    (unset: cpu).

    Args:
        levels: the nvJPEG hook to use (default: one on GPU ``device_id``).

    Raises:
        JpegDecoderError: in one line: an unknown setting, nvjpeg for a CPU backend, or nvJPEG
            giving other levels than libjpeg-turbo for the probe JPEG.
    """
    setting = setting or CPU
    problem = setting_problem(setting, backend)
    if problem:
        raise JpegDecoderError(f"backend {backend.name}: {problem}")
    if setting == CPU:
        return decode_gray
    levels = levels or NvJpegLevels(device_id)
    probe = compare_levels(radiograph_jpegs((PROBE_SIDE,))[0][1], levels)
    if not (probe["on_gpu"] and probe["identical"]):
        what = ("nvJPEG failed on the probe JPEG" if not probe["on_gpu"] else
                f"nvJPEG decodes the probe JPEG otherwise than libjpeg-turbo "
                f"({probe['pixels_differing']} pixels, up to {probe['max_abs_diff']} levels)")
        raise JpegDecoderError(f"backend {backend.name}: {what}: use jpeg_decoder cpu")
    return partial(decode_gray, jpeg_levels=levels)
