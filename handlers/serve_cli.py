"""`flannel serve start|stop|status`: TorchServe for a config.properties, token auth on.

    flannel serve start --config config.properties
    flannel serve status
    flannel serve stop
    flannel serve container-config OUT   # the config a container serves with (see Dockerfile)
"""
from __future__ import annotations

import argparse

from flannel.handlers.ts_config import ServeError, container_config
from flannel.handlers.ts_process import server_status, start_server, stop_server


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    start = sub.add_parser("start", help="start TorchServe and wait for ready workers")
    start.add_argument("--model-store", default=None, help="overrides the config's model_store")
    start.add_argument("--timeout", type=float, default=120, help="seconds to wait for workers")
    start.add_argument("--no-wait", action="store_true", help="return once the JVM is launched")
    start.set_defaults(func=run_start)
    stop = sub.add_parser("stop", help="stop TorchServe and wait for it to exit")
    stop.set_defaults(func=run_stop)
    status = sub.add_parser("status", help="is it running; ready workers per model")
    status.set_defaults(func=run_status)
    container = sub.add_parser("container-config",
                               help="write the config a container serves with: inference on "
                                    "all its interfaces, the rest as --config has it")
    container.add_argument("out", help="where to write it")
    container.set_defaults(func=run_container_config)
    for p in (start, stop, status, container):
        p.add_argument("--config", default="config.properties", help="TorchServe config.properties")


def run_container_config(args: argparse.Namespace) -> int:
    print(f"wrote {container_config(args.config, args.out)}")
    return 0


def run_start(args: argparse.Namespace) -> int:
    try:
        info = start_server(args.config, args.model_store, wait=not args.no_wait, timeout=args.timeout)
    except ServeError as exc:
        print(f"error: {exc}")
        return 1
    print(info.describe())
    print(f"send requests with: Authorization: Bearer <inference key from {info.key_file}>")
    return 0


def run_stop(args: argparse.Namespace) -> int:
    try:
        stopped = stop_server(args.config)
    except ServeError as exc:
        print(f"error: {exc}")
        return 1
    print("TorchServe stopped" if stopped else "TorchServe was not running for this config")
    return 0


def run_status(args: argparse.Namespace) -> int:
    info = server_status(args.config)
    if info is None:
        print("TorchServe is not running for this config")
        return 3
    print(info.describe())
    return 0
