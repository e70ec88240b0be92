"""The `flannel` command: one subcommand group per stage, each a thin wrapper over a function.

    flannel --help
    flannel data synth data/synth && flannel train --data data/synth ...

Each stage module exposes ``register(subparsers)``, which adds its subcommands and sets
``func`` to a callable taking the parsed args and returning an exit code.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Stage modules, imported lazily so `flannel data ...` does not pay for onnxruntime or grpc.
STAGES = {
    "data": "flannel.data.cli",
    "train": "flannel.train.cli",
    "ensemble": "flannel.train.ensemble",
    "evaluate": "flannel.train.external",
    "explain": "flannel.train.explain_cli",
    "export": "flannel.export.cli",
    "archive": "flannel.handlers.archive_cli",
    "card": "flannel.card_cli",
    "serve": "flannel.handlers.serve_cli",
    "predict": "flannel.handlers.predict_cli",
    "dicomweb": "flannel.handlers.dicomweb_cli",
    "bench": "flannel.benchmarks.cli",
    "gpu-check": "flannel.benchmarks.gpu_check_cli",
    "demo": "flannel.demo",
}
# Libraries that log one INFO line per internal step (the ONNX exporter's passes); their lines
# are kept for `flannel -v`.
CHATTY_LOGGERS = ("onnxscript", "onnx_ir")
HELP = {
    "data": "datasets: synth, audit, split, fetch",
    "train": "train one base learner and write a run folder",
    "ensemble": "FLANNEL's fusion of the best k learners: train, eval",
    "evaluate": "external validation of a run's checkpoint on other dataset folders",
    "explain": "Grad-CAM overlays of a trained learner for image files",
    "export": "ONNX export and the PyTorch/ONNX Runtime parity gate",
    "archive": "build a TorchServe .mar from a run folder",
    "card": "print the model card inside a .mar, an export folder or a run folder",
    "serve": "start, stop or inspect TorchServe with config.properties",
    "predict": "send images to a running server over HTTP or gRPC",
    "dicomweb": "PACS bridge: new CR/DX instances to the model, its reports back (DICOMweb)",
    "bench": "benchmarks: model backends, a live server under load, training throughput",
    "gpu-check": "a GPU host end to end: GPU tests, GPU gates, benchmarks, nvJPEG, one report",
    "demo": "the whole pipeline on synthetic data, ending with a served model",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flannel", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    wanted = next((a for a in argv if a in STAGES), None)
    for name, module in STAGES.items():
        if wanted is None or name == wanted:
            stage = sub.add_parser(name, help=HELP[name], description=HELP[name])
            importlib.import_module(module).register(stage)
        else:
            sub.add_parser(name, help=HELP[name])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger().setLevel(level)  # also when a host (pytest, a notebook) set up handlers
    if not args.verbose:
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
