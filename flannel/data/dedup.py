"""Find exact and near-duplicate images and merge each group of duplicates into one patient.

    flannel data split data/raw/COVID-19 --out data/manifest.csv   # runs it; --no-dedup skips it

Public sets copy each other: the same radiograph appears byte-identical in two archives, or
re-encoded and resized. A patient-level split cannot keep such copies together when the copies carry
different patient ids (or none), so one image would sit in train and its copy in test. Here every
image gets a sha256 of its bytes (exact copies) and a perceptual hash of its decoded pixels
(near copies); patients linked by a duplicate are merged into one, named by the smallest id.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from flannel.data.records import Problem, Sample
from flannel.decode import InputError, read_image

# pHash of 16x16 low-frequency DCT signs = 256 bits. imagehash's default 8x8 (64 bits) cannot tell
# chest radiographs apart: distinct images of covid19-xray-3class come within 4 bits of each other.
PHASH_SIZE = 16
# Hamming distance (of 256 bits) at or below which two images are the same radiograph. Measured
# here: copies re-encoded as JPEG (quality 60-90) and resized (0.3x-1.7x) differ by 0-6 bits, on
# covid19-xray-3class, external-cxr and the synthetic set alike; distinct radiographs differ by 44
# bits or more in covid19-xray-3class, 52 or more in external-cxr, and 12 or more in the synthetic
# set (one drawn template plus noise). 10 catches every copy and merges no two distinct images.
# A copy cropped differently (one pair in covid19-xray-3class, 14 bits) is beyond a global hash.
NEAR_DUPLICATE_MAX_DISTANCE = 10
# Rows of the pairwise distance matrix computed at once: 1024 x N float32 stays under 100 MB for
# the 21,165 images of the Radiography Database.
_DISTANCE_BLOCK = 1024


@dataclass
class DuplicateReport:
    """What duplicate grouping found.

    Attributes:
        exact_groups: paths with byte-identical content, one list per group of 2 or more.
        near_groups: paths of visually identical but not byte-identical content, one list per group
            whose members hold at least two different contents.
        changed: images whose patient id was replaced by a merged one.
        merged_patients: patient ids folded into another patient.
        problems: files that could not be decoded for the perceptual hash (left out of the split).
    """

    exact_groups: list[list[str]] = field(default_factory=list)
    near_groups: list[list[str]] = field(default_factory=list)
    changed: int = 0
    merged_patients: int = 0
    problems: list[Problem] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"exact_groups": len(self.exact_groups), "near_groups": len(self.near_groups),
                "images_changed_patient": self.changed, "patients_merged": self.merged_patients,
                "max_phash_distance": NEAR_DUPLICATE_MAX_DISTANCE,
                "exact": self.exact_groups, "near": self.near_groups}


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def perceptual_hash(path: str) -> np.ndarray:
    """pHash (``PHASH_SIZE`` squared booleans) of the decoded grayscale image.

    Raises:
        InputError: the file cannot be decoded.
    """
    import imagehash
    from PIL import Image

    gray = read_image(path)
    image = Image.fromarray(np.round(gray * 255).astype(np.uint8), mode="L")
    return imagehash.phash(image, hash_size=PHASH_SIZE).hash.reshape(-1)


def fingerprint(paths: Sequence[str], progress: bool = True):
    """sha256 and pHash of every file.

    Args:
        paths: image files.
        progress: show a progress bar.

    Returns:
        (sha256 per path, pHash per decodable path, problems for the undecodable ones).
    """
    from tqdm import tqdm

    shas, hashes, problems = {}, {}, []
    for path in tqdm(paths, desc="duplicates", unit="img", disable=not progress, mininterval=1):
        try:
            shas[path] = file_sha256(path)
            hashes[path] = perceptual_hash(path)
        except (InputError, OSError) as exc:
            problems.append(Problem(path, f"cannot be decoded for duplicate search: {exc}"))
    return shas, hashes, problems


class _UnionFind:
    def __init__(self, items):
        self.parent = {i: i for i in items}

    def find(self, x):
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the smallest id names the group

    def groups(self) -> list[list]:
        out: dict = {}
        for item in self.parent:
            out.setdefault(self.find(item), []).append(item)
        return [sorted(g) for g in out.values() if len(g) > 1]


def close_pairs(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int]]:
    """Index pairs (i < j) of hashes within ``max_distance`` bits of each other.

    Args:
        hashes: (N, bits) boolean matrix.
        max_distance: largest Hamming distance counted as a match.

    Returns:
        The matching pairs.
    """
    bits = hashes.astype(np.float32)
    pairs = []
    for start in range(0, len(bits), _DISTANCE_BLOCK):
        block = bits[start:start + _DISTANCE_BLOCK]
        # Hamming distance of 0/1 vectors: a.(1-b) + (1-a).b, as two matrix products.
        dist = block @ (1 - bits).T + (1 - block) @ bits.T
        for i, j in zip(*np.nonzero(dist <= max_distance)):
            if start + i < j:
                pairs.append((int(start + i), int(j)))
    return pairs


def duplicate_groups(shas: dict[str, str], hashes: dict[str, np.ndarray],
                     max_distance: int = NEAR_DUPLICATE_MAX_DISTANCE):
    """Exact groups (same sha256) and near groups (pHash within ``max_distance``, two+ contents).

    Args:
        shas: path -> sha256.
        hashes: path -> pHash bits, for the decodable paths.
        max_distance: largest pHash Hamming distance counted as a near duplicate.

    Returns:
        (exact groups, near groups), each a sorted list of sorted path lists.
    """
    by_sha: dict[str, list[str]] = {}
    for path in sorted(hashes):
        by_sha.setdefault(shas[path], []).append(path)
    exact = sorted(g for g in by_sha.values() if len(g) > 1)
    heads = [g[0] for g in by_sha.values()]  # one representative per distinct content
    contents = _UnionFind(range(len(heads)))
    matrix = np.stack([hashes[h] for h in heads]) if heads else np.zeros((0, PHASH_SIZE ** 2))
    for i, j in close_pairs(matrix, max_distance):
        contents.union(i, j)
    near = sorted(sorted(p for i in g for p in by_sha[shas[heads[i]]]) for g in contents.groups())
    return exact, near


def merge_patients(samples: Sequence[Sample], groups: Sequence[Sequence[str]]):
    """Give every patient linked by a duplicate group the smallest patient id of its component.

    Args:
        samples: samples to relabel.
        groups: lists of paths that show the same radiograph.

    Returns:
        (relabelled samples in the input order, images that changed patient, patients merged away).
    """
    patient_of = {s.path: s.patient_id for s in samples}
    patients = _UnionFind(sorted(set(patient_of.values())))
    for group in groups:
        ids = [patient_of[p] for p in group if p in patient_of]
        for other in ids[1:]:
            patients.union(ids[0], other)
    merged = [replace(s, patient_id=patients.find(s.patient_id)) for s in samples]
    changed = sum(a.patient_id != b.patient_id for a, b in zip(samples, merged))
    folded = sum(patients.find(p) != p for p in patients.parent)
    return merged, changed, folded


def merge_duplicate_patients(samples: Sequence[Sample], progress: bool = True,
                             max_distance: int = NEAR_DUPLICATE_MAX_DISTANCE):
    """Find duplicates among ``samples`` and merge their patients.

    Args:
        samples: samples from the readers.
        progress: show a progress bar while decoding.
        max_distance: largest pHash Hamming distance counted as a near duplicate.

    Returns:
        (decodable samples with merged patient ids, the DuplicateReport). Undecodable samples are
        left out and listed in the report's problems.
    """
    shas, hashes, problems = fingerprint([s.path for s in samples], progress)
    exact, near = duplicate_groups(shas, hashes, max_distance)
    usable = [s for s in samples if s.path in hashes]
    merged, changed, folded = merge_patients(usable, exact + near)
    return merged, DuplicateReport(exact, near, changed, folded, problems)
