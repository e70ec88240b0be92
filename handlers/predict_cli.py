"""`flannel predict`: send image files to a running TorchServe and print the answers.

    flannel predict a.png b.dcm --model resnet18 --protocol http --config config.properties
    flannel predict a.png --protocol v2          # Open Inference Protocol (v2-grpc: its gRPC)
    flannel predict a.png --json                 # the full answers, one JSON object per line
    flannel predict a.png --explain overlays/    # plus a Grad-CAM overlay PNG per file

The inference key is read from the key_file.json next to the config and renewed when it has
expired; a key given with ``--token-file FILE`` (the key alone, or a copy of a key_file.json) or
in ``FLANNEL_INFERENCE_KEY`` is used as it is (never on the command line, where every local
user can read it). Addresses come from the config. A file without a usable answer (connection
lost, 503, a worker that died) is sent again with backoff (``flannel.handlers.client``). Prints
one tab-separated line per file: file, status, prediction and its probability (or the error).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from flannel.handlers.client import PROTOCOLS, Client
from flannel.handlers.keys import KEY_ENV, read_key_file
from flannel.handlers.ts_config import ServeError


class _RefuseKeyArgument(argparse.Action):
    """``--token KEY`` would show the key to every local user (ps, /proc): refused, saying what
    to use instead."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is not accepted: a key on the command line is visible to "
                     f"every local user; use --token-file FILE or {KEY_ENV}")


def register(parser: argparse.ArgumentParser) -> None:
    parser.allow_abbrev = False  # --token must not abbreviate --token-file
    parser.add_argument("files", nargs="+", metavar="FILE", help="PNG, JPEG or DICOM files")
    parser.add_argument("--model", default=None,
                        help="served model name (default: the only model the server serves)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="http",
                        help="http and grpc: TorchServe's own APIs; v2 and v2-grpc: the Open "
                             "Inference Protocol (KServe v2)")
    parser.add_argument("--config", default="config.properties", help="TorchServe config.properties")
    parser.add_argument("--token-file", default=None, metavar="FILE",
                        help=f"a file holding the inference key, or a key_file.json (default: "
                             f"${KEY_ENV}, else the key_file.json beside --config, renewed "
                             f"when it expires)")
    parser.add_argument("--token", action=_RefuseKeyArgument, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true",
                        help="print each full answer as one JSON line: file, status, body")
    parser.add_argument("--explain", default=None, metavar="DIR",
                        help="ask /explanations instead and write each Grad-CAM overlay to "
                             "DIR/<file>.gradcam.png (HTTP)")
    parser.add_argument("--target", default=None,
                        help="with --explain: the class to explain (default: the prediction)")
    parser.add_argument("--learner", default=None,
                        help="with --explain: explain one learner of an ensemble")
    parser.add_argument("--dicom-out", default=None, metavar="DIR",
                        help="for DICOM files: ask for the results as DICOM and write them to "
                             "DIR/<file>.sr.dcm (a Structured Report) and, with --dicom-objects "
                             "sr,sc, DIR/<file>.sc.dcm (the Grad-CAM overlay as a Secondary "
                             "Capture); any protocol")
    parser.add_argument("--dicom-objects", default="sr", metavar="KINDS",
                        help="with --dicom-out: sr (default) or sr,sc")
    parser.set_defaults(func=run)


def write_private(path: Path, data: bytes) -> Path:
    """Write ``data`` readable by its owner only (a DICOM result carries patient data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def given_key(token_file: str | None) -> str | None:
    """The key ``--token-file`` or ``KEY_ENV`` gives, or None to use the server's key file."""
    if token_file:
        return read_key_file(token_file)
    return os.environ.get(KEY_ENV, "").strip() or None


def run(args: argparse.Namespace) -> int:
    try:
        client = Client.from_config(args.config, model=args.model,
                                    token=given_key(args.token_file))
        if args.explain:
            results = client.explain(args.files, target=args.target, learner=args.learner)
        else:
            results = client.predict(args.files, protocol=args.protocol,
                                     dicom_out=args.dicom_objects if args.dicom_out else None)
    except ServeError as exc:
        print(f"error: {exc}")
        return 2
    for result in results:
        print(json.dumps({"file": result.file, "status": result.status,
                          "body": result.body if result.body is not None else result.text})
              if args.json else result.summary())
        if args.explain and result.overlay_png:
            out = Path(args.explain) / f"{Path(result.file).name}.gradcam.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(result.overlay_png)
            if not args.json:
                print(f"{result.file}\toverlay\t{out}")
        if args.dicom_out:
            for kind, data in result.dicom_objects.items():
                out = write_private(Path(args.dicom_out) / f"{Path(result.file).name}.{kind}.dcm",
                                    data)
                if not args.json:
                    print(f"{result.file}\t{kind}\t{out}")
    if any(r.refused_key for r in results):
        print("error: TorchServe refused the inference key: it is wrong or has expired (keys "
              f"expire after token_expiration_min minutes); leave out --token-file and "
              f"{KEY_ENV} to read and renew the key from {client.info.key_file}")
    return 0 if all(r.ok for r in results) else 1
