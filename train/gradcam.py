"""Grad-CAM heat maps of a trained learner, drawn over the exact tensor the server sees.

    flannel explain runs/resnet18 scan.dcm chest.png --out runs/resnet18/explain --target COVID-19

Each architecture's explained layer is ``ArchSpec.cam_layer`` in the registry: its last
convolutional block. DenseNets are explained at ``features.denseblock4`` rather than
``features.norm5`` because torchvision overwrites norm5's output with an in-place ReLU, so the
recorded activation would differ between CPU (shared storage) and GPU (copied).

Maps come from ``flannel.cam.learner_cam``, the same Grad-CAM computation the server's
explanations make. The model is left as it was found: hooks removed, train/eval mode,
``requires_grad`` flags and ``.grad`` restored.
"""
from __future__ import annotations

import copy
import logging
import random
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from flannel.cam import cam_overlay, learner_cam, resolve_target
from flannel.checkpoint import Checkpoint, load_checkpoint
from flannel.data.records import ManifestRow
from flannel.decode import InputError
from flannel.preprocess import PreprocessSpec, load_tensor

log = logging.getLogger(__name__)

# Seeds the choice of report images, so reruns of a report show the same radiographs.
REPORT_SEED = 0
REPORT_SPLIT = "test"
OVERLAY_DPI = 100


def _fp32(model: nn.Module) -> nn.Module:
    """The model itself when it is fp32, else an fp32 copy (the caller's model is not converted)."""
    if all(p.dtype == torch.float32 for p in model.parameters()):
        return model
    return copy.deepcopy(model).float()


def gradcam_map(model: nn.Module, arch: str, tensor: torch.Tensor,
                target: int | None = None) -> np.ndarray:
    """Grad-CAM of one preprocessed image.

    Args:
        model: a registry model; left in the mode, flags and state it came in.
        arch: its registry name (picks the explained layer).
        tensor: one model input, (C, H, W) or (1, C, H, W), as ``load_tensor`` returns it.
        target: class index to explain; None explains the predicted class.

    Returns:
        float32 (H, W) map in [0, 1] at the input's spatial size.
    """
    return gradcam_and_probabilities(model, arch, tensor, target)[0]


def gradcam_and_probabilities(model: nn.Module, arch: str, tensor: torch.Tensor,
                              target: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``gradcam_map`` plus the class probabilities of the same forward pass.

    Returns:
        The (H, W) map and the (num_classes,) softmax.
    """
    model32 = _fp32(model)
    device = next(model32.parameters()).device
    return learner_cam(model32, arch, tensor.to(device=device, dtype=torch.float32), target)


def displayed_image(tensor: torch.Tensor, spec: PreprocessSpec) -> np.ndarray:
    """Undo the normalisation: the centre-cropped grayscale input, (H, W) in [0, 1]."""
    gray = tensor[0].detach().cpu().float() * spec.std[0] + spec.mean[0]
    return gray.clamp(0.0, 1.0).numpy()


def save_overlay(gray: np.ndarray, heat: np.ndarray, title: str, path: Path) -> Path:
    """Write the heat map over the grayscale image as a titled PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overlay = cam_overlay(gray, heat)
    fig, ax = plt.subplots(figsize=(4, 4.4))
    ax.imshow(overlay)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=OVERLAY_DPI)
    plt.close(fig)
    return path


def _title(source: Path, class_names: list[str], probs: np.ndarray, target: int | None,
           truth: str | None) -> str:
    predicted = int(probs.argmax())
    lines = [source.name, f"predicted {class_names[predicted]} ({probs[predicted]:.2f})"]
    if truth is not None:
        lines[1] = f"true {truth}, " + lines[1]
    if target is not None:
        lines.append(f"heat map for {class_names[target]} ({probs[target]:.2f})")
    return "\n".join(lines)


def _unique_png(out_dir: Path, stem: str, used: set[str]) -> Path:
    name, n = f"{stem}.png", 1
    while name in used:
        n += 1
        name = f"{stem}-{n}.png"
    used.add(name)
    return out_dir / name


def _write_overlays(ckpt: Checkpoint, items: Sequence[tuple[Path, str | None]], out_dir: Path,
                    target: int | None) -> tuple[list[Path], list[InputError]]:
    """Overlay every (image, true label or None) item; unreadable files are returned, not raised."""
    model = ckpt.build_model()
    written, failures, used = [], [], set()
    for source, truth in items:
        try:
            tensor = load_tensor(source, ckpt.preprocess)
        except InputError as exc:
            failures.append(exc)
            continue
        heat, probs = gradcam_and_probabilities(model, ckpt.arch, tensor, target)
        title = _title(source, ckpt.class_names, probs, target, truth)
        stem = source.stem if truth is None else f"{truth}-{source.stem}"
        written.append(save_overlay(displayed_image(tensor, ckpt.preprocess), heat, title,
                                    _unique_png(out_dir, stem.replace(" ", "_"), used)))
    return written, failures


def _checkpoint_path(run_dir_or_checkpoint: str | Path) -> Path:
    path = Path(run_dir_or_checkpoint)
    return path / "best.pt" if path.is_dir() else path


def explain_images(run_dir_or_checkpoint: str | Path, image_paths: Sequence[str | Path],
                   out_dir: str | Path, target: int | str | None = None) -> list[Path]:
    """Write one Grad-CAM overlay PNG per image.

    Args:
        run_dir_or_checkpoint: a run folder (its ``best.pt`` is used) or a checkpoint file.
        image_paths: PNG, JPEG or DICOM files, preprocessed exactly as the server does.
        out_dir: folder for the PNGs (created; existing files of other names are kept).
        target: class name or index to explain; None explains each image's predicted class.

    Returns:
        The written PNG paths, in input order.

    Raises:
        InputError: after all readable images are written, naming every file that failed.
    """
    ckpt = load_checkpoint(_checkpoint_path(run_dir_or_checkpoint))
    index = resolve_target(target, ckpt.class_names)
    items = [(Path(p), None) for p in image_paths]
    written, failures = _write_overlays(ckpt, items, Path(out_dir), index)
    if failures:
        detail = "; ".join(str(exc) for exc in failures)
        raise type(failures[0])(f"{len(failures)} of {len(items)} images not explained: {detail}")
    return written


def pick_report_rows(rows: Sequence[ManifestRow], class_names: Sequence[str], per_class: int,
                     seed: int = REPORT_SEED) -> list[ManifestRow]:
    """Up to ``per_class`` test-split rows of each class, chosen reproducibly.

    Args:
        rows: manifest rows (any splits; only the test split is used).
        class_names: classes in output order.
        per_class: rows per class.
        seed: seeds the choice.

    Returns:
        Rows grouped by class in ``class_names`` order.
    """
    by_class: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: r.path):
        if row.split == REPORT_SPLIT:
            by_class[row.label].append(row)
    rng = random.Random(seed)
    picked = []
    for name in class_names:
        candidates = by_class.get(name, [])
        picked += rng.sample(candidates, min(per_class, len(candidates)))
    return picked


def report_overlays(run_dir: str | Path, ckpt: Checkpoint, rows: Sequence[ManifestRow],
                    per_class: int = 2, out_dir: str | Path | None = None) -> list[Path]:
    """Grad-CAM overlays of a few test images per class for the training report.

    Args:
        run_dir: the run folder.
        ckpt: the checkpoint the report describes.
        rows: manifest rows (the test split is used).
        per_class: images per class.
        out_dir: folder for the PNGs; default ``run_dir/gradcam``.

    Returns:
        The written PNG paths, grouped by class. Unreadable images are logged and skipped.
    """
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "gradcam"
    picked = pick_report_rows(rows, ckpt.class_names, per_class)
    written, failures = _write_overlays(ckpt, [(Path(r.path), r.label) for r in picked], out, None)
    for exc in failures:
        log.warning("Grad-CAM overlay skipped: %s", exc)
    return written
