"""Readers for the public chest X-ray layouts, and the merge of several sources under a label scheme.

    python -c "from flannel.data.readers import *; print(read_dataset(['data/raw']).class_counts())"

Each reader walks one published folder layout and describes every file it finds: a usable image
becomes a ``Sample`` (canonical finding, namespaced patient id), anything else becomes a ``Problem``
with a reason. Readers only look at names, sizes and magic bytes; decoding every pixel is the
audit's job. Layouts (see ``DESIGN.md``):

- ``muhammedtalo``: ``X-Ray Image DataSet/{Covid-19,No_findings,Pneumonia}/``
- ``radiography``: ``{COVID,Lung_Opacity,Normal,Viral Pneumonia}/images/*.png`` with ``masks/``
- ``ieee8023``: ``metadata.csv`` plus ``images/``
- ``kaggle``: ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``
- ``hannover``: ``data.csv`` plus ``png/`` (Hannover Medical School COVID-19 image repository)
- ``openist``: a folder of normal ``*.jpg`` radiographs with ``*@.png`` lung masks (OpenIST)
"""
from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from flannel import labels as L
from flannel.data.records import Problem, Sample
from flannel.decode import sniff_format

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
# Enough bytes for every signature ``sniff_format`` knows (DICOM: 128-byte preamble + "DICM").
_SNIFF_BYTES = 132
# How deep below a given root the forgiving search looks for a layout's folder: archives add wrapper
# folders (``COVID-19-master/``, Kaggle's ``chest_xray/chest_xray/``, OpenIST's
# ``OpenIST-master/Datasets/Chest_x-ray``).
_SEARCH_DEPTH = 3


class LayoutNotFound(FileNotFoundError):
    """The folder does not hold the layout a reader expects."""


@dataclass
class ReadResult:
    """What one reader found.

    Attributes:
        samples: usable images.
        problems: files that were found but cannot be used, with the reason.
        skipped: rows deliberately left out by a rule (e.g. lateral views), counted per reason.
    """

    samples: list[Sample] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def extend(self, other: "ReadResult") -> None:
        self.samples += other.samples
        self.problems += other.problems
        self.skipped.update(other.skipped)


def file_problem(path: Path) -> str | None:
    """Why a file cannot be an image, or None when its name, size and signature look right."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image file extension ({path.suffix or 'none'}); expected {IMAGE_EXTENSIONS}"
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(_SNIFF_BYTES)
    except OSError as exc:
        return f"cannot read: {exc}"
    if size == 0:
        return "empty file (0 bytes)"
    if sniff_format(head) == "unknown" and path.suffix.lower() not in (".dcm", ".dicom"):
        return f"content is not PNG, JPEG or DICOM despite the {path.suffix} extension"
    return None


def _find_root(root: str | Path, looks_right: Callable[[Path], bool], expected: str) -> Path:
    """The folder at or up to ``_SEARCH_DEPTH`` levels below ``root`` for which ``looks_right``."""
    root = Path(root)
    if not root.is_dir():
        raise LayoutNotFound(f"{root}: not a folder")
    level = [root]
    for _ in range(_SEARCH_DEPTH + 1):
        for folder in level:
            if looks_right(folder):
                return folder
        level = [c for f in level for c in sorted(f.iterdir())
                 if c.is_dir() and not c.name.startswith((".", "__MACOSX"))]
    raise LayoutNotFound(f"{root}: expected {expected} (at the root or up to {_SEARCH_DEPTH} "
                         "folders below it)")


def _scan(folder: Path, make: Callable[[Path], Sample], skip_dirs: Iterable[str] = (),
          skip_file: Callable[[Path], str | None] = lambda p: None) -> ReadResult:
    """Every file directly in ``folder``: a Sample from ``make``, a Problem, or skipped by rule.

    ``skip_file`` names the rule that leaves a file out (counted in ``skipped``), or returns None.
    """
    result = ReadResult()
    for path in sorted(folder.iterdir()):
        if path.is_dir():
            if path.name not in skip_dirs:
                result.problems.append(Problem(str(path), "unexpected sub-folder; not read"))
            continue
        rule = skip_file(path)
        if rule:
            result.skipped[rule] += 1
            continue
        reason = file_problem(path)
        if reason:
            result.problems.append(Problem(str(path.resolve()), reason))
        else:
            result.samples.append(make(path))
    return result


def _csv_rows(path: Path, columns: Iterable[str]) -> Iterator[dict]:
    """Rows of a metadata CSV that must have ``columns`` (LayoutNotFound names the missing ones)."""
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise LayoutNotFound(f"{path}: missing columns {missing}")
        yield from reader


def _own_patient(source: str, path: Path, finding: str, key: str | None = None) -> Sample:
    """A sample whose source names no patient: the image is its own patient."""
    return Sample(str(path.resolve()), finding, source, f"{source}:{key or path.stem}", False)


# --- muhammedtalo/COVID-19 -------------------------------------------------------------------------
MUHAMMEDTALO_FOLDERS = {"Covid-19": L.COVID19, "No_findings": L.NORMAL, "Pneumonia": L.PNEUMONIA}
# ChestX-ray8 names: 8-digit patient id, 3-digit follow-up number.
_CHESTXRAY8_NAME = re.compile(r"^(\d{8})_(\d{3})\.png$", re.IGNORECASE)


def _has_all(folder: Path, names: Iterable[str]) -> bool:
    return all((folder / n).is_dir() for n in names)


def _muhammedtalo_sample(path: Path, finding: str) -> Sample:
    match = _CHESTXRAY8_NAME.match(path.name)
    if match and finding != L.COVID19:
        # Namespaced by the original archive so the same patient is recognised in any source.
        return Sample(str(path.resolve()), finding, "muhammedtalo", f"chestxray8:{match[1]}", True)
    return _own_patient("muhammedtalo", path, finding)


def read_muhammedtalo(root: str | Path) -> ReadResult:
    """Read ``X-Ray Image DataSet/{Covid-19,No_findings,Pneumonia}/``.

    Args:
        root: the repository folder, ``X-Ray Image DataSet`` itself, or a folder above them.

    Returns:
        Samples (ChestX-ray8 patients recovered from file names; COVID-19 images each their own
        patient) and problems.
    """
    base = _find_root(root, lambda f: _has_all(f, MUHAMMEDTALO_FOLDERS),
                      "folders " + ", ".join(MUHAMMEDTALO_FOLDERS) + " (muhammedtalo/COVID-19)")
    result = ReadResult()
    for name, finding in MUHAMMEDTALO_FOLDERS.items():
        result.extend(_scan(base / name, lambda p, f=finding: _muhammedtalo_sample(p, f)))
    return result


# --- COVID-19 Radiography Database -----------------------------------------------------------------
RADIOGRAPHY_FOLDERS = {"COVID": L.COVID19, "Lung_Opacity": L.LUNG_OPACITY, "Normal": L.NORMAL,
                       "Viral Pneumonia": L.VIRAL_PNEUMONIA}


def _is_radiography(folder: Path) -> bool:
    present = [n for n in RADIOGRAPHY_FOLDERS if (folder / n).is_dir()]
    # Subsets exist (the 3-class synthetic copy has no Lung_Opacity); COVID + Normal always do.
    return {"COVID", "Normal"} <= set(present)


def read_radiography(root: str | Path) -> ReadResult:
    """Read ``{COVID,Lung_Opacity,Normal,Viral Pneumonia}/images/``; ``masks/`` is never read.

    Older releases keep the images directly in the class folder; both are accepted. The
    ``<class>.metadata.xlsx`` files carry no patient ids and are not needed.

    Args:
        root: the database folder (``COVID-19_Radiography_Dataset``) or a folder above it.

    Returns:
        Samples (no patient ids: each image is its own patient) and problems.
    """
    base = _find_root(root, _is_radiography,
                      "class folders COVID, Normal[, Lung_Opacity, Viral Pneumonia] with images/ "
                      "(COVID-19 Radiography Database)")
    result = ReadResult()
    for name, finding in RADIOGRAPHY_FOLDERS.items():
        folder = base / name
        if not folder.is_dir():
            continue
        images = folder / "images" if (folder / "images").is_dir() else folder
        make = lambda p, f=finding, n=name: _own_patient("radiography", p, f, f"{n}/{p.stem}")
        result.extend(_scan(images, make, skip_dirs=("masks", "images")))
    return result


# --- ieee8023 covid-chestxray-dataset --------------------------------------------------------------
# Frontal projections only: lateral and CT slices show other anatomy and are not in the task.
FRONTAL_VIEWS = frozenset({"PA", "AP", "AP SUPINE", "AP SEMI ERECT", "AP ERECT"})
IEEE8023_COLUMNS = ("patientid", "finding", "view", "modality", "folder", "filename")


def ieee8023_finding(text: str) -> str:
    """Canonical finding for a metadata ``finding`` path such as ``Pneumonia/Viral/COVID-19``.

    COVID-19 anywhere in the path wins (it is also viral pneumonia); the second level names the
    cause; other pneumonias (fungal, lipoid, aspiration) are pneumonia of unstated viral/bacterial
    cause; everything else (tuberculosis, unknown, todo) is ``other``.
    """
    parts = [p.strip().lower() for p in text.split("/") if p.strip()]
    if any("covid-19" in p or "covid19" in p for p in parts):
        return L.COVID19
    if parts == ["no finding"]:
        return L.NORMAL
    if parts and parts[0] == "pneumonia":
        if "viral" in parts[1:2]:
            return L.VIRAL_PNEUMONIA
        if "bacterial" in parts[1:2]:
            return L.BACTERIAL_PNEUMONIA
        return L.PNEUMONIA
    return L.OTHER


def _ieee8023_row(base: Path, row: dict, result: ReadResult) -> None:
    modality, view = row["modality"].strip(), " ".join(row["view"].upper().split())
    if modality.upper() != "X-RAY":
        result.skipped[f"modality {modality or 'empty'}"] += 1
        return
    if view not in FRONTAL_VIEWS:
        result.skipped[f"view {view or 'empty'}"] += 1
        return
    path = base / (row["folder"].strip() or "images") / row["filename"].strip()
    if not path.is_file():
        result.problems.append(Problem(str(path), "listed in metadata.csv but the file is missing"))
        return
    reason = file_problem(path)
    if reason:
        result.problems.append(Problem(str(path.resolve()), reason))
        return
    finding = ieee8023_finding(row["finding"])
    result.samples.append(Sample(str(path.resolve()), finding, "ieee8023",
                                 f"ieee8023:{row['patientid'].strip()}", True))


def read_ieee8023(root: str | Path) -> ReadResult:
    """Read ``metadata.csv`` + ``images/``: frontal X-rays only, findings mapped, patients kept.

    Args:
        root: the repository folder (``covid-chestxray-dataset``) or a folder above it.

    Returns:
        Samples, problems (missing or unreadable files) and the rows skipped per view/modality.
    """
    base = _find_root(root, lambda f: (f / "metadata.csv").is_file() and (f / "images").is_dir(),
                      "metadata.csv and images/ (ieee8023 covid-chestxray-dataset)")
    result = ReadResult()
    for row in _csv_rows(base / "metadata.csv", IEEE8023_COLUMNS):
        _ieee8023_row(base, row, result)
    return result


# --- Kaggle chest-xray-pneumonia -------------------------------------------------------------------
KAGGLE_SPLITS = ("train", "val", "test")
KAGGLE_FOLDERS = {"NORMAL": L.NORMAL, "PNEUMONIA": L.PNEUMONIA}
_KAGGLE_PNEUMONIA = re.compile(r"^(person\d+)_(bacteria|virus)_\d+\.jpe?g$", re.IGNORECASE)
# Normals carry the study number: IM-0115-0001 (patient 0115, image 1); the NORMAL2- series is a
# second numbering, kept apart so its 0115 is not merged with the first series' 0115.
_KAGGLE_NORMAL = re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+\.jpe?g$", re.IGNORECASE)


def _kaggle_sample(path: Path, folder: str) -> Sample:
    if folder == "PNEUMONIA":
        match = _KAGGLE_PNEUMONIA.match(path.name)
        if match:
            finding = L.BACTERIAL_PNEUMONIA if match[2].lower() == "bacteria" else L.VIRAL_PNEUMONIA
            return Sample(str(path.resolve()), finding, "kaggle", f"kaggle:{match[1].lower()}", True)
        return _own_patient("kaggle", path, L.PNEUMONIA)
    match = _KAGGLE_NORMAL.match(path.name)
    if match:
        return Sample(str(path.resolve()), L.NORMAL, "kaggle", f"kaggle:{match[1].upper()}", True)
    return _own_patient("kaggle", path, L.NORMAL)


def _is_kaggle(folder: Path) -> bool:
    return any((folder / s / c).is_dir() for s in KAGGLE_SPLITS for c in KAGGLE_FOLDERS)


def read_kaggle(root: str | Path) -> ReadResult:
    """Read ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/``; the published split is ignored.

    Args:
        root: the ``chest_xray`` folder or a folder above it.

    Returns:
        Samples (patients from ``personN_...`` and ``IM-NNNN-...`` names) and problems.
    """
    base = _find_root(root, _is_kaggle, "train/, val/ or test/ with NORMAL/ and PNEUMONIA/ "
                                        "(Kaggle chest-xray-pneumonia)")
    result = ReadResult()
    for split in KAGGLE_SPLITS:
        for folder in KAGGLE_FOLDERS:
            if (base / split / folder).is_dir():
                result.extend(_scan(base / split / folder, lambda p, f=folder: _kaggle_sample(p, f)))
    return result


# --- Hannover Medical School COVID-19 image repository ---------------------------------------------
HANNOVER_COLUMNS = ("patient_id", "image_id", "projection", "modality")
# Frontal chest radiographs only, as for ieee8023; the published set holds nothing else today.
HANNOVER_PROJECTIONS = frozenset({"ap", "pa"})
HANNOVER_MODALITIES = frozenset({"cr", "dx"})  # computed and digital radiography


def _is_hannover(folder: Path) -> bool:
    return (folder / "data.csv").is_file() and (folder / "png").is_dir()


def _hannover_path(base: Path, image_id: str) -> Path:
    # ``image_id`` is the file name in png/, published without its extension.
    name = image_id.strip()
    return base / "png" / (name if Path(name).suffix else f"{name}.png")


def _hannover_row(base: Path, row: dict, result: ReadResult) -> Path:
    path = _hannover_path(base, row["image_id"])
    projection, modality = row["projection"].strip().lower(), row["modality"].strip().lower()
    if projection not in HANNOVER_PROJECTIONS:
        result.skipped[f"projection {projection or 'empty'}"] += 1
    elif modality not in HANNOVER_MODALITIES:
        result.skipped[f"modality {modality or 'empty'}"] += 1
    elif not path.is_file():
        result.problems.append(Problem(str(path), "listed in data.csv but the file is missing"))
    elif reason := file_problem(path):
        result.problems.append(Problem(str(path.resolve()), reason))
    elif not row["patient_id"].strip():
        result.samples.append(_own_patient("hannover", path, L.COVID19))
    else:
        result.samples.append(Sample(str(path.resolve()), L.COVID19, "hannover",
                                     f"hannover:{row['patient_id'].strip()}", True))
    return path


def read_hannover(root: str | Path) -> ReadResult:
    """Read ``data.csv`` + ``png/``: every image is COVID-19, patients from ``patient_id``.

    Args:
        root: the repository folder (``covid-19-image-repository``) or a folder above it.

    Returns:
        Samples, problems (files missing, unreadable, or in png/ but not listed) and the rows
        skipped per projection/modality.
    """
    base = _find_root(root, _is_hannover, "data.csv and png/ (Hannover COVID-19 image repository)")
    result, listed = ReadResult(), set()
    for row in _csv_rows(base / "data.csv", HANNOVER_COLUMNS):
        listed.add(_hannover_row(base, row, result).name)
    for path in sorted((base / "png").iterdir()):
        if path.name not in listed:
            reason = "in png/ but not listed in data.csv (no patient, no label)"
            result.problems.append(Problem(str(path.resolve()), reason))
    return result


# --- OpenIST normal radiographs --------------------------------------------------------------------
# Hand-drawn lung masks share the image's stem and end in ``@.png``.
OPENIST_MASK_SUFFIX = "@.png"
OPENIST_FOLDER = "Chest_x-ray"


def _is_openist(folder: Path) -> bool:
    names = [p.name for p in folder.iterdir() if p.is_file()]
    has_jpeg = any(n.lower().endswith((".jpg", ".jpeg")) for n in names)
    has_mask = any(n.endswith(OPENIST_MASK_SUFFIX) for n in names)
    return has_jpeg and (has_mask or folder.name == OPENIST_FOLDER)


def _openist_mask(path: Path) -> str | None:
    return "lung mask (@.png)" if path.name.endswith(OPENIST_MASK_SUFFIX) else None


def read_openist(root: str | Path) -> ReadResult:
    """Read OpenIST's ``Chest_x-ray`` folder: normal adults, one image per patient, masks skipped.

    Args:
        root: the folder holding the JPEGs and ``@.png`` masks, or a folder above it.

    Returns:
        Samples (all normal; no patient ids, each image its own patient), problems, and the
        masks counted in ``skipped``.
    """
    base = _find_root(root, _is_openist, "*.jpg radiographs with *@.png lung masks (OpenIST)")
    return _scan(base, lambda p: _own_patient("openist", p, L.NORMAL), skip_file=_openist_mask)


# --- registry and merge ----------------------------------------------------------------------------
READERS: dict[str, Callable[[str | Path], ReadResult]] = {
    "muhammedtalo": read_muhammedtalo,
    "radiography": read_radiography,
    "ieee8023": read_ieee8023,
    "kaggle": read_kaggle,
    "hannover": read_hannover,
    "openist": read_openist,
}
_DETECTORS = {
    "ieee8023": lambda f: (f / "metadata.csv").is_file() and (f / "images").is_dir(),
    "muhammedtalo": lambda f: _has_all(f, MUHAMMEDTALO_FOLDERS),
    "radiography": _is_radiography,
    "kaggle": _is_kaggle,
    "hannover": _is_hannover,
    # Last: the loosest test (JPEGs beside mask files).
    "openist": _is_openist,
}


def detect_layout(root: str | Path) -> str:
    """Name of the reader whose layout ``root`` holds (at the root or a couple of folders below).

    Raises:
        LayoutNotFound: no known layout, with what was looked for.
    """
    for name, looks_right in _DETECTORS.items():
        try:
            _find_root(root, looks_right, name)
            return name
        except LayoutNotFound:
            continue
    raise LayoutNotFound(
        f"{root}: no known dataset layout. Expected one of: muhammedtalo ('X-Ray Image DataSet/"
        "{Covid-19,No_findings,Pneumonia}'), radiography ('{COVID,Normal,...}/images'), ieee8023 "
        "('metadata.csv' + 'images/'), kaggle ('chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}'), "
        "hannover ('data.csv' + 'png/'), openist ('*.jpg' with '*@.png' lung masks)")


@dataclass
class DatasetRead:
    """Several sources merged under one label scheme.

    Attributes:
        scheme: label scheme name.
        samples: samples whose finding the scheme uses.
        labels: class of each sample, aligned with ``samples``.
        problems: unusable files from every source.
        excluded: findings the scheme does not use, counted per finding.
        skipped: rows left out by reader rules (views, modality), per reason.
        sources: root -> layout name.
    """

    scheme: str
    samples: list[Sample]
    labels: list[str]
    problems: list[Problem]
    excluded: Counter
    skipped: Counter
    sources: dict[str, str]

    def class_counts(self) -> dict[str, int]:
        counts = Counter(self.labels)
        return {c: counts.get(c, 0) for c in L.get_scheme(self.scheme).classes}


def read_dataset(roots: Iterable[str | Path], scheme: str = L.DEFAULT_SCHEME,
                 layouts: Iterable[str | None] | None = None) -> DatasetRead:
    """Read several dataset folders (layouts auto-detected) and apply a label scheme.

    Args:
        roots: dataset folders, in any of the known layouts.
        scheme: label scheme name (``flannel.labels.SCHEMES``).
        layouts: optional layout name per root; None entries are detected.

    Returns:
        The merged dataset; findings outside the scheme are counted in ``excluded``.
    """
    roots = [Path(r) for r in roots]
    layouts = list(layouts) if layouts is not None else [None] * len(roots)
    label_scheme = L.get_scheme(scheme)
    merged, sources = ReadResult(), {}
    for root, layout in zip(roots, layouts):
        layout = layout or detect_layout(root)
        sources[str(root)] = layout
        merged.extend(READERS[layout](root))
    samples, labels_, excluded = [], [], Counter()
    for sample in merged.samples:
        label = label_scheme.label_of(sample.finding)
        if label is None:
            excluded[sample.finding] += 1
        else:
            samples.append(sample)
            labels_.append(label)
    return DatasetRead(scheme, samples, labels_, merged.problems, excluded, merged.skipped, sources)
