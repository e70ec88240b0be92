"""Synthetic chest-X-ray-like dataset in the COVID-19 Radiography Database layout.

    flannel data synth data/synth --n-per-class 120 --size 128 --seed 0 [--markers]

Each image has two lung fields, ribs, a spine and heart shadow, noise, and a slightly different pose,
size and contrast. Findings are drawn from what radiologists describe: bilateral peripheral ground
glass for COVID-19, a unilateral lobar consolidation for (viral) pneumonia, diffuse patchy opacity
for lung opacity (4class), clear lungs for normal. A small CNN learns them in a few CPU minutes.

``markers`` burns a bright L-shaped mark into a corner that depends on the class, the kind of
source shortcut real sets have; the centre crop removes it and ``flannel data audit`` must flag it.
Files are a class-independent mix of 8/16-bit PNG, JPEG and DICOM (MONOCHROME2 and MONOCHROME1),
so the format is no shortcut. The same config gives byte-identical files.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

SYNTH_FOLDERS = {"3class": ("COVID", "Normal", "Viral Pneumonia"),
                 "4class": ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")}
# File format per image index, repeating; the same for every class so format carries no label.
FORMAT_CYCLE = ("png8", "png8", "png8", "png8", "png8", "png16", "jpeg", "jpeg", "dcm_mono2",
                "dcm_mono1")
EXTENSIONS = {"png8": ".png", "png16": ".png", "jpeg": ".jpg", "dcm_mono2": ".dcm",
              "dcm_mono1": ".dcm"}
# Corner of the class marker, by class position in the folder list.
MARKER_CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
# The marker stays inside the 6.25% border that the default 224-of-256 centre crop removes.
MARKER_FRACTION = 0.05
JPEG_QUALITY = 90
DICOM_BITS = 12  # common CR/DR stored depth
_CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


@dataclass(frozen=True)
class SynthConfig:
    """What to generate.

    Attributes:
        n_per_class: images per class before ``imbalance``.
        size: image side in pixels.
        scheme: "3class" or "4class" (adds Lung_Opacity).
        imbalance: class folder -> factor of ``n_per_class`` (e.g. {"COVID": 0.25}).
        markers: burn a class-dependent corner marker into every image.
        seed: base seed; every image has its own generator derived from it.
        noise: typical std of the additive pixel noise (each image draws 0.5x to 2x of it).
    """

    n_per_class: int = 120
    size: int = 128
    scheme: str = "3class"
    imbalance: dict = field(default_factory=dict)
    markers: bool = False
    seed: int = 0
    noise: float = 0.02

    def __post_init__(self) -> None:
        if self.scheme not in SYNTH_FOLDERS:
            raise ValueError(f"scheme must be one of {sorted(SYNTH_FOLDERS)}")
        if self.size < 32 or self.n_per_class < 1:
            raise ValueError("size must be >= 32 and n_per_class >= 1")
        unknown = set(self.imbalance) - set(SYNTH_FOLDERS[self.scheme])
        if unknown:
            raise ValueError(f"imbalance names unknown classes {sorted(unknown)}; "
                             f"classes: {SYNTH_FOLDERS[self.scheme]}")

    def count(self, folder: str) -> int:
        return max(1, round(self.n_per_class * float(self.imbalance.get(folder, 1.0))))


def _soft_ellipse(x, y, cx, cy, rx, ry, edge=0.15):
    """1 inside the ellipse, 0 outside, with a soft rim (radiographs have no hard edges)."""
    e = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
    return np.clip((1.0 - e) / edge, 0.0, 1.0)


def _blob(x, y, cx, cy, sigma):
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma ** 2))


def _pose_grid(size: int, rng: np.random.Generator):
    """Normalised coordinates in [-1, 1] after a small random rotation, scale and shift."""
    t = (np.arange(size) + 0.5) / size * 2 - 1
    x, y = np.meshgrid(t, t)
    angle = np.deg2rad(rng.uniform(-6, 6))
    scale = rng.uniform(0.9, 1.08)
    tx, ty = rng.uniform(-0.05, 0.05, size=2)
    c, s = np.cos(angle), np.sin(angle)
    xs, ys = x - tx, y - ty
    return (c * xs + s * ys) / scale, (-s * xs + c * ys) / scale


def _anatomy(x, y, rng: np.random.Generator):
    """Chest without findings, and the soft masks of the right and left lung (image left/right)."""
    body = _soft_ellipse(x, y, 0, 0.35, rng.uniform(0.88, 0.96), 1.3, edge=0.3)
    img = 0.06 + 0.34 * body
    lungs = [_soft_ellipse(x, y, side * 0.37, -0.05, rng.uniform(0.22, 0.27),
                           rng.uniform(0.46, 0.54), edge=0.25) for side in (-1, 1)]
    heart = _soft_ellipse(x, y, 0.12, 0.3, rng.uniform(0.28, 0.34), 0.26, edge=0.6)
    lungs[1] = lungs[1] * (1 - heart)
    img = img - 0.24 * (lungs[0] + lungs[1]) + 0.1 * heart
    img = img + 0.14 * np.clip(1 - np.abs(x) / 0.08, 0, 1) * (y > -0.8)  # spine and mediastinum
    for k in range(8):  # ribs: curved bright bands sloping down towards the sides
        curve = -0.55 + 0.13 * k + 0.3 * x ** 2
        img = img + 0.07 * body * np.clip(1 - np.abs(y - curve) / 0.025, 0, 1) * (np.abs(x) > 0.08)
    return img, lungs


def _covid(x, y, lungs, rng):
    """Bilateral, peripheral, lower-zone ground glass."""
    out = np.zeros_like(x)
    for side, lung in zip((-1, 1), lungs):
        for _ in range(rng.integers(2, 5)):
            cx = side * rng.uniform(0.5, 0.6)
            out += lung * rng.uniform(0.14, 0.22) * _blob(x, y, cx, rng.uniform(-0.05, 0.35),
                                                        rng.uniform(0.09, 0.14))
    return out


def _pneumonia(x, y, lungs, rng):
    """Unilateral lobar consolidation: a dense lower or middle zone of one lung."""
    lung = lungs[rng.integers(0, 2)]
    top = rng.uniform(-0.25, 0.05)
    zone = np.clip((y - top) / 0.08, 0, 1)
    return lung * zone * rng.uniform(0.3, 0.4)


def _lung_opacity(x, y, lungs, rng):
    """Diffuse patchy opacity scattered over both lungs."""
    out = np.zeros_like(x)
    both = lungs[0] + lungs[1]
    for _ in range(rng.integers(10, 17)):
        cx, cy = rng.choice([-1, 1]) * rng.uniform(0.2, 0.55), rng.uniform(-0.45, 0.4)
        out += both * rng.uniform(0.08, 0.15) * _blob(x, y, cx, cy, rng.uniform(0.04, 0.07))
    return out


FINDINGS = {"COVID": _covid, "Viral Pneumonia": _pneumonia, "Lung_Opacity": _lung_opacity,
            "Normal": lambda x, y, lungs, rng: np.zeros_like(x)}


def _burn_marker(img: np.ndarray, corner: str) -> None:
    """A bright L-shaped mark, like a burnt-in laterality letter, in one corner."""
    size = img.shape[0]
    m, w, off = max(3, round(MARKER_FRACTION * size)), max(1, size // 64), 1
    glyph = np.zeros((m, m), dtype=bool)
    glyph[:, :w] = True
    glyph[-w:, :] = True
    top = off if corner.startswith("top") else size - off - m
    left = off if corner.endswith("left") else size - off - m
    img[top:top + m, left:left + m][glyph] = 1.0


def render(folder: str, config: SynthConfig, rng: np.random.Generator,
           marker_corner: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic radiograph of a class folder and its lung mask.

    Returns:
        (image float64 (size, size) in [0, 1], lung mask bool (size, size)).
    """
    # The finding draws from its own stream, so pose, anatomy, contrast and noise follow the same
    # sequence whatever the class: a given generator state gives the same chest with another finding.
    finding_rng = np.random.default_rng(rng.integers(0, 2**63))
    x, y = _pose_grid(config.size, rng)
    img, lungs = _anatomy(x, y, rng)
    img = img + FINDINGS[folder](x, y, lungs, finding_rng)
    img = np.clip(img * rng.uniform(0.85, 1.15) + rng.uniform(-0.04, 0.04), 0, 1)
    img = img ** rng.uniform(0.85, 1.15)
    # Noise level varies per image (detectors differ); it also makes file size, which follows
    # noise entropy, independent of the class.
    img = np.clip(img + rng.normal(0, config.noise * rng.uniform(0.5, 2.0), img.shape), 0, 1)
    if marker_corner:
        _burn_marker(img, marker_corner)
    return img, (lungs[0] + lungs[1]) > 0.5


def _write_dicom(path: Path, img: np.ndarray, photometric: str, uid_key: str) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    top = 2 ** DICOM_BITS - 1
    pixels = np.round(img * top).astype(np.uint16)
    if photometric == "MONOCHROME1":  # bone dark, air bright: stored inverted
        pixels = top - pixels
    # UIDs derived from the file's key so the same config gives byte-identical files.
    sop_uid = generate_uid(entropy_srcs=["flannel-synth", uid_key])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = _CR_IMAGE_STORAGE, sop_uid, "CR"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["flannel-synth-study", uid_key])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["flannel-synth-series", uid_key])
    ds.PatientID, ds.PatientName = uid_key, "SYNTHETIC"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, DICOM_BITS, 11, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_image(path: Path, img: np.ndarray, kind: str, uid_key: str = "") -> None:
    """Save a [0, 1] grayscale image as one of ``FORMAT_CYCLE``'s kinds."""
    if kind == "png8":
        Image.fromarray(np.round(img * 255).astype(np.uint8)).save(path, format="PNG")
    elif kind == "png16":
        Image.fromarray(np.round(img * 65535).astype(np.uint16)).save(path, format="PNG")
    elif kind == "jpeg":
        Image.fromarray(np.round(img * 255).astype(np.uint8)).save(path, format="JPEG",
                                                                  quality=JPEG_QUALITY)
    elif kind in ("dcm_mono2", "dcm_mono1"):
        _write_dicom(path, img, "MONOCHROME1" if kind == "dcm_mono1" else "MONOCHROME2", uid_key)
    else:
        raise ValueError(f"unknown image kind {kind!r}")


README = """Synthetic chest-X-ray-like dataset (flannel data synth)

Layout: COVID-19 Radiography Database, {{class}}/images/<class>-<n>.<ext> with a lung mask of the same
stem under {{class}}/masks/. Read it with `flannel data split {out}` (layout "radiography").

Classes and counts: {counts}
Scheme: {scheme}; image size {size} px; seed {seed}; noise std {noise}.
Findings: COVID = bilateral peripheral ground glass; Viral Pneumonia = unilateral lobar
consolidation; Lung_Opacity = diffuse patchy opacity; Normal = clear lungs.
Files: a class-independent cycle of 8-bit PNG, 16-bit PNG, JPEG (quality {quality}) and 12-bit DICOM
(MONOCHROME2 and MONOCHROME1): {formats}.
Markers: {markers}
These images are drawn by a program; they are not radiographs of any person and carry no diagnosis.
"""


def _readme(out: Path, config: SynthConfig, counts: dict, formats: Counter) -> str:
    folders = SYNTH_FOLDERS[config.scheme]
    markers = ("yes: a bright L mark in the " + ", ".join(
        f"{MARKER_CORNERS[i]} corner for {f}" for i, f in enumerate(folders))
        + " (a deliberate source shortcut; the centre crop removes it)") if config.markers else "no"
    return README.format(out=out, counts=counts, scheme=config.scheme, size=config.size,
                         seed=config.seed, noise=config.noise, quality=JPEG_QUALITY,
                         formats=dict(sorted(formats.items())), markers=markers)


def synthesize(out: str | Path, config: SynthConfig = SynthConfig(), overwrite: bool = False) -> dict:
    """Write the synthetic dataset to ``out``.

    Args:
        out: output folder; it must be empty or absent unless ``overwrite``.
        config: what to generate.
        overwrite: write into a non-empty folder (files of the same name are replaced; nothing
            is deleted).

    Returns:
        Summary: counts per class folder, files per format, total files, config, seconds.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; choose a new folder or pass overwrite")
    start = time.perf_counter()
    folders = SYNTH_FOLDERS[config.scheme]
    counts, formats = {}, Counter()
    for ci, folder in enumerate(folders):
        (out / folder / "images").mkdir(parents=True, exist_ok=True)
        (out / folder / "masks").mkdir(parents=True, exist_ok=True)
        corner = MARKER_CORNERS[ci] if config.markers else None
        counts[folder] = config.count(folder)
        for i in range(counts[folder]):
            rng = np.random.default_rng([config.seed, ci, i])
            img, mask = render(folder, config, rng, corner)
            kind = FORMAT_CYCLE[i % len(FORMAT_CYCLE)]
            stem = f"{folder}-{i + 1}"
            write_image(out / folder / "images" / f"{stem}{EXTENSIONS[kind]}", img, kind,
                        f"{config.seed}-{folder}-{i}")
            Image.fromarray(mask.astype(np.uint8) * 255).save(out / folder / "masks" / f"{stem}.png")
            formats[kind] += 1
    (out / "README.txt").write_text(_readme(out, config, counts, formats))
    settings = {**asdict(config), "imbalance": dict(config.imbalance)}
    (out / "synth.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return {"out": str(out), "counts": counts, "formats": dict(formats),
            "files": sum(counts.values()), "config": settings,
            "seconds": round(time.perf_counter() - start, 2)}
