"""What an exported model pins about the code that serves it: version, commit, and the tensor
computed for a fixed reference image.

    python -c "from flannel.pins import code_pins; print(code_pins())"

The handler imports the installed ``flannel`` package for decoding and preprocessing. If that code
changed since export (another release, a local edit), the graph would be fed tensors it was never
checked against. Export stores the input tensor of ``reference_png()`` (a deterministic synthetic
radiograph, PNG bytes built here, no file) and its sha256; the handler recomputes it at load and
refuses to serve when it differs beyond float rounding, naming both digests.
"""
from __future__ import annotations

import hashlib
import io
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import flannel
from flannel.preprocess import PreprocessSpec, load_tensor

# Largest element difference still taken for float rounding between CPUs (vectorised resize
# kernels may sum in another order); a changed preprocessing step moves values by far more.
REFERENCE_ATOL = 1e-5
REFERENCE_SHAPE = (300, 260)  # not square: the resize must really resample both axes


class PinMismatch(RuntimeError):
    """The installed preprocessing code does not compute the tensor the export recorded."""


def reference_png() -> bytes:
    """A fixed 16-bit grayscale PNG: two dark lung fields, a bright border and a label patch."""
    from PIL import Image

    h, w = REFERENCE_SHAPE
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = 30000 + 12000 * np.sin(x / 17.0) * np.cos(y / 23.0)
    for cx in (0.3 * w, 0.7 * w):
        img -= 18000 * np.exp(-(((x - cx) / (0.16 * w)) ** 2 + ((y - 0.5 * h) / (0.3 * h)) ** 2))
    img[:12], img[:, -10:] = 65000, 64000
    img[20:40, 20:70] = 500
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 65535).astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def reference_tensor(spec: PreprocessSpec) -> np.ndarray:
    """The input tensor the installed code computes for ``reference_png()`` under ``spec``."""
    return load_tensor(reference_png(), spec).numpy().astype(np.float32)


def tensor_digest(t: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(t, dtype=np.float32).tobytes()).hexdigest()


def git_commit(path: str | Path | None = None) -> str | None:
    """The commit of the checkout holding ``path`` (default: this package), "+dirty" when it has
    uncommitted changes; None outside a git checkout."""
    where = Path(path or Path(flannel.__file__).parent)
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=where, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def code_pins(spec: PreprocessSpec) -> dict:
    """The manifest's ``pins``: flannel version and commit, and the reference tensor's digest."""
    t = reference_tensor(spec)
    return {"flannel_version": flannel.__version__, "flannel_commit": git_commit(),
            "reference_image": f"flannel.pins.reference_png {REFERENCE_SHAPE[0]}x"
                               f"{REFERENCE_SHAPE[1]} uint16",
            "reference_tensor_shape": list(t.shape), "reference_tensor_sha256": tensor_digest(t)}


@dataclass
class PinCheck:
    """The outcome of ``check_pins``."""

    exact: bool
    max_abs_diff: float
    recorded_sha256: str
    computed_sha256: str


def check_pins(pins: dict, spec: PreprocessSpec, recorded: np.ndarray) -> PinCheck:
    """Recompute the reference tensor and compare it with the one the export recorded.

    Args:
        pins: the manifest's ``pins``.
        spec: the served input spec.
        recorded: the reference tensor shipped with the export.

    Returns:
        How it compared (exact digest, or within ``REFERENCE_ATOL``).

    Raises:
        PinMismatch: the recorded tensor is not the one pinned, or the installed code computes
            another one; the message names both digests and the versions.
    """
    want = pins["reference_tensor_sha256"]
    if tensor_digest(recorded) != want:
        raise PinMismatch(f"the shipped reference tensor has sha256 {tensor_digest(recorded)}, "
                          f"the manifest pins {want}")
    got = reference_tensor(spec)
    digest = tensor_digest(got)
    if got.shape != recorded.shape:
        diff = float("inf")
    else:
        diff = float(np.abs(got - recorded).max()) if got.size else 0.0
    if digest != want and not diff <= REFERENCE_ATOL:
        raise PinMismatch(
            f"the installed flannel {flannel.__version__} (commit {git_commit()}) preprocesses the "
            f"reference image to a tensor with sha256 {digest}, but the model was exported by "
            f"flannel {pins.get('flannel_version')} (commit {pins.get('flannel_commit')}) with "
            f"sha256 {want} (max abs diff {diff:.3g} > {REFERENCE_ATOL:g}): refusing to serve; "
            f"install the exporting version or export again")
    return PinCheck(digest == want, diff, want, digest)
