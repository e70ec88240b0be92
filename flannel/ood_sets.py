"""Image sets that are not chest radiographs, for measuring the served out-of-distribution score.

    python -c "from flannel.ood_sets import build_ood_sets; print(build_ood_sets('runs/ood-sets'))"

Every set is made from files that installed packages ship (scikit-learn's and scikit-image's
sample photographs, pydicom's and pydicom-data's test DICOMs) or is drawn here from a fixed seed,
so no training split ever held one of them and nothing is fetched at run time. ``OOD_SETS`` is the
table of sets: a new set is one entry plus its builder, a function that returns the set's source
images (``SourceImage``) and the sources it could not use (``Unusable``).

DICOMs are rendered the way the product reads them, through ``flannel.decode`` (modality LUT, VOI
window, MONOCHROME1 inverted), then scaled to 8 bits; a multi-frame file, which the product
refuses, gives its middle frame through the same per-value transform (``dicom_unit_values``).
A set with fewer sources than ``MIN_IMAGES_PER_SET`` is expanded by flips, 90-degree rotations
and crops (``TRANSFORMS``), each file named after its source and transform. Every image is
written as a PNG no larger than ``MAX_SIDE``; building twice gives byte-identical files.

``ood_auroc`` and ``ood_figures`` turn the model's scores on these sets into the report's figures.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import json
import logging
import zlib
from dataclasses import dataclass
from functools import partial
from itertools import islice, product
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from flannel.decode import decode_image, dicom_unit_values, error_detail

log = logging.getLogger(__name__)

# Each set holds at least this many images, so that one image moves a set's pass rate by at most
# about 8 points and its AUROC is not decided by two or three files.
MIN_IMAGES_PER_SET = 12
# Longest side of a written image: the registered models read 224- or 299-pixel inputs
# (flannel.registry), so a larger file would only be reduced again by the preprocessing.
MAX_SIDE = 512
# Any fixed value: the drawn sets only need to come out the same on every build.
SEED = 20261201
# A crop keeps this share of each side: a different view that still shows most of the content.
CROP_SHARE = 0.75
MANIFEST_NAME = "ood_sets.json"
# zlib's fastest level: noise does not compress at any level, and level 6 (Pillow's default)
# took about three times as long to write these sets.
PNG_COMPRESS_LEVEL = 1
# The packages whose files or drawing code make the images, recorded with their versions.
PROVENANCE_PACKAGES = ("pydicom", "pydicom-data", "scikit-learn", "scikit-image", "pillow",
                       "matplotlib", "numpy")


@dataclass(frozen=True)
class SourceImage:
    """One image a builder made, before expansion and resizing.

    Attributes:
        stem: file-name stem, unique within its set.
        image: a PIL image, mode "L" or "RGB".
        source: where it comes from: "<distribution>:<file name>" or "drawn: <what>".
    """

    stem: str
    image: Image.Image
    source: str


@dataclass(frozen=True)
class Unusable:
    """A source a builder could not use (not installed, or not decodable), and why."""

    source: str
    reason: str


@dataclass(frozen=True)
class OodSet:
    """One out-of-distribution set: its name (its folder), one line saying what it holds, and
    its builder."""

    name: str
    description: str
    build: Callable[[], list[SourceImage | Unusable]]


class EmptyOodSet(ValueError):
    """A set none of whose sources could be used: its figures would mean nothing."""


# --- transforms that expand a set with few sources -------------------------------------------

def _crop(image: Image.Image, x: float, y: float) -> Image.Image:
    """The ``CROP_SHARE`` crop whose top-left corner sits at share (x, y) of the free margin."""
    width, height = image.size
    w, h = round(width * CROP_SHARE), round(height * CROP_SHARE)
    left, top = round((width - w) * x), round((height - h) * y)
    return image.crop((left, top, left + w, top + h))


def _transpose(method: Image.Transpose, image: Image.Image) -> Image.Image:
    return image.transpose(method)


# In the order they are used: a set takes every source as is, then every source flipped, and so
# on until it holds MIN_IMAGES_PER_SET images; one source alone needs all twelve.
TRANSFORMS: tuple[tuple[str, Callable[[Image.Image], Image.Image]], ...] = (
    ("original", lambda image: image),
    ("flip-lr", partial(_transpose, Image.Transpose.FLIP_LEFT_RIGHT)),
    ("flip-tb", partial(_transpose, Image.Transpose.FLIP_TOP_BOTTOM)),
    ("rot90", partial(_transpose, Image.Transpose.ROTATE_90)),
    ("rot180", partial(_transpose, Image.Transpose.ROTATE_180)),
    ("rot270", partial(_transpose, Image.Transpose.ROTATE_270)),
    ("transpose", partial(_transpose, Image.Transpose.TRANSPOSE)),
    ("crop-centre", partial(_crop, x=0.5, y=0.5)),
    ("crop-tl", partial(_crop, x=0.0, y=0.0)),
    ("crop-tr", partial(_crop, x=1.0, y=0.0)),
    ("crop-bl", partial(_crop, x=0.0, y=1.0)),
    ("crop-br", partial(_crop, x=1.0, y=1.0)),
)


def expand(sources: Sequence[SourceImage], minimum: int = MIN_IMAGES_PER_SET,
           ) -> list[tuple[SourceImage, str]]:
    """The (source, transform name) pairs a set is written as: every source as is and, when that
    is fewer than ``minimum``, transformed copies in ``TRANSFORMS`` order up to ``minimum``.

    Raises:
        ValueError: ``TRANSFORMS`` cannot make ``minimum`` images from these sources.
    """
    count = max(len(sources), minimum)
    pairs = [(source, name) for (name, _), source in islice(product(TRANSFORMS, sources), count)]
    if len(pairs) < count:
        raise ValueError(f"{len(sources)} sources and {len(TRANSFORMS)} transforms make "
                         f"{len(pairs)} images, fewer than {minimum}")
    return pairs


def fit_side(image: Image.Image, max_side: int = MAX_SIDE) -> Image.Image:
    """``image`` reduced (Lanczos, aspect kept) so that its longer side is at most ``max_side``."""
    width, height = image.size
    if max(width, height) <= max_side:
        return image
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


# --- DICOM -------------------------------------------------------------------------------------

def to_8bit(unit: np.ndarray) -> np.ndarray:
    """A float image in [0, 1] as uint8 levels 0-255 (rounded)."""
    return np.round(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


# An enhanced multi-frame file keeps its rescale and window in functional groups, shared or per
# frame (DICOM PS3.3 C.7.6.16); the decoder's transform reads them at the top level.
FRAME_VALUE_GROUPS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")


def _lift_frame_groups(ds, index: int) -> None:
    """Copy frame ``index``'s rescale and window (shared, then its own) to the top level."""
    groups = list(ds.get("SharedFunctionalGroupsSequence", []))[:1]
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence", []))
    groups += per_frame[index:index + 1]
    for group in groups:
        for name in FRAME_VALUE_GROUPS:
            for item in list(group.get(name, []))[:1]:
                for element in item:
                    ds[element.tag] = element


def _middle_frame_values(data: bytes) -> np.ndarray | None:
    """The middle frame of a multi-frame DICOM through the decoder's per-value transform, or
    None for a single-frame file (left to ``decode_image``)."""
    import pydicom
    from pydicom.pixels import pixel_array

    ds = pydicom.dcmread(io.BytesIO(data))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames <= 1:
        return None
    middle = frames // 2
    _lift_frame_groups(ds, middle)
    return dicom_unit_values(pixel_array(ds, index=middle), ds)


def render_dicom(path: str | Path) -> Image.Image:
    """A DICOM file as the product reads it (``flannel.decode.decode_image``), as an 8-bit
    grayscale image; a multi-frame file gives its middle frame.

    Args:
        path: the DICOM file.

    Returns:
        A mode "L" PIL image at the file's own size.

    Raises:
        flannel.decode.InputError: the decoder refuses the file; pydicom's own errors for a
            multi-frame file it cannot decode.
    """
    data = Path(path).read_bytes()
    unit = _middle_frame_values(data)
    return Image.fromarray(to_8bit(decode_image(data) if unit is None else unit))


def _distribution_of(path: Path) -> str:
    """The installed distribution a pydicom test file comes from."""
    import pydicom

    return "pydicom" if path.is_relative_to(Path(pydicom.__file__).parent) else "pydicom-data"


def dicom_sources(names: Iterable[str]) -> list[SourceImage | Unusable]:
    """pydicom's and pydicom-data's test files by name, rendered by ``render_dicom``; a file that
    is not installed or does not decode is returned as ``Unusable``, never fetched."""
    from pydicom.data import get_testdata_file

    made: list[SourceImage | Unusable] = []
    for name in names:
        found = get_testdata_file(name, download=False)
        if found is None:
            made.append(Unusable(name, "not installed (pydicom's test files or pydicom-data)"))
            continue
        path = Path(found)
        source = f"{_distribution_of(path)}:{name}"
        try:
            made.append(SourceImage(path.stem.lower(), render_dicom(path), source))
        except Exception as exc:  # noqa: BLE001 - one unusable file is reported, the set goes on
            made.append(Unusable(source, f"{type(exc).__name__}: {error_detail(exc)}"))
    return made


# Single slices of CT and MR studies; the copies of one image in other transfer syntaxes
# (693_J2KR, MR2_J2KI, MR_small_RLE, ...) are left out so that no image counts twice.
CT_FILES = ("CT_small.dcm", "693_UNCR.dcm", "eCT_Supplemental.dcm", "J2K_pixelrep_mismatch.dcm",
            "explicit_VR-UN.dcm", "bad_sequence.dcm")
MR_FILES = ("MR2_UNCR.dcm", "MR_small.dcm", "emri_small.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm")
# CR, MONOCHROME1, BodyPartExamined EXTREMITY (the study: a distal tibia, AP): a radiograph, not
# of the chest.
EXTREMITY_FILES = ("RG3_UNCR.dcm",)


# --- photographs -------------------------------------------------------------------------------

def _package_folder(module: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _photograph(path: Path, distribution: str) -> SourceImage:
    with Image.open(path) as image:
        image = image.convert("L" if image.mode in ("1", "L", "I;16", "I") else "RGB")
    return SourceImage(path.stem.lower(), image, f"{distribution}:{path.name}")


# Photographs among the files that scikit-image's wheel ships in skimage/data (read as files:
# skimage.data's loaders would fetch the others with pooch). Left out: microscopy, a retina, a
# CT phantom, pages of text, and drawings (logo, horse, chessboard, colour wheel).
SKIMAGE_PHOTOGRAPHS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png",
                       "clock_motion.png", "coffee.png", "coins.png", "grass.png", "gravel.png",
                       "hubble_deep_field.jpg", "moon.png", "motorcycle_left.png", "rocket.jpg")


def skimage_photograph_files() -> list[Path]:
    """The ``SKIMAGE_PHOTOGRAPHS`` present in the installed scikit-image; none without it."""
    folder = _package_folder("skimage")
    if folder is None:
        return []
    return [folder / "data" / name for name in SKIMAGE_PHOTOGRAPHS
            if (folder / "data" / name).is_file()]


def sklearn_sample_files() -> list[Path]:
    """The JPEGs ``sklearn.datasets.load_sample_images`` reads (china, flower), as files:
    importing ``sklearn.datasets`` costs seconds."""
    folder = _package_folder("sklearn")
    return [] if folder is None else sorted((folder / "datasets" / "images").glob("*.jpg"))


def photograph_sources() -> list[SourceImage | Unusable]:
    """scikit-learn's sample photographs and, where installed, scikit-image's."""
    return ([_photograph(path, "scikit-learn") for path in sklearn_sample_files()]
            + [_photograph(path, "scikit-image") for path in skimage_photograph_files()])


# --- documents ---------------------------------------------------------------------------------

# A4's 1 : sqrt(2) at twice MAX_SIDE: pages are drawn large and reduced, as a scan would be.
PAGE_SIZE = (724, 1024)
PAGE_MARGIN = 60
DOCUMENT_VARIANTS = 3
# Baseline to baseline over font size: printed text sets lines at about 120-145% of the size.
LINE_SPACING = 1.35
WORDS = ("patient", "report", "the", "of", "and", "to", "in", "is", "for", "with", "on", "as",
         "was", "by", "at", "from", "this", "that", "be", "are", "an", "or", "which", "results",
         "review", "annual", "account", "statement", "payment", "service", "period", "total",
         "policy", "section", "agreement", "notice", "please", "contact", "office", "number",
         "reference", "department", "meeting", "schedule", "delivery", "address", "invoice",
         "balance", "information", "request", "following", "committee", "approved", "within",
         "days", "receipt", "customer", "include", "attached", "general", "terms", "provided")
FORM_LABELS = ("Surname", "Given names", "Date of birth", "Address", "Postcode", "Telephone",
               "Email", "Account number", "Reference", "Employer", "Occupation", "Signature",
               "Date", "Nationality", "Amount", "Branch")


def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    """A DejaVu font shipped inside matplotlib (a dependency, not imported: that takes a second),
    so pages look alike everywhere."""
    folder = _package_folder("matplotlib")
    if folder is None:
        raise FileNotFoundError("matplotlib, whose fonts draw the documents, is not installed")
    return ImageFont.truetype(str(folder / "mpl-data" / "fonts" / "ttf" / name), size)


def _sentence(rng: np.random.Generator) -> str:
    words = [str(w) for w in rng.choice(WORDS, size=int(rng.integers(6, 18)))]
    return " ".join([words[0].capitalize(), *words[1:]]) + "."


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > width:
            lines.append(line)
            candidate = word
        line = candidate
    return lines + [line] if line else lines


def _paragraphs(draw: ImageDraw.ImageDraw, rng: np.random.Generator, font: ImageFont.FreeTypeFont,
                top: int, bottom: int, ink: int = 0) -> int:
    """Paragraphs of random sentences from ``top`` down to ``bottom``; returns the next free row."""
    step = round(font.size * LINE_SPACING)
    width = PAGE_SIZE[0] - 2 * PAGE_MARGIN
    while top + step <= bottom:
        text = " ".join(_sentence(rng) for _ in range(int(rng.integers(2, 6))))
        for line in _wrap(text, font, width):
            if top + step > bottom:
                return top
            draw.text((PAGE_MARGIN, top), line, fill=ink, font=font)
            top += step
        top += step // 2
    return top


def text_page(rng: np.random.Generator) -> Image.Image:
    """A page of dense text under a bold heading."""
    page = Image.new("L", PAGE_SIZE, 255)
    draw = ImageDraw.Draw(page)
    heading = " ".join(str(w) for w in rng.choice(WORDS, size=3)).title()
    draw.text((PAGE_MARGIN, PAGE_MARGIN), heading, fill=0, font=_font("DejaVuSerif-Bold.ttf", 28))
    body = _font(str(rng.choice(["DejaVuSerif.ttf", "DejaVuSans.ttf"])), int(rng.integers(13, 18)))
    _paragraphs(draw, rng, body, PAGE_MARGIN + 60, PAGE_SIZE[1] - PAGE_MARGIN)
    return page


def form_page(rng: np.random.Generator) -> Image.Image:
    """A form: labelled boxes, a row of tick boxes and ruled lines for remarks and a signature."""
    page = Image.new("L", PAGE_SIZE, 255)
    draw = ImageDraw.Draw(page)
    label = _font("DejaVuSans.ttf", 14)
    draw.text((PAGE_MARGIN, PAGE_MARGIN), "APPLICATION FORM", fill=0,
              font=_font("DejaVuSans-Bold.ttf", 28))
    right, top = PAGE_SIZE[0] - PAGE_MARGIN, PAGE_MARGIN + 70
    for name in rng.choice(FORM_LABELS, size=int(rng.integers(6, 10)), replace=False):
        draw.text((PAGE_MARGIN, top), str(name), fill=0, font=label)
        draw.rectangle((PAGE_MARGIN, top + 20, right, top + 52), outline=0, width=2)
        top += 70
    for i in range(int(rng.integers(3, 6))):
        x = PAGE_MARGIN + i * 120
        draw.rectangle((x, top, x + 18, top + 18), outline=0, width=2)
        draw.text((x + 26, top), str(rng.choice(WORDS)), fill=0, font=label)
    top += 50
    while top < PAGE_SIZE[1] - PAGE_MARGIN:
        draw.line((PAGE_MARGIN, top, right, top), fill=90, width=1)
        top += 34
    return page


def table_page(rng: np.random.Generator) -> Image.Image:
    """A ruled table of figures under a title, its header row shaded."""
    page = Image.new("L", PAGE_SIZE, 255)
    draw = ImageDraw.Draw(page)
    draw.text((PAGE_MARGIN, PAGE_MARGIN), "Quarterly statement", fill=0,
              font=_font("DejaVuSans-Bold.ttf", 26))
    cell = _font("DejaVuSansMono.ttf", 13)
    columns, rows, row_height = int(rng.integers(4, 7)), int(rng.integers(18, 30)), 28
    width = (PAGE_SIZE[0] - 2 * PAGE_MARGIN) // columns
    top = PAGE_MARGIN + 60
    draw.rectangle((PAGE_MARGIN, top, PAGE_MARGIN + columns * width, top + row_height), fill=200)
    for r in range(rows + 1):
        y = top + r * row_height
        for c in range(columns):
            text = str(rng.choice(WORDS)).title() if r == 0 else f"{rng.uniform(0, 99999):,.2f}"
            draw.text((PAGE_MARGIN + c * width + 6, y + 7), text, fill=0, font=cell)
        draw.line((PAGE_MARGIN, y, PAGE_MARGIN + columns * width, y), fill=0, width=1)
    bottom = top + (rows + 1) * row_height
    draw.line((PAGE_MARGIN, bottom, PAGE_MARGIN + columns * width, bottom), fill=0, width=1)
    for c in range(columns + 1):
        x = PAGE_MARGIN + c * width
        draw.line((x, top, x, bottom), fill=0, width=1)
    return page


# How a scanned letter differs from a clean page: grey paper, a slight skew, sensor noise, blur.
LETTER_PAPER_LEVELS = (195, 230)
LETTER_MAX_SKEW_DEGREES = 3.0
LETTER_NOISE_SD = 6.0
LETTER_BLUR_RADIUS = 0.7


def letter_page(rng: np.random.Generator) -> Image.Image:
    """A letter as a scanner sees it: grey paper, slightly rotated on a dark lid, noisy, soft."""
    paper = int(rng.integers(*LETTER_PAPER_LEVELS))
    page = Image.new("L", PAGE_SIZE, paper)
    draw = ImageDraw.Draw(page)
    font = _font("DejaVuSerif.ttf", 15)
    for i, line in enumerate(("The Secretary", "12 Station Road", "Northtown NT4 2AB")):
        draw.text((PAGE_SIZE[0] - 260, PAGE_MARGIN + 20 * i), line, fill=30, font=font)
    draw.text((PAGE_MARGIN, PAGE_MARGIN + 100), "Dear Sir or Madam,", fill=30, font=font)
    end = _paragraphs(draw, rng, font, PAGE_MARGIN + 140, PAGE_SIZE[1] - 220, ink=30)
    draw.text((PAGE_MARGIN, end + 20), "Yours faithfully,", fill=30, font=font)
    signature = np.cumsum(rng.normal(0, 6, size=(24, 2)), axis=0) + (PAGE_MARGIN + 20, end + 90)
    draw.line([tuple(p) for p in signature.round().tolist()], fill=20, width=2)
    skew = float(rng.uniform(-LETTER_MAX_SKEW_DEGREES, LETTER_MAX_SKEW_DEGREES))
    page = page.rotate(skew, resample=Image.Resampling.BICUBIC, fillcolor=60)
    noisy = np.asarray(page, dtype=np.float64) + rng.normal(0, LETTER_NOISE_SD, page.size[::-1])
    page = Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8))
    return page.filter(ImageFilter.GaussianBlur(LETTER_BLUR_RADIUS))


DOCUMENT_KINDS: dict[str, Callable[[np.random.Generator], Image.Image]] = {
    "text-page": text_page, "form": form_page, "table": table_page, "letter": letter_page}


def seeded_rng(kind: str, variant: int) -> np.random.Generator:
    """The generator of one drawn image: ``SEED``, the kind's name and the variant."""
    return np.random.default_rng([SEED, zlib.crc32(kind.encode()), variant])


def document_sources() -> list[SourceImage | Unusable]:
    """``DOCUMENT_VARIANTS`` seeded pages of each of ``DOCUMENT_KINDS``."""
    return [SourceImage(f"{kind}-{variant}", draw(seeded_rng(kind, variant)),
                        f"drawn: {kind}, variant {variant}")
            for kind, draw in DOCUMENT_KINDS.items() for variant in range(DOCUMENT_VARIANTS)]


# --- noise -------------------------------------------------------------------------------------

NOISE_VARIANTS = 3
# (width, height) of each variant: square, portrait and landscape.
NOISE_SIZES = ((512, 512), (384, 512), (512, 320))
GAUSSIAN_SDS = (20.0, 40.0, 64.0)
# Cells of random levels per side, smoothed by bicubic upscaling into blobs of that many.
BLOB_CELLS = (5, 10, 24)
CONSTANT_LEVELS = (40, 128, 215)


def _noise_size(variant: int) -> tuple[int, int]:
    return NOISE_SIZES[variant % len(NOISE_SIZES)]


def uniform_noise(rng: np.random.Generator, variant: int) -> Image.Image:
    width, height = _noise_size(variant)
    return Image.fromarray(rng.integers(0, 256, size=(height, width), dtype=np.uint8))


def gaussian_noise(rng: np.random.Generator, variant: int) -> Image.Image:
    width, height = _noise_size(variant)
    levels = rng.normal(128.0, GAUSSIAN_SDS[variant], size=(height, width))
    return Image.fromarray(np.clip(levels, 0, 255).round().astype(np.uint8))


def blob_noise(rng: np.random.Generator, variant: int) -> Image.Image:
    """Smooth random blobs: a coarse grid of random levels, upscaled bicubically (Pillow's 8-bit
    resampling is integer arithmetic, the same on every machine)."""
    width, height = _noise_size(variant)
    cells = BLOB_CELLS[variant]
    grid = rng.integers(0, 256, size=(max(2, cells * height // width), cells), dtype=np.uint8)
    return Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)


def constant_grey(rng: np.random.Generator, variant: int) -> Image.Image:
    return Image.new("L", _noise_size(variant), CONSTANT_LEVELS[variant])


def gradient(rng: np.random.Generator, variant: int) -> Image.Image:
    """Left to right, top to bottom, or out from the centre, from 0 to 255."""
    width, height = _noise_size(variant)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    ramp = (x / (width - 1), y / (height - 1),
            np.hypot(x - (width - 1) / 2, y - (height - 1) / 2))[variant]
    return Image.fromarray(to_8bit(ramp / ramp.max()))


NOISE_KINDS: dict[str, Callable[[np.random.Generator, int], Image.Image]] = {
    "uniform": uniform_noise, "gaussian": gaussian_noise, "blobs": blob_noise,
    "constant": constant_grey, "gradient": gradient}


def noise_sources() -> list[SourceImage | Unusable]:
    """``NOISE_VARIANTS`` seeded images of each of ``NOISE_KINDS``."""
    return [SourceImage(f"{kind}-{variant}", make(seeded_rng(kind, variant), variant),
                        f"drawn: {kind}, variant {variant}")
            for kind, make in NOISE_KINDS.items() for variant in range(NOISE_VARIANTS)]


# --- the table of sets and the build -----------------------------------------------------------

OOD_SETS: dict[str, OodSet] = {s.name: s for s in (
    OodSet("photographs", "Natural photographs: scikit-learn's sample images and, where "
           "installed, scikit-image's bundled ones.", photograph_sources),
    OodSet("ct", "CT slices from pydicom's and pydicom-data's test files.",
           partial(dicom_sources, CT_FILES)),
    OodSet("mr", "MR slices from pydicom's and pydicom-data's test files.",
           partial(dicom_sources, MR_FILES)),
    OodSet("extremity-radiograph", "A CR radiograph of a limb (pydicom-data RG3_UNCR.dcm, "
           "BodyPartExamined EXTREMITY, distal tibia): a radiograph, not of the chest.",
           partial(dicom_sources, EXTREMITY_FILES)),
    OodSet("documents", "Pages drawn with PIL: dense text, a form, a table and a scanned letter "
           "on grey paper.", document_sources),
    OodSet("noise", "Uniform, Gaussian and smoothed noise, constant grey and gradients.",
           noise_sources),
)}


def _file_name(source: SourceImage, transform: str) -> str:
    return f"{source.stem}.png" if transform == "original" else f"{source.stem}-{transform}.png"


def _write_png(image: Image.Image, path: Path) -> None:
    """A PNG with no metadata (no time stamps), so the same pixels give the same bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    path.write_bytes(buffer.getvalue())


def build_set(spec: OodSet, out_dir: Path) -> tuple[list[Path], dict]:
    """Write one set's images under ``out_dir / spec.name``.

    Returns:
        The paths written and the set's manifest entry.

    Raises:
        EmptyOodSet: none of the set's sources could be used.
    """
    made = spec.build()
    sources = [m for m in made if isinstance(m, SourceImage)]
    unusable = {m.source: m.reason for m in made if isinstance(m, Unusable)}
    if not sources:
        raise EmptyOodSet(f"OOD set {spec.name!r} has no usable source: {unusable}")
    if len({s.stem for s in sources}) != len(sources):
        raise ValueError(f"OOD set {spec.name!r} has two sources with one name")
    transforms = dict(TRANSFORMS)
    folder = out_dir / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    paths, files = [], []
    for source, transform in expand(sources):
        path = folder / _file_name(source, transform)
        _write_png(fit_side(transforms[transform](source.image)), path)
        paths.append(path)
        files.append({"file": path.name, "source": source.source, "transform": transform})
    entry = {"description": spec.description, "images": len(paths),
             "sources": sorted({s.source for s in sources}), "unusable": unusable, "files": files}
    return paths, entry


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PROVENANCE_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def build_ood_sets(out_dir: str | Path, sets: Sequence[str] | None = None) -> dict[str, list[Path]]:
    """Write the out-of-distribution sets as ``out_dir/<set>/*.png`` and ``out_dir/ood_sets.json``
    (per set: description, image count, sources, files, unusable sources; and the versions of
    the packages the images come from).

    Only this build's files are written over; nothing is deleted, so a folder may keep files of
    an earlier build: the returned paths and the manifest list the images of this one.

    Args:
        out_dir: the folder to write into (made if missing).
        sets: names from ``OOD_SETS``; None builds them all.

    Returns:
        The paths written, per set, in ``OOD_SETS`` order or the order of ``sets``.

    Raises:
        KeyError: an unknown set name.

    A set none of whose sources can be used (its package is not installed) is left out, with
    the reason under ``unavailable`` in the manifest.
    """
    names = list(OOD_SETS) if sets is None else list(sets)
    if unknown := [name for name in names if name not in OOD_SETS]:
        raise KeyError(f"unknown OOD sets {unknown}; known: {sorted(OOD_SETS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    built, entries, unavailable = {}, {}, {}
    for name in names:
        try:
            built[name], entries[name] = build_set(OOD_SETS[name], out_dir)
        except EmptyOodSet as exc:  # e.g. pydicom-data not installed: the others still count
            log.warning("%s", exc)
            unavailable[name] = str(exc)
    manifest = {"min_images_per_set": MIN_IMAGES_PER_SET, "max_side": MAX_SIDE,
                "packages": package_versions(), "sets": entries, "unavailable": unavailable}
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return built


# --- figures -----------------------------------------------------------------------------------

def _scores(values, what: str) -> np.ndarray:
    scores = np.asarray(values, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ValueError(f"{what}: no scores")
    if not np.isfinite(scores).all():
        raise ValueError(f"{what}: scores must be finite")
    return scores


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2.0)[inverse.ravel()]


def ood_auroc(in_scores, out_scores) -> float:
    """AUROC of telling out-of-distribution images (the positives) from in-distribution ones by
    a score that is higher for "more out of distribution": the Mann-Whitney U statistic over
    all (out, in) pairs, a tie counting one half.

    Args:
        in_scores: scores of in-distribution images (chest radiographs).
        out_scores: scores of out-of-distribution images.

    Returns:
        The share of pairs where the out-of-distribution image scores higher; 1.0 separates
        perfectly, 0.5 is chance.

    Raises:
        ValueError: either side empty or not finite.
    """
    negatives, positives = _scores(in_scores, "in_scores"), _scores(out_scores, "out_scores")
    ranks = average_ranks(np.concatenate([positives, negatives]))
    n_pos, n_neg = positives.size, negatives.size
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def pass_rate(scores, threshold: float) -> float:
    """The share of scores at or below ``threshold``: images the served model accepts."""
    return float(np.mean(_scores(scores, "scores") <= threshold))


def ood_figures(in_scores, scores_by_set: Mapping[str, Sequence[float]], threshold: float) -> dict:
    """The report's out-of-distribution figures.

    Args:
        in_scores: scores of held-out in-distribution images (chest radiographs).
        scores_by_set: scores per out-of-distribution set.
        threshold: a score at or below it passes as in distribution.

    Returns:
        ``{"threshold", "in_distribution": {"images", "pass_rate"}, "sets": {name: {"images",
        "auroc", "pass_rate"}}}``; a set's pass rate is the share it wrongly lets through.
    """
    negatives = _scores(in_scores, "in_scores")
    sets = {name: {"images": int(np.size(scores)), "auroc": ood_auroc(negatives, scores),
                   "pass_rate": pass_rate(scores, threshold)}
            for name, scores in scores_by_set.items()}
    return {"threshold": float(threshold),
            "in_distribution": {"images": int(negatives.size),
                                "pass_rate": pass_rate(negatives, threshold)},
            "sets": sets}
