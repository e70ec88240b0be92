"""`flannel train`: train one base learner and write its run folder and report.

    flannel train --manifest data/manifest.csv --arch resnet18 --epochs 5 --out runs/resnet18
    flannel train --resume runs/resnet18 --epochs 10      # continue from last.pt

Every training option lives in ``add_train_options`` and becomes a ``TrainConfig`` in
``config_from_args``, so the subcommands built on training (cross-validation, architecture
comparison) take exactly the same options.
"""
from __future__ import annotations

import argparse
import json

from flannel.preprocess import INTENSITIES
from flannel.registry import ARCHITECTURES
from flannel.train.augment import PRESETS
from flannel.train.config import (CLASS_BALANCE, LOSSES, NORMALIZATIONS, OPTIMIZERS, PRECISIONS,
                                  SCHEDULES, TrainConfig)


def add_train_options(parser: argparse.ArgumentParser, manifest_required: bool = True) -> None:
    """The options of one training run (shared by `train`, `train cv` and `train compare`)."""
    d = TrainConfig(manifest="")
    parser.add_argument("--manifest", required=manifest_required,
                        help="split manifest CSV (flannel data split)")
    parser.add_argument("--out", default=d.out, help="run folder")
    parser.add_argument("--arch", default=d.arch, choices=sorted(ARCHITECTURES))
    parser.add_argument("--scheme", default=d.scheme, choices=("3class", "4class"))
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS)
    parser.add_argument("--schedule", default=d.schedule, choices=SCHEDULES,
                        help="learning-rate schedule (warm-up length: --warmup-epochs)")
    parser.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    parser.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    parser.add_argument("--ema-decay", type=float, default=d.ema_decay,
                        help="EMA of weights and BatchNorm statistics per step (0 = off)")
    parser.add_argument("--loss", default=d.loss, choices=LOSSES)
    parser.add_argument("--focal-gamma", type=float, default=d.focal_gamma)
    parser.add_argument("--focal-alpha", type=_floats, default=None,
                        help="per-class alpha, comma-separated (default: inverse class frequency)")
    parser.add_argument("--class-balance", default=d.class_balance, choices=CLASS_BALANCE,
                        help="loss: inverse-frequency loss weights; sampler: class-balanced batches")
    parser.add_argument("--input-size", type=int, default=None,
                        help="model input side (default: the architecture's native size)")
    parser.add_argument("--normalization", default=d.normalization, choices=NORMALIZATIONS,
                        help="mean/std from ImageNet or from the training split's own pixels")
    parser.add_argument("--intensity", default=d.intensity, choices=INTENSITIES,
                        help="intensity harmonisation in the preprocessing spec (every stage)")
    parser.add_argument("--weights", default=None,
                        help="DEFAULT or a torchvision enum name (needs a network), or a local file")
    parser.add_argument("--freeze", default=d.freeze, help="none | head | last:FRACTION")
    parser.add_argument("--augment", default=d.augment, choices=sorted(PRESETS))
    parser.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                        help="auto picks bf16 on CPUs with native bf16, fp16 on CUDA, else fp32")
    parser.add_argument("--patience", type=int, default=d.patience)
    parser.add_argument("--precise-bn-batches", type=int, default=d.precise_bn_batches,
                        help="training batches that recompute BatchNorm statistics before each "
                             "validation (0 = keep the running averages)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--threads", type=int, default=None)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the parsed options describe."""
    return TrainConfig(manifest=args.manifest, out=args.out, arch=args.arch, scheme=args.scheme,
                       epochs=TrainConfig.epochs if args.epochs is None else args.epochs,
                       batch_size=args.batch_size, lr=args.lr,
                       weight_decay=args.weight_decay, optimizer=args.optimizer,
                       schedule=args.schedule, warmup_epochs=args.warmup_epochs,
                       label_smoothing=args.label_smoothing, ema_decay=args.ema_decay,
                       loss=args.loss,
                       focal_gamma=args.focal_gamma, focal_alpha=args.focal_alpha,
                       class_balance=args.class_balance, input_size=args.input_size,
                       normalization=args.normalization, intensity=args.intensity,
                       weights=args.weights, freeze=args.freeze, augment=args.augment,
                       precision=args.precision, patience=args.patience,
                       precise_bn_batches=args.precise_bn_batches, seed=args.seed,
                       deterministic=args.deterministic, threads=args.threads)


def register(parser: argparse.ArgumentParser) -> None:
    add_train_options(parser, manifest_required=False)
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue RUN_DIR from last.pt (its config; --epochs may extend it)")
    # None tells --resume that --epochs was not given (the run keeps its own).
    parser.set_defaults(func=run, epochs=None)
    sub = parser.add_subparsers(dest="train_command", metavar="COMMAND")
    from flannel.train import compare, cv  # imported here: they import this module
    for module in (cv, compare):  # subcommand modules register here
        module.register_subcommand(sub)


def run(args: argparse.Namespace) -> int:
    from flannel.train.loop import resume_run, train_learner

    if args.resume:
        result = resume_run(args.resume, epochs=args.epochs)
    else:
        if not args.manifest:
            raise SystemExit("flannel train: --manifest is required (or --resume RUN_DIR)")
        result = train_learner(config_from_args(args))
    if not result.report:  # a torchrun rank other than 0: rank 0 reports
        return 0
    print((result.run_dir / "report.md").read_text())
    test = result.report.get("test", result.report["val"])
    print(json.dumps({"run_dir": str(result.run_dir), "best_epoch": result.best_epoch,
                      "accuracy": round(test["accuracy"], 4),
                      "macro_f1": round(test["macro_f1"], 4)}))
    epoch = result.report.get("training", {}).get("collapsed_at_epoch")
    if epoch:
        from flannel.train.loop import collapse_message

        message = collapse_message(result.report["arch"], epoch, result.report["config"]["lr"])
        raise SystemExit(f"flannel train: {message}")
    return 0
