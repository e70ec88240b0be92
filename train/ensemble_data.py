"""Choosing an ensemble's learners and caching their class probabilities per split.

    python -c "from flannel.train.ensemble_data import select_learners; print(select_learners(['runs/a', 'runs/b'], k=1))"

Selection ranks learner runs by validation macro-F1 (as FLANNEL and seed 000 kept their best
five). The cache holds each learner's probabilities on the train, val and test splits of one split
manifest, computed on the common served input (``flannel.graphs``), so the fused module computes
exactly what the staged path (cache -> fusion) does. A cache file is keyed by the checkpoint's
sha256, the input side and the split manifest's sha256: a retrained checkpoint or a changed split
never reuses stale probabilities.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from flannel.artifacts import sha256_file
from flannel.checkpoint import Checkpoint, load_checkpoint
from flannel.data.records import read_manifest, resolve_path
from flannel.data.torch_dataset import XrayDataset
from flannel.graphs import learner_graph
from flannel.preprocess import PreprocessSpec

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
CACHE_FORMAT = 1


@dataclass
class Candidate:
    """One learner run considered for the ensemble."""

    run_dir: Path
    arch: str
    checkpoint: Path
    sha256: str
    val_macro_f1: float
    manifest: Path
    class_names: list[str]
    # Epoch at which training stopped because every image got the same probabilities.
    collapsed_at_epoch: int | None = None

    def member(self, name: str) -> dict:
        """The fusion checkpoint's record of this learner."""
        return {"name": name, "arch": self.arch, "checkpoint": str(self.checkpoint.resolve()),
                "checkpoint_sha256": self.sha256, "run_dir": str(self.run_dir),
                "val_macro_f1": self.val_macro_f1}


def candidate(run_dir: str | Path) -> Candidate:
    """Read a learner run's ``best.pt``, validation macro-F1 and split manifest.

    Raises:
        FileNotFoundError: no ``best.pt``.
        ValueError: the checkpoint holds no validation macro-F1 (an unfinished run).
    """
    run_dir = Path(run_dir)
    path = run_dir / "best.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} holds no best.pt: not a finished learner run")
    ckpt = load_checkpoint(path)
    val = (ckpt.metrics or {}).get("val", {})
    if "macro_f1" not in val:
        raise ValueError(f"{path} records no validation macro-F1; finish its training first")
    manifest = ckpt.config.get("manifest")
    if not manifest:
        raise ValueError(f"{path} records no split manifest")
    return Candidate(run_dir, ckpt.arch, path, sha256_file(path), float(val["macro_f1"]),
                     resolve_path(manifest, run_dir).resolve(), list(ckpt.class_names),
                     _collapsed_at(run_dir, ckpt))


def _collapsed_at(run_dir: Path, ckpt: Checkpoint) -> int | None:
    """The collapse epoch from the checkpoint or, as best.pt may predate it, the run's report."""
    epoch = (ckpt.training or {}).get("collapsed_at_epoch")
    report = run_dir / "report.json"
    if epoch is None and report.is_file():
        epoch = json.loads(report.read_text()).get("training", {}).get("collapsed_at_epoch")
    return int(epoch) if epoch else None


def select_learners(run_dirs: Sequence[str | Path], k: int = 5) -> tuple[list[Candidate], list]:
    """The best ``k`` runs by validation macro-F1 (ties by name), and the whole ranking.

    Every run must share the class names and the split manifest: the fusion is fitted on their
    probabilities for the same images. A run whose training collapsed (every image the same
    answer) is ranked but never chosen: it would only add a constant to the fusion.

    Returns:
        ``(chosen, ranking)``, each a list of ``Candidate``, best first.

    Raises:
        ValueError: fewer runs than ``k``, or runs that do not share classes and split.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    ranking = sorted((candidate(d) for d in run_dirs),
                     key=lambda c: (-c.val_macro_f1, c.arch, str(c.run_dir)))
    usable = [c for c in ranking if c.collapsed_at_epoch is None]
    for c in ranking:
        if c.collapsed_at_epoch is not None:
            log.warning("learner %s (%s) collapsed at epoch %d: not eligible", c.arch, c.run_dir,
                        c.collapsed_at_epoch)
    if len(usable) < k:
        raise ValueError(f"{len(usable)} usable learner runs given ({len(ranking) - len(usable)} "
                         f"collapsed), k = {k} wanted")
    first = ranking[0]
    for c in ranking[1:]:
        if c.class_names != first.class_names:
            raise ValueError(f"{c.run_dir} has classes {c.class_names}, {first.run_dir} has "
                             f"{first.class_names}: an ensemble needs one label scheme")
        if sha256_file(c.manifest) != sha256_file(first.manifest):
            raise ValueError(f"{c.run_dir} was trained on {c.manifest}, {first.run_dir} on "
                             f"{first.manifest}: an ensemble needs one split")
    for c in ranking:
        log.info("learner %-20s val macro-F1 %.4f  %s", c.arch, c.val_macro_f1, c.run_dir)
    return usable[:k], ranking


def cache_key(ckpt_sha256: str, input_side: int, manifest_sha256: str) -> str:
    text = json.dumps([CACHE_FORMAT, ckpt_sha256, input_side, manifest_sha256])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass
class SplitProbs:
    """Every learner's probabilities on one split: ``probs`` (N, L, C) and ``targets`` (N,)."""

    probs: np.ndarray
    targets: np.ndarray
    paths: list[str]


def _host_batches(rows, class_names: list[str], spec: PreprocessSpec, batch_size: int):
    dataset = XrayDataset(rows, class_names, spec, cache=False)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


@torch.no_grad()
def _compute(ckpts: list[Checkpoint], rows, class_names: list[str], spec: PreprocessSpec,
             batch_size: int, split: str) -> list[np.ndarray]:
    """Probabilities of each learner on ``rows``, decoding every image once."""
    graphs = [learner_graph(c, spec.resize) for c in ckpts]
    out: list[list[np.ndarray]] = [[] for _ in graphs]
    batches = _host_batches(rows, class_names, spec, batch_size)
    for x, _ in tqdm(batches, desc=f"learner probabilities ({split})", unit="batch",
                     leave=False):
        for i, graph in enumerate(graphs):
            out[i].append(graph(x)[1].numpy())
    n = len(class_names)
    return [np.concatenate(o) if o else np.zeros((0, n), np.float32) for o in out]


def learner_probabilities(chosen: Sequence[Candidate], input_spec: PreprocessSpec,
                          cache_dir: str | Path, batch_size: int = 32) -> dict[str, SplitProbs]:
    """Probabilities of every chosen learner on train, val and test, from the cache when valid.

    Args:
        chosen: the learners, in fusion order.
        input_spec: the common served input (``flannel.preprocess.input_spec_for``).
        cache_dir: where ``<key>.npz`` files live (shared by ensembles over the same runs).
        batch_size: images per forward pass.

    Returns:
        Split name -> ``SplitProbs`` with learners in ``chosen`` order.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    manifest = chosen[0].manifest
    manifest_sha = sha256_file(manifest)
    class_names = chosen[0].class_names
    rows = {s: read_manifest(manifest, split=s) for s in SPLITS}
    paths = {s: [r.path for r in rows[s]] for s in SPLITS}
    files = [cache_dir / f"{cache_key(c.sha256, input_spec.resize, manifest_sha)}.npz"
             for c in chosen]
    cached: list[dict | None] = []
    for c, f in zip(chosen, files):
        hit = None
        if f.is_file():
            with np.load(f, allow_pickle=False) as z:
                if all(list(z[f"{s}_paths"]) == paths[s] for s in SPLITS):
                    hit = {s: z[s] for s in SPLITS}
        log.info("%s: learner probabilities %s", c.arch, f"cached in {f}" if hit else "computed")
        cached.append(hit)
    missing = [i for i, h in enumerate(cached) if h is None]
    if missing:
        ckpts = [load_checkpoint(chosen[i].checkpoint) for i in missing]
        computed = {s: _compute(ckpts, rows[s], class_names, input_spec, batch_size, s)
                    for s in SPLITS}
        for j, i in enumerate(missing):
            cached[i] = {s: computed[s][j] for s in SPLITS}
            np.savez(files[i], **cached[i], **{f"{s}_paths": np.array(paths[s]) for s in SPLITS})
    return {s: SplitProbs(np.stack([c[s] for c in cached], axis=1).astype(np.float32),
                          np.array([class_names.index(r.label) for r in rows[s]], dtype=np.int64),
                          paths[s])
            for s in SPLITS}
