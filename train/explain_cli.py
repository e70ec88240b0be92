"""`flannel explain`: Grad-CAM overlays of a trained learner for a few image files.

    flannel explain runs/resnet18 a.png b.dcm --out runs/resnet18/explain --target COVID-19

Prints one written PNG per line. Unreadable files are named on stderr after the others are
written, and the exit code is then 1; a missing checkpoint or an unknown class exits with 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flannel.decode import InputError
from flannel.train.gradcam import explain_images


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run folder (uses best.pt) or a .pt")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG or DICOM files")
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR/explain)")
    parser.add_argument("--target", default=None, metavar="CLASS",
                        help="class to explain (default: each image's predicted class)")
    parser.set_defaults(func=run)


def default_out_dir(run_dir_or_checkpoint: str | Path) -> Path:
    """``RUN_DIR/explain``; for a checkpoint file, ``explain/`` beside it."""
    path = Path(run_dir_or_checkpoint)
    return (path if path.is_dir() else path.parent) / "explain"


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else default_out_dir(args.run_dir)
    try:
        written = explain_images(args.run_dir, args.images, out, target=args.target)
    except InputError as exc:  # the readable images are written by now
        print(f"error: {exc}; the other overlays are in {out}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as exc:  # unknown class, not a checkpoint
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
