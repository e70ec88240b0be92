"""`flannel predict`: send image files to a running TorchServe over HTTP or gRPC.

    flannel predict a.png b.dcm --model resnet18 --protocol http --config config.properties
    flannel predict a.png --json       # the full answers, one JSON object per line

The inference token is read from the key_file.json next to the config and renewed first when it
has expired (TorchServe's token API, with the file's API key); addresses come from the config. Prints one tab-separated line per file: file, status, prediction and its probability (or
the error).
"""
from __future__ import annotations

import argparse
import json

from flannel.handlers.client import predict_grpc, predict_http
from flannel.handlers.serve_control import ServeError, current_token, server_info, server_status


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="PNG, JPEG or DICOM files")
    parser.add_argument("--model", default=None,
                        help="served model name (default: the only model the server serves)")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--config", default="config.properties", help="TorchServe config.properties")
    parser.add_argument("--token", default=None, help="inference key (default: from key_file.json)")
    parser.add_argument("--json", action="store_true",
                        help="print each full answer as one JSON line: file, status, body")
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
    model = args.model
    if model is None:
        running = server_status(args.config)
        served = sorted(running.models) if running else []
        if len(served) != 1:
            print(f"error: give --model: the server of {info.config} serves "
                  f"{', '.join(served) if served else 'no model'}")
            return 2
        model = served[0]
    if args.protocol == "http":
        results = predict_http(args.files, model, url=info.inference_url, token=token)
    else:
        results = predict_grpc(args.files, model, target=info.grpc_inference, token=token)
    for result in results:
        print(json.dumps({"file": result.file, "status": result.status,
                          "body": result.body if result.body is not None else result.text})
              if args.json else result.summary())
    if any(r.refused_key for r in results):
        print("error: TorchServe refused the inference key: it is wrong or has expired (keys "
              "expire after token_expiration_min minutes); leave out --token to read and renew "
              f"the key from {info.key_file}")
    return 0 if all(r.ok for r in results) else 1
