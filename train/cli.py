"""`flannel train`: train one base learner and write its run folder and report.

    flannel train --manifest data/manifest.csv --arch resnet18 --epochs 5 --out runs/resnet18
"""
from __future__ import annotations

import argparse
import json

from flannel.registry import ARCHITECTURES
from flannel.train.augment import PRESETS
from flannel.train.config import OPTIMIZERS, TrainConfig


def register(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig(manifest="")
    parser.add_argument("--manifest", required=True, help="split manifest CSV (flannel data split)")
    parser.add_argument("--out", default=d.out, help="run folder")
    parser.add_argument("--arch", default=d.arch, choices=sorted(ARCHITECTURES))
    parser.add_argument("--scheme", default=d.scheme, choices=("3class", "4class"))
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS)
    parser.add_argument("--input-size", type=int, default=None,
                        help="model input side (default: the architecture's native size)")
    parser.add_argument("--weights", default=None,
                        help="DEFAULT or a torchvision enum name (needs a network), or a local file")
    parser.add_argument("--freeze", default=d.freeze, help="none | head | last:FRACTION")
    parser.add_argument("--augment", default=d.augment, choices=sorted(PRESETS))
    parser.add_argument("--class-balance", default=d.class_balance, choices=("none", "loss"))
    parser.add_argument("--patience", type=int, default=d.patience)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flannel.train.loop import train_learner

    cfg = TrainConfig(manifest=args.manifest, out=args.out, arch=args.arch, scheme=args.scheme,
                      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      weight_decay=args.weight_decay, optimizer=args.optimizer,
                      input_size=args.input_size, weights=args.weights, freeze=args.freeze,
                      augment=args.augment, class_balance=args.class_balance,
                      patience=args.patience, seed=args.seed, deterministic=args.deterministic,
                      threads=args.threads)
    result = train_learner(cfg)
    print((result.run_dir / "report.md").read_text())
    test = result.report.get("test", result.report["val"])
    print(json.dumps({"run_dir": str(result.run_dir), "best_epoch": result.best_epoch,
                      "accuracy": round(test["accuracy"], 4),
                      "macro_f1": round(test["macro_f1"], 4)}))
    return 0
