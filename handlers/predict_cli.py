"""`flannel predict`: send image files to a running TorchServe over HTTP or gRPC.

    flannel predict a.png b.dcm --model resnet18 --protocol http --config config.properties

The inference token is read from the key_file.json next to the config and renewed first when it
has expired (TorchServe's token API, with the file's API key); addresses come from the config. Prints one tab-separated line per file: file, status, prediction and its probability (or
the error).
"""
from __future__ import annotations

import argparse

from flannel.handlers.client import predict_grpc, predict_http
from flannel.handlers.serve_control import ServeError, current_token, server_info


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
        try:
            token = current_token(info)  # renewed first when it has expired
        except ServeError as exc:
            print(f"error: {exc}")
            return 2
    if args.protocol == "http":
        results = predict_http(args.files, args.model, url=info.inference_url, token=token)
    else:
        results = predict_grpc(args.files, args.model, target=info.grpc_inference, token=token)
    for result in results:
        print(result.summary())
    if any(r.refused_key for r in results):
        print("error: TorchServe refused the inference key: it is wrong or has expired (keys "
              "expire after token_expiration_min minutes); leave out --token to read and renew "
              f"the key from {info.key_file}")
    return 0 if all(r.ok for r in results) else 1
