"""Audit a dataset before training: counts, sizes, modes, formats, problems, duplicates, patient
overlap between splits, and a shortcut check that asks whether metadata alone predicts the class.

    flannel data audit "../shared/datasets/covid19-xray-3class" --scheme 3class --json audit.json

The shortcut check trains a shallow decision tree on file metadata and border statistics only (no
lung pixels). If that tree does clearly better than always answering the majority class, the classes
differ by source (size, colour mode, format, burnt-in marks) and a CNN can score well without
seeing disease. This is the known trap of the muhammedtalo set: its COVID-19 images come from papers
and websites while every other image comes from one hospital archive.
"""
from __future__ import annotations

import hashlib
import io
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from flannel import labels as L
from flannel.data.readers import read_dataset
from flannel.data.records import Problem, read_manifest
from flannel.decode import InputError, decode_image, sniff_format

# The strip is what the default centre crop removes: (256 - 224) / 2 / 256 = 6.25% per side, where
# burnt-in letters, rulers and arrows sit.
BORDER_FRACTION = 0.0625
# "Far above chance": the metadata tree's cross-validated accuracy beats the majority-class rate by
# at least 20 points. Below that sits sampling noise (about +-0.05 at a few hundred images) plus a
# little real content in the features: file size follows how much texture an image holds, so on
# the clean synthetic set (no shortcut) the tree still gains 7 to 14 points. A source shortcut gives
# far more: 40 points on the shared muhammedtalo set, 65 on the synthetic set with markers.
SHORTCUT_ACCURACY_MARGIN = 0.20
# Per class, one-vs-rest ROC-AUC of the metadata tree. 0.5 is no information; 0.85 means a random
# image of that class outranks a random other image 85% of the time on metadata alone. It catches a
# small class that is fully separable by source (124 COVID-19 images among 1,124) even when the
# overall accuracy gain is diluted by the larger classes.
SHORTCUT_AUC = 0.85
TREE_DEPTH = 4  # shallow on purpose: a handful of threshold rules on headers, not a model
TREE_MIN_LEAF = 5
CV_FOLDS = 5
# Fewer images per class leave one or two per fold: the CV accuracy would be noise.
MIN_PER_CLASS = 10
AUDIT_SEED = 0


@dataclass
class ImageInfo:
    """Header facts and border statistics of one image."""

    path: str
    label: str
    patient_id: str
    fmt: str
    mode: str
    width: int
    height: int
    file_size: int
    sha256: str
    border: tuple[float, ...]  # mean and std of the top, bottom, left and right strips


@dataclass
class AuditReport:
    """Everything ``audit_dataset`` found; ``to_dict`` for JSON, ``format_text`` for people.

    Counts, sizes and the shortcut check cover the images that decode; the rest are problems.
    """

    roots: list[str]
    scheme: str
    sources: dict
    counts: dict
    patients: int
    images_without_known_patient: int
    excluded: dict
    skipped: dict
    sizes: dict
    modes: dict
    formats: dict
    problems: list[dict]
    duplicates: list[list[str]]
    patient_overlap: dict | None
    shortcut: dict
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def format_text(self) -> str:
        return format_report(self)


def _header(data: bytes) -> tuple[str, str, int, int]:
    """(format, colour mode, width, height) from the header, without decoding pixels."""
    fmt = sniff_format(data)
    if fmt == "dicom":
        import pydicom
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        mode = f"{ds.get('PhotometricInterpretation', '?')}/{ds.get('BitsStored', '?')}bit"
        return "dicom", mode, int(ds.get("Columns", 0)), int(ds.get("Rows", 0))
    with Image.open(io.BytesIO(data)) as im:
        return (im.format or fmt).lower(), im.mode, im.size[0], im.size[1]


def border_stats(image: np.ndarray, fraction: float = BORDER_FRACTION) -> tuple[float, ...]:
    """Mean and std of the top, bottom, left and right strips (``fraction`` of each side)."""
    h, w = image.shape
    dy, dx = max(1, round(h * fraction)), max(1, round(w * fraction))
    strips = (image[:dy], image[-dy:], image[:, :dx], image[:, -dx:])
    return tuple(float(v) for s in strips for v in (s.mean(), s.std()))


def inspect_image(path: str | Path, label: str = "", patient_id: str = "") -> ImageInfo:
    """Read one file once: header facts, sha256 and border statistics of the decoded image.

    Raises:
        InputError: the file cannot be decoded.
    """
    data = Path(path).read_bytes()
    image = decode_image(data)
    try:
        fmt, mode, width, height = _header(data)
    except Exception:  # noqa: BLE001  a header oddity must not hide a file that decodes
        fmt, mode, (height, width) = sniff_format(data), "?", image.shape
    return ImageInfo(str(path), label, patient_id, fmt, mode, width, height, len(data),
                     hashlib.sha256(data).hexdigest(), border_stats(image))


def _feature_matrix(infos: Sequence[ImageInfo]) -> tuple[np.ndarray, list[str]]:
    modes = sorted({i.mode for i in infos})
    fmts = sorted({i.fmt for i in infos})
    names = (["width", "height", "aspect", "log_file_size"] + [f"mode={m}" for m in modes]
             + [f"format={f}" for f in fmts]
             + [f"border_{side}_{stat}" for side in ("top", "bottom", "left", "right")
                for stat in ("mean", "std")])
    rows = [[i.width, i.height, i.width / max(i.height, 1), np.log(max(i.file_size, 1))]
            + [float(i.mode == m) for m in modes] + [float(i.fmt == f) for f in fmts]
            + list(i.border) for i in infos]
    return np.asarray(rows, dtype=np.float64), names


def shortcut_check(infos: Sequence[ImageInfo], classes: Sequence[str]) -> dict:
    """Cross-validated accuracy of a shallow tree on metadata only, against the majority rate.

    Folds are grouped by patient (one patient never in train and test fold) and stratified.

    Returns:
        accuracy, chance, per-class recall and one-vs-rest AUC, features, and ``warnings``.
    """
    from sklearn.metrics import recall_score, roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.tree import DecisionTreeClassifier

    y = np.array([i.label for i in infos])
    present = [c for c in classes if (y == c).any()]
    counts = Counter(y.tolist())
    if len(present) < 2 or min(counts.values()) < MIN_PER_CLASS:
        return {"skipped": f"needs at least 2 classes with {MIN_PER_CLASS} decodable images each",
                "warnings": []}
    folds = min(CV_FOLDS, min(counts.values()))
    x, names = _feature_matrix(infos)
    tree = DecisionTreeClassifier(max_depth=TREE_DEPTH, min_samples_leaf=TREE_MIN_LEAF,
                                  random_state=AUDIT_SEED)
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=AUDIT_SEED)
    proba = cross_val_predict(tree, x, y, cv=cv, groups=[i.patient_id for i in infos],
                              method="predict_proba")
    order = sorted(present)  # sklearn orders classes_ by sorting
    pred = np.array(order)[proba.argmax(1)]
    accuracy = float((pred == y).mean())
    majority, majority_n = counts.most_common(1)[0]
    chance = majority_n / len(y)
    recall = dict(zip(present, recall_score(y, pred, labels=present, average=None,
                                            zero_division=0).tolist()))
    auc = {c: float(roc_auc_score(y == c, proba[:, order.index(c)])) for c in present}
    warnings = []
    if accuracy >= chance + SHORTCUT_ACCURACY_MARGIN:
        warnings.append(f"metadata alone predicts the class: accuracy {accuracy:.3f} vs chance "
                        f"{chance:.3f} (margin {SHORTCUT_ACCURACY_MARGIN:.2f})")
    for c in present:
        if auc[c] >= SHORTCUT_AUC:
            warnings.append(f"class {c!r} is separable by metadata alone: one-vs-rest AUC "
                            f"{auc[c]:.3f} >= {SHORTCUT_AUC} (recall {recall[c]:.3f})")
    top = np.argsort(tree.fit(x, y).feature_importances_)[::-1][:3]
    return {"classifier": f"decision tree depth {TREE_DEPTH}, min leaf {TREE_MIN_LEAF}",
            "folds": folds, "grouped_by": "patient", "seed": AUDIT_SEED, "features": names,
            "images": len(y), "accuracy": accuracy, "chance": chance, "majority_class": majority,
            "per_class_recall": recall, "per_class_auc": auc,
            "top_features": [names[i] for i in top if tree.feature_importances_[i] > 0],
            "warnings": warnings}


def _per_class(infos: Sequence[ImageInfo], classes: Sequence[str]) -> tuple[dict, dict, dict]:
    """Sizes (min/median/max of width and height), colour modes and formats per class."""
    sizes, modes, formats = {}, {}, {}
    for c in classes:
        group = [i for i in infos if i.label == c]
        if not group:
            continue
        w, h = np.array([i.width for i in group]), np.array([i.height for i in group])
        sizes[c] = {"width": [int(w.min()), float(np.median(w)), int(w.max())],
                    "height": [int(h.min()), float(np.median(h)), int(h.max())]}
        modes[c] = dict(Counter(i.mode for i in group).most_common())
        formats[c] = dict(Counter(i.fmt for i in group).most_common())
    return sizes, modes, formats


def _duplicates(infos: Sequence[ImageInfo]) -> list[list[str]]:
    """Groups of byte-identical files (same sha256)."""
    by_hash = defaultdict(list)
    for i in infos:
        by_hash[i.sha256].append(i.path)
    return [sorted(paths) for paths in by_hash.values() if len(paths) > 1]


def patient_overlap(manifest: str | Path, duplicates: Sequence[Sequence[str]] = ()) -> dict:
    """Patients (and byte-identical files) that appear in more than one split of a manifest."""
    rows = read_manifest(manifest)
    splits_of = defaultdict(set)
    split_of_path = {}
    for r in rows:
        splits_of[r.patient_id].add(r.split)
        split_of_path[str(Path(r.path).resolve())] = r.split
    crossing = sorted(p for p, s in splits_of.items() if len(s) > 1)
    dup_cross = [g for g in duplicates
                 if len({split_of_path.get(str(Path(p).resolve())) for p in g} - {None}) > 1]
    return {"manifest": str(manifest), "patients": len(splits_of),
            "patients_in_several_splits": crossing, "duplicate_files_across_splits": dup_cross}


def _inspect_or_problem(item) -> ImageInfo | Problem:
    sample, label = item
    try:
        return inspect_image(sample.path, label, sample.patient_id)
    except InputError as exc:
        return Problem(sample.path, f"{type(exc).__name__}: {exc}")


def _inspect_all(dataset) -> tuple[list[ImageInfo], list[Problem]]:
    """Inspect every sample once, in threads (PIL and zlib release the GIL while decoding)."""
    from tqdm import tqdm

    items = list(zip(dataset.samples, dataset.labels))
    from flannel.cpus import usable_cores

    with ThreadPoolExecutor(max_workers=usable_cores()) as pool:
        results = list(tqdm(pool.map(_inspect_or_problem, items), total=len(items), desc="audit",
                            unit="img", leave=False, mininterval=1.0))
    return ([r for r in results if isinstance(r, ImageInfo)],
            [r for r in results if isinstance(r, Problem)])


def audit_dataset(roots: str | Path | Sequence[str | Path], scheme: str = L.DEFAULT_SCHEME,
                  manifest: str | Path | None = None) -> AuditReport:
    """Audit dataset folders (layouts auto-detected) under a label scheme.

    Args:
        roots: one dataset folder or several.
        scheme: label scheme name.
        manifest: optional split manifest; patient overlap between its splits is reported.

    Returns:
        The report; ``report.warnings`` is non-empty when a shortcut or leakage was found.
    """
    roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
    dataset = read_dataset(roots, scheme)
    classes = L.get_scheme(scheme).classes
    infos, decode_problems = _inspect_all(dataset)
    sizes, modes, formats = _per_class(infos, classes)
    duplicates = _duplicates(infos)
    overlap = patient_overlap(manifest, duplicates) if manifest else None
    shortcut = shortcut_check(infos, classes)
    warnings = list(shortcut.get("warnings", []))
    if overlap and overlap["patients_in_several_splits"]:
        warnings.append(f"{len(overlap['patients_in_several_splits'])} patients sit in more than "
                        "one split of the manifest")
    if overlap and overlap["duplicate_files_across_splits"]:
        warnings.append(f"{len(overlap['duplicate_files_across_splits'])} byte-identical files "
                        "sit in more than one split")
    problems = [{"path": p.path, "reason": p.reason} for p in dataset.problems + decode_problems]
    failed = {p.path for p in decode_problems}
    return AuditReport(
        roots=[str(r) for r in roots], scheme=scheme, sources=dataset.sources,
        counts={c: sum(i.label == c for i in infos) for c in classes},
        patients=len({i.patient_id for i in infos}),
        images_without_known_patient=sum(not s.patient_known for s in dataset.samples
                                         if s.path not in failed),
        excluded=dict(dataset.excluded), skipped=dict(dataset.skipped), sizes=sizes, modes=modes,
        formats=formats, problems=problems, duplicates=duplicates, patient_overlap=overlap,
        shortcut=shortcut, warnings=warnings)


def _fmt_counts(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"


def _format_shortcut(s: dict) -> list[str]:
    if "skipped" in s:
        return [f"Shortcut check skipped: {s['skipped']}"]
    return [
        f"Shortcut check: {s['classifier']} on metadata only ({len(s['features'])} features: size, "
        f"aspect, mode, format, file size, border strip mean/std), {s['folds']}-fold CV grouped by "
        f"patient, seed {s['seed']}",
        f"  accuracy {s['accuracy']:.3f} vs chance {s['chance']:.3f} (majority class "
        f"{s['majority_class']})",
        "  recall: " + ", ".join(f"{c} {v:.3f}" for c, v in s["per_class_recall"].items()),
        "  one-vs-rest AUC: " + ", ".join(f"{c} {v:.3f}" for c, v in s["per_class_auc"].items()),
        "  most used features: " + (", ".join(s["top_features"]) or "-"),
    ]


def format_report(r: AuditReport) -> str:
    """Readable text report; WARNING lines come last."""
    total = sum(r.counts.values())
    lines = [f"Audit of {', '.join(f'{k} ({v})' for k, v in r.sources.items())}, scheme {r.scheme}: "
             f"{total} images, {r.patients} patients ({r.images_without_known_patient} images "
             "without a known patient, each counted as its own patient)",
             f"{'class':<18}{'images':>7}  {'width min/med/max':<20}{'height min/med/max':<20}"
             "formats / modes"]
    for c, n in r.counts.items():
        sz = r.sizes.get(c)
        wh = [("%d/%g/%d" % tuple(sz[k])) if sz else "-" for k in ("width", "height")]
        lines.append(f"{c:<18}{n:>7}  {wh[0]:<20}{wh[1]:<20}{_fmt_counts(r.formats.get(c, {}))}"
                     f" / {_fmt_counts(r.modes.get(c, {}))}")
    if r.excluded:
        lines.append(f"Excluded findings (not in {r.scheme}): {_fmt_counts(r.excluded)}")
    if r.skipped:
        lines.append(f"Skipped by reader rules: {_fmt_counts(r.skipped)}")
    lines.append(f"Problems: {len(r.problems)}")
    lines += [f"  {p['path']}: {p['reason']}" for p in r.problems]
    lines.append(f"Byte-identical duplicate groups: {len(r.duplicates)}")
    lines += [f"  {' == '.join(g)}" for g in r.duplicates[:10]]
    if r.patient_overlap is not None:
        o = r.patient_overlap
        lines.append(f"Patient overlap in {o['manifest']}: {len(o['patients_in_several_splits'])} of "
                     f"{o['patients']} patients in more than one split; "
                     f"{len(o['duplicate_files_across_splits'])} duplicate groups across splits")
    lines += _format_shortcut(r.shortcut)
    lines += [f"WARNING: {w}" for w in r.warnings]
    return "\n".join(lines)
