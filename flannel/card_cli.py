"""`flannel card`: print the model card an archive carries (``flannel.model_card``).

    flannel card model_store/ensemble.mar          # MODEL_CARD.md from inside the archive
    flannel card model_store/ensemble.mar --json   # model_card.json
    flannel card runs/demo/ensemble                # the card the last archive wrote into export/
"""
from __future__ import annotations

import argparse
import sys

from flannel.model_card import CARD_JSON, CARD_MARKDOWN, CardError, read_card


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="MAR_OR_DIR",
                        help="a .mar archive, an export folder or a run folder holding export/")
    parser.add_argument("--json", action="store_true", help=f"print {CARD_JSON} instead of "
                        f"{CARD_MARKDOWN}")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        text = read_card(args.source, CARD_JSON if args.json else CARD_MARKDOWN)
    except CardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0
