"""`flannel data ...`: synth, audit, split and fetch, each a thin wrapper over a library function.

    flannel data synth data/synth --n-per-class 120 --size 128 --seed 0
    flannel data audit "../shared/datasets/covid19-xray-3class" --json audit.json
    flannel data split data/synth --out data/manifest.csv --seed 1 [--folds 5] [--no-dedup]
    flannel data split data/raw/COVID-19 data/raw/hannover --out m.csv --holdout-source hannover
    flannel data fetch muhammedtalo --out data/raw
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flannel.labels import DEFAULT_SCHEME, SCHEMES


def _imbalance(text: str) -> dict:
    """Parse ``COVID=0.25,Normal=1`` into {"COVID": 0.25, "Normal": 1.0}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.rpartition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected CLASS=FACTOR, got {part!r}")
        out[name.strip()] = float(value)
    return out


def run_synth(args) -> int:
    from flannel.data.synth import SynthConfig, synthesize

    config = SynthConfig(n_per_class=args.n_per_class, size=args.size, scheme=args.scheme,
                         imbalance=args.imbalance, markers=args.markers, seed=args.seed)
    summary = synthesize(args.out, config, overwrite=args.overwrite)
    print(f"wrote {summary['files']} images to {summary['out']} in {summary['seconds']} s")
    print("  classes: " + ", ".join(f"{k} {v}" for k, v in summary["counts"].items()))
    print("  formats: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["formats"].items())))
    return 0


def run_audit(args) -> int:
    from flannel.data.audit import audit_dataset

    report = audit_dataset(args.paths, args.scheme, manifest=args.manifest)
    print(report.format_text())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        print(f"report written to {args.json}")
    return 0


def _names(text: str) -> list[str]:
    """Parse ``hannover,openist`` into ["hannover", "openist"]."""
    return [n.strip() for n in text.split(",") if n.strip()]


def _print_split_extras(s: dict) -> None:
    dup = s["duplicates"]
    if dup.get("checked", True):
        print(f"  duplicates: {dup['exact_groups']} exact and {dup['near_groups']} near-duplicate "
              f"group(s); {dup['images_changed_patient']} image(s) moved to a merged patient")
    else:
        print("  duplicates: not checked (--no-dedup)")
    for fold, counts in s.get("fold_counts", {}).items():
        print(f"  fold {fold}: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    if s.get("holdout_note"):
        print(f"  {s['holdout_note']}")


def run_split(args) -> int:
    from flannel.data.split import split_dataset

    holdout = [n for text in args.holdout_source for n in _names(text)]
    try:
        s = split_dataset(args.roots, args.out, args.scheme, tuple(args.fractions), args.seed,
                          dedup=not args.no_dedup, folds=args.folds, holdout_sources=holdout)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{s['images']} images, {s['patients']} patients, scheme {s['scheme']}, seed {s['seed']}")
    for split, counts in s["counts"].items():
        print(f"  {split:<6} " + ", ".join(f"{c} {n}" for c, n in counts.items())
              + f"  ({s['patients_per_split'][split]} patients)")
    _print_split_extras(s)
    if s.get("patient_note"):
        print(f"  note: {s['patient_note']}")
    if s.get("excluded_findings"):
        excluded = s["excluded_findings"].items()
        print("  excluded findings: " + ", ".join(f"{k} {v}" for k, v in excluded))
    print(f"  problems: {len(s['problems'])}")
    for p in s["problems"]:
        print(f"    {p['path']}: {p['reason']}")
    print(f"manifest {s['manifest']}, summary {s['summary']}")
    return 0


def run_fetch(args) -> int:
    from flannel.data.fetch import FetchError, fetch

    try:
        result = fetch(args.name, args.out, url=args.url, progress=not args.quiet)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if result.downloaded:
        print(f"downloaded {result.url}\n  sha256 {result.sha256}\n  archive {result.archive}")
    else:
        print(f"already present, not downloaded again: {result.root}")
    print(f"layout {result.layout} at {result.root}")
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    """Add the data subcommands to the ``flannel data`` parser."""
    sub = parser.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    schemes = sorted(SCHEMES)

    p = sub.add_parser("synth", help="write a synthetic dataset (radiography layout)")
    p.add_argument("out")
    p.add_argument("--n-per-class", type=int, default=120)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--imbalance", type=_imbalance, default={},
                   help="per-class factor of --n-per-class, e.g. COVID=0.25,Normal=1")
    p.add_argument("--markers", action="store_true", help="burn class-dependent corner marks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheme", choices=schemes, default=DEFAULT_SCHEME)
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    p.set_defaults(func=run_synth)

    p = sub.add_parser("audit", help="counts, sizes, modes, problems and a shortcut check")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--scheme", choices=schemes, default=DEFAULT_SCHEME)
    p.add_argument("--manifest", help="split manifest: report patients in several splits")
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON")
    p.set_defaults(func=run_audit)

    p = sub.add_parser("split", help="patient-level stratified split -> manifest CSV + summary")
    p.add_argument("roots", nargs="+", metavar="ROOT")
    p.add_argument("--out", required=True, help="manifest CSV path (e.g. data/manifest.csv)")
    p.add_argument("--scheme", choices=schemes, default=DEFAULT_SCHEME)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1),
                   metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--folds", type=int, default=0, metavar="K",
                   help="also write K stratified patient-level CV folds (the fold column)")
    p.add_argument("--holdout-source", action="append", default=[], metavar="NAME[,NAME]",
                   help="put every image of these reader sources (e.g. hannover) in test")
    p.add_argument("--no-dedup", action="store_true",
                   help="do not merge exact and near-duplicate images into one patient")
    p.set_defaults(func=run_split)

    from flannel.data.fetch import SOURCES
    p = sub.add_parser("fetch", help="download and unpack a public dataset")
    p.add_argument("name", choices=sorted(SOURCES))
    p.add_argument("--out", required=True, help="folder for NAME.zip and the extracted NAME/")
    p.add_argument("--url", help="another address for the same archive (mirror, file://)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_fetch)
