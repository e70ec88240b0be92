"""`flannel dicomweb`: send new CR/DX instances of a PACS to the served model and store each
answer back in the PACS as a Structured Report.

    flannel dicomweb --url http://127.0.0.1:8042/dicom-web --model resnet18 --once
    flannel dicomweb --url http://pacs/dicom-web --model resnet18 --since 20240101 \\
        --poll 60 --state dicomweb_state.sqlite --report outcomes.csv

The server's addresses and key come from --config (the key as in `flannel predict`). Prints a
progress bar and one summary line; exits 0 when every instance was answered or skipped, 1 when
any was refused or failed, 2 when the PACS could not be searched. SIGINT or SIGTERM ends a
polling bridge after the instance in flight.
"""
from __future__ import annotations

import argparse
import re
import signal
import threading
from pathlib import Path

from flannel.handlers.client import PROTOCOLS, Client
from flannel.handlers.dicomweb import DicomWebError
from flannel.handlers.pacs_bridge import (FAILED, REFUSED, SR_KEY, BridgeConfig, run_bridge)
from flannel.handlers.predict_cli import given_key
from flannel.handlers.ts_config import ServeError


def study_date(text: str) -> str:
    if not re.fullmatch(r"\d{8}", text):
        raise argparse.ArgumentTypeError(f"expected YYYYMMDD, got {text[:20]!r}")
    return text


def register(parser: argparse.ArgumentParser) -> None:
    parser.allow_abbrev = False  # --token must not abbreviate --token-file
    parser.add_argument("--url", required=True,
                        help="the PACS's DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    parser.add_argument("--model", required=True, help="served model name")
    parser.add_argument("--since", type=study_date, default=None, metavar="YYYYMMDD",
                        help="only studies dated this day or later")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="http",
                        help="how the model server is asked")
    parser.add_argument("--config", default="config.properties",
                        help="the model server's config.properties")
    parser.add_argument("--token-file", default=None, metavar="FILE",
                        help="a file holding the inference key (default: as flannel predict)")
    parser.add_argument("--state", default="dicomweb_state.sqlite", metavar="FILE",
                        help="SQLite file of instances already answered: never sent again")
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--once", action="store_true", help="search once and stop (default)")
    when.add_argument("--poll", type=float, default=None, metavar="SECONDS",
                      help="search again every SECONDS until interrupted")
    parser.add_argument("--report", default=None, metavar="FILE",
                        help="every instance's outcome: CSV for .csv, else JSON lines")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = BridgeConfig(url=args.url, model=args.model, since=args.since,
                          protocol=args.protocol, server_config=Path(args.config),
                          state=Path(args.state), poll_s=args.poll,
                          report=Path(args.report) if args.report else None)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        client = Client.from_config(config.server_config, model=config.model,
                                    token=given_key(args.token_file))
        summary = run_bridge(config, lambda files: client.predict(
            files, protocol=config.protocol, dicom_out=SR_KEY), stop=stop)
    except (ServeError, DicomWebError) as exc:
        print(f"error: {exc}")
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(summary.line())
    return 1 if summary.count(REFUSED) or summary.count(FAILED) else 0
