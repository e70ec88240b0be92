"""`flannel serve start|stop|status`: TorchServe (or Triton) for a config.properties, keys on.

    flannel serve start --config config.properties
    flannel serve start --runtime triton     # the same archives and addresses on Triton (KServe v2)
    flannel serve status
    flannel serve stop
    flannel serve container-config OUT   # the config a container serves with (see Dockerfile)
    flannel serve probe                  # exit 0 when /ping says Healthy (key sent when needed)
    flannel serve proxy-secret | kubectl apply -f -    # the key every replica accepts
"""
from __future__ import annotations

import argparse

from pathlib import Path

from flannel.handlers.ts_config import ServeError, container_config
from flannel.handlers.ts_process import server_status, start_server, stop_server

RUNTIMES = ("torchserve", "triton")


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    start = sub.add_parser("start", help="start TorchServe (or Triton) and wait for ready models")
    start.add_argument("--runtime", choices=RUNTIMES, default="torchserve",
                       help="torchserve: every protocol (HTTP, gRPC, v2, v2 gRPC); triton: "
                            "Triton Inference Server, KServe v2 over REST and gRPC "
                            "(flannel.handlers.triton_process)")
    start.add_argument("--model-store", default=None, help="overrides the config's model_store")
    start.add_argument("--export", default=None, metavar="RUN_DIR",
                       help="with --runtime triton: serve this run's export instead of a store "
                            "(archived privately first, with every check `flannel archive` makes)")
    start.add_argument("--allow-unvalidated", action="store_true",
                       help="with --export: serve a model no external evaluation has seen")
    start.add_argument("--timeout", type=float, default=120, help="seconds to wait for workers")
    start.add_argument("--no-wait", action="store_true", help="return once the JVM is launched")
    start.set_defaults(func=run_start)
    stop = sub.add_parser("stop", help="stop the server (either runtime) and wait for it to exit")
    stop.set_defaults(func=run_stop)
    status = sub.add_parser("status", help="is it running; ready workers per model")
    status.set_defaults(func=run_status)
    container = sub.add_parser("container-config",
                               help="write the config a container serves with: inference on "
                                    "all its interfaces, the rest as --config has it")
    container.add_argument("out", help="where to write it")
    container.add_argument("--behind-proxy", action="store_true",
                           help="every endpoint on loopback and TorchServe's token authorization "
                                "off: the pod's proxy checks the key (deploy/kubernetes.yaml)")
    container.add_argument("--model-store", default=None,
                           help="an absolute model store, for a server run from another folder")
    container.set_defaults(func=run_container_config)
    probe = sub.add_parser("probe", help="health probe: exit 0 when /ping answers Healthy, sending "
                                         "the inference key when token authorization is on")
    probe.add_argument("--workdir", default=None,
                       help="TorchServe's working folder (its key_file.json); default the "
                            "config's folder")
    probe.set_defaults(func=run_probe)
    proxy = sub.add_parser("proxy-config", help="write the nginx.conf of the pod's authenticating "
                                                "proxy for a --behind-proxy config")
    proxy.add_argument("out", help="where to write it")
    proxy.set_defaults(func=run_proxy_config)
    secret = sub.add_parser("proxy-secret", help="print a Kubernetes Secret with a fresh key for the "
                                                 "proxy (kubectl apply -f -)")
    secret.add_argument("--name", default="flannel-cxr-keys", help="the Secret's name")
    secret.add_argument("--keep", default=None, metavar="FILE",
                        help="keys (one a line) still accepted beside the new one, for rotation")
    secret.set_defaults(func=run_proxy_secret)
    for p in (start, stop, status, container, probe, proxy):
        p.add_argument("--config", default="config.properties", help="TorchServe config.properties")


def run_container_config(args: argparse.Namespace) -> int:
    out = container_config(args.config, args.out, behind_proxy=args.behind_proxy,
                           model_store=args.model_store)
    print(f"wrote {out}")
    return 0


def run_probe(args: argparse.Namespace) -> int:
    from flannel.handlers.probe import probe

    result = probe(args.config, args.workdir)
    print(result.message)
    return 0 if result.healthy else 1


def run_proxy_config(args: argparse.Namespace) -> int:
    from flannel.handlers.proxy import nginx_config

    Path(args.out).write_text(nginx_config(args.config))
    print(f"wrote {args.out}")
    return 0


def run_proxy_secret(args: argparse.Namespace) -> int:
    from flannel.handlers.proxy import new_key, proxy_secret

    kept = Path(args.keep).read_text().split() if args.keep else []
    try:
        print(proxy_secret(args.name, [new_key(), *kept]), end="")
    except ValueError as exc:
        print(f"error: {exc}")
        return 1
    return 0


def run_start(args: argparse.Namespace) -> int:
    if args.runtime == "triton":
        from flannel.handlers.triton_process import describe, start_triton

        try:
            info = start_triton(args.config, args.model_store, timeout=max(args.timeout, 60),
                                export=args.export, allow_unvalidated=args.allow_unvalidated)
        except ServeError as exc:
            print(f"error: {exc}")
            return 1
        print(describe(info))
        print(f"send requests with: Authorization: Bearer <key from {info.key_file}>")
        return 0
    if args.export:
        print("error: --export serves on Triton (--runtime triton); for TorchServe, `flannel "
              "archive` the run into the model store")
        return 2
    try:
        info = start_server(args.config, args.model_store, wait=not args.no_wait, timeout=args.timeout)
    except ServeError as exc:
        print(f"error: {exc}")
        return 1
    print(info.describe())
    print(f"send requests with: Authorization: Bearer <inference key from {info.key_file}>")
    return 0


def run_stop(args: argparse.Namespace) -> int:
    from flannel.handlers.triton_process import stop_triton

    if stop_triton(args.config):
        print("Triton stopped")
        return 0
    try:
        stopped = stop_server(args.config)
    except ServeError as exc:
        print(f"error: {exc}")
        return 1
    print("TorchServe stopped" if stopped else "TorchServe was not running for this config")
    return 0


def run_status(args: argparse.Namespace) -> int:
    from flannel.handlers.triton_process import describe, triton_info

    triton = triton_info(args.config)
    if triton is not None:
        print(describe(triton))
        return 0
    info = server_status(args.config)
    if info is None:
        print("TorchServe is not running for this config")
        return 3
    print(info.describe())
    return 0
