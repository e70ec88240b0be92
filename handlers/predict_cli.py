"""`flannel predict`: send image files to a running TorchServe over HTTP or gRPC.

    flannel predict a.png b.dcm --model resnet18 --protocol http --config config.properties

The inference token is read from the key_file.json next to the config; addresses come from the
config. Prints one tab-separated line per file: file, status, prediction and its probability (or
the error).
"""
from __future__ import annotations

import argparse

from flannel.handlers.client import predict_grpc, predict_http
from flannel.handlers.serve_control import read_tokens, server_info


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="PNG, JPEG or DICOM files")
    parser.add_argument("--model", required=True, help="served model name")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--config", default="config.properties", help="TorchServe config.properties")
    parser.add_argument("--token", default=None, help="inference key (default: from key_file.json)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    info = server_info(args.config)
    token = args.token
    if token is None:
        if not info.key_file.is_file():
            print(f"error: no {info.key_file}: is TorchServe running for {info.config}?")
            return 2
        token = read_tokens(info.key_file)["inference"]
    if args.protocol == "http":
        results = predict_http(args.files, args.model, url=info.inference_url, token=token)
    else:
        results = predict_grpc(args.files, args.model, target=info.grpc_inference, token=token)
    for result in results:
        print(result.summary())
    return 0 if all(r.ok for r in results) else 1
