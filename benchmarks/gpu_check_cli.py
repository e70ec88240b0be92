"""`flannel gpu-check`: the GPU tests, gates and benchmarks of a GPU host in one report.

    flannel gpu-check [--run-dir runs/demo/ensemble] [--out runs/gpu-check] [--budget 480]

Exit status 0 when every step passed within the budget, 1 when one did not, 2 (after one line
saying why, before anything runs) on a host without an NVIDIA GPU or without the GPU set.
"""
from __future__ import annotations

import argparse
import sys

from flannel.benchmarks.gpu_check import DEFAULT_BUDGET_S, DEFAULT_OUT


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", default=None, metavar="DIR",
                        help="an exported, gated run or ensemble folder (default: "
                             "runs/demo/ensemble when it is one, else a tiny ensemble trained "
                             "under --out)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="where the report and the "
                                                           "benchmarks' files go")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, metavar="S",
                        help="seconds the whole check may take; steps it no longer covers are "
                             "skipped")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flannel.benchmarks.gpu_check import GpuCheckConfig, GpuCheckError, run_gpu_check

    try:
        report = run_gpu_check(GpuCheckConfig(out=args.out, run_dir=args.run_dir,
                                              budget_s=args.budget))
    except GpuCheckError as exc:
        print(f"gpu-check: {exc}", file=sys.stderr)
        return 2
    print(f"{'passed' if report['passed'] else 'NOT passed'}: report in "
          f"{' and '.join(report['files'])}")
    return 0 if report["passed"] else 1
