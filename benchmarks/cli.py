"""`flannel bench`: the figures users size hardware from, each written as JSON, CSV, Markdown and
PNG plots under --out, with the machine's CPU model beside every figure.

    flannel bench model RUN_DIR... [--batches 1,8,32]   # per backend: latency, throughput, memory, FLOP/s
    flannel bench model --preset paper                  # the paper ensemble, random weights
    flannel bench train [--archs resnet18,squeezenet1_1] # training images/s per precision and layout
    flannel bench serve RUN_DIR                          # a private TorchServe under load, HTTP and gRPC
    flannel bench serve RUN_DIR --runtime torchserve,triton --protocols v2,v2-grpc
                                                         # the same archives on each runtime in turn
    flannel bench serve --attach MODEL --config config.properties   # a running TorchServe
    flannel bench soak --model MODEL --minutes 5         # minutes of load on a running TorchServe:
                                                         # errors, wrong answers, worker RSS growth
    flannel bench soak --model MODEL --worst-case        # peak worker RSS, 8 largest images at once
    flannel bench decode [--max-pixels N]                # decoder RSS per format, worst admitted
                                                         # input x 8, and the hostile inputs
    flannel bench syntaxes [--repeats 20]                # decode time of a real radiograph in
                                                         # every accepted DICOM transfer syntax

No figure is asserted anywhere: targets are read from these reports. Run one at a time on an
otherwise idle machine; every ratio is measured side by side in the same run.
"""
from __future__ import annotations

import argparse


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", metavar="COMMAND", required=True)
    model = sub.add_parser("model", help="per backend, subject and batch size: latency "
                                         "percentiles, images/s, peak RSS, GFLOP/s vs the GEMM peak")
    model.add_argument("run_dirs", nargs="*", metavar="RUN_DIR",
                       help="exported learner runs or ensemble folders")
    model.add_argument("--preset", action="append", default=[], metavar="NAME",
                       help="also an ensemble preset (lite, paper) with random weights, written "
                            "and exported under --preset-dir first (see benchmarks/untrained.py)")
    model.add_argument("--preset-dir", default="runs/bench/untrained")
    model.add_argument("--learners", action="store_true",
                       help="measure each learner of a --preset on its own too, before the "
                            "ensemble")
    model.add_argument("--batches", type=_ints, default=[1, 8, 32])
    model.add_argument("--warmup", type=int, default=2)
    model.add_argument("--repeats", type=int, default=10, help="timed calls per cell")
    model.add_argument("--threads", type=int, default=None, help="default: the usable cores")
    model.add_argument("--out", default="runs/bench/model")
    model.set_defaults(func=cmd_model)
    serve = sub.add_parser("serve", help="a private TorchServe (and/or Triton) under load: "
                                         "variants, protocols, concurrency levels, the stock "
                                         "baseline")
    serve.add_argument("run_dir", metavar="RUN_DIR", nargs="?",
                       help="an exported, gated run or ensemble (with --attach: optional, for "
                            "the model-level reference)")
    serve.add_argument("--config", default="config.properties",
                       help="template; ports and model store are replaced (with --attach: the "
                            "running server's config)")
    serve.add_argument("--attach", metavar="MODEL",
                       help="load MODEL on the TorchServe already running from --config "
                            "instead of starting a private one; nothing is started or stopped")
    serve.add_argument("--backend", default="auto",
                       help="with --attach: the served model's backend, for the reference")
    serve.add_argument("--levels", type=_ints, default=[1, 2, 4, 8, 16, 32])
    serve.add_argument("--requests", type=int, default=64, help="timed requests per level")
    serve.add_argument("--warmup", type=int, default=4)
    serve.add_argument("--time-limit", type=float, default=60.0, help="seconds per level at most")
    serve.add_argument("--runtime", default="torchserve", metavar="NAME[,NAME]",
                       help="torchserve, triton or both (torchserve,triton): the same archives "
                            "served by each in turn, one at a time; the stock baseline is "
                            "TorchServe's only")
    serve.add_argument("--protocols", default="http,grpc",
                       help="among http, grpc, v2, v2-grpc; each runtime is loaded over those it "
                            "answers (Triton: v2 and v2-grpc)")
    serve.add_argument("--variants", default="all",
                       help="all, or names among batch8-w1, nobatch-w1, batch8-w2, nobatch-w2 "
                            "(batch8-d5-w1... with several --max-batch-delay values)")
    serve.add_argument("--max-batch-delay", type=_ints, default=None, metavar="MS[,MS]",
                       help="the batching variants' delay (default: the archive's); several "
                            "values measure one batching variant per delay side by side")
    serve.add_argument("--no-stock", action="store_true", help="skip the stock baseline")
    serve.add_argument("--payload-side", type=int, default=2048)
    serve.add_argument("--out", default="runs/bench/serve")
    serve.set_defaults(func=cmd_serve)
    soak = sub.add_parser("soak", help="minutes of load on a running TorchServe: errors, wrong "
                                       "answers and worker RSS growth; or --worst-case memory")
    soak.add_argument("--model", required=True, help="the served model")
    soak.add_argument("--config", default="config.properties", help="the running server's config")
    soak.add_argument("--minutes", type=float, default=5.0)
    soak.add_argument("--concurrency", type=int, default=4)
    soak.add_argument("--warmup", type=float, default=30.0, metavar="S",
                      help="seconds before RSS growth is counted")
    soak.add_argument("--worst-case", action="store_true",
                      help="instead: peak worker RSS while 8 requests of the largest admitted "
                           "image are answered")
    soak.add_argument("--max-pixels", type=int, default=None,
                      help="with --worst-case: the server's pixel limit (default the decoder's)")
    soak.add_argument("--out", default="runs/bench/soak")
    soak.set_defaults(func=cmd_soak)
    decode = sub.add_parser("decode", help="peak RSS of decoding a batch of the worst input "
                                           "each format admits, and the hostile inputs")
    decode.add_argument("--max-pixels", type=int, default=None,
                        help="the serving pixel limit (default the decoder's)")
    decode.add_argument("--batch", type=int, default=8, help="copies decoded as one batch")
    decode.add_argument("--threads", type=int, default=None,
                        help="items prepared at once (default: the handler's prepare_threads)")
    decode.add_argument("--only", default="", metavar="NAME[,NAME]",
                        help="only inputs whose name contains one of these")
    decode.add_argument("--out", default="runs/bench/decode")
    decode.set_defaults(func=cmd_decode)
    syntaxes = sub.add_parser("syntaxes", help="decode time of a real radiograph in every "
                                               "accepted DICOM transfer syntax")
    syntaxes.add_argument("--repeats", type=int, default=20, help="timed decodes per syntax")
    syntaxes.add_argument("--warmup", type=int, default=2)
    syntaxes.add_argument("--source", default=None, metavar="DICOM",
                          help="a native monochrome DICOM (default: pydicom-data's RG1_UNCR.dcm)")
    syntaxes.add_argument("--out", default="runs/bench/syntaxes")
    syntaxes.set_defaults(func=cmd_syntaxes)
    train = sub.add_parser("train", help="training images/s per precision and memory layout")
    train.add_argument("--archs", default="resnet18,squeezenet1_1")
    train.add_argument("--size", type=int, default=224)
    train.add_argument("--batch", type=int, default=16)
    train.add_argument("--steps", type=int, default=5)
    train.add_argument("--warmup", type=int, default=2)
    train.add_argument("--out", default="runs/bench/train")
    train.set_defaults(func=cmd_train)


def cmd_model(args: argparse.Namespace) -> int:
    from flannel.benchmarks.model import (bench_model, format_summary, plot_backends,
                                          plot_batch_scaling)
    from flannel.benchmarks.output import write_outputs

    from flannel.benchmarks.untrained import untrained_ensemble, untrained_learners

    if not args.run_dirs and not args.preset:
        raise SystemExit("nothing to measure: give RUN_DIRs or --preset NAME")
    subjects = list(args.run_dirs)
    for preset in args.preset:
        if args.learners:
            subjects += untrained_learners(preset, args.preset_dir)
        subjects.append(untrained_ensemble(preset, args.preset_dir))
    result = bench_model(subjects, args.batches, args.warmup, args.repeats, args.threads)
    write_outputs(result, format_summary(result), args.out, "model",
                  (plot_backends, plot_batch_scaling))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from flannel.benchmarks.output import write_outputs
    from flannel.benchmarks.train_throughput import format_table, measure_training_throughput

    result = measure_training_throughput(args.archs.split(","), args.size, args.batch,
                                         args.steps, args.warmup)
    write_outputs(result, format_table(result), args.out, "train")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from flannel.benchmarks.output import write_outputs
    from flannel.benchmarks.serve import (bench_attached, bench_serve, default_variants,
                                          format_summary, plot_latency, runtime_protocols)

    common = dict(levels=args.levels, requests_per_level=args.requests, warmup=args.warmup,
                  time_limit=args.time_limit, protocols=tuple(args.protocols.split(",")),
                  payload_side=args.payload_side)
    runtimes = tuple(r for r in args.runtime.split(",") if r)
    if args.attach:
        if runtimes != ("torchserve",):
            raise SystemExit("--attach measures a running TorchServe; leave out --runtime")
        result = bench_attached(args.config, args.attach, run_dir=args.run_dir,
                                backend=None if args.backend == "auto" else args.backend,
                                **common)
        write_outputs(result, format_summary(result), args.out, "serve", (plot_latency,))
        return 0
    if args.run_dir is None:
        raise SystemExit("give RUN_DIR (or --attach MODEL for a running server)")
    try:
        runtime_protocols(runtimes, common["protocols"])
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    variants = default_variants(delays_ms=args.max_batch_delay)
    if args.variants != "all":
        wanted = args.variants.split(",")
        unknown = set(wanted) - {v.name for v in variants}
        if unknown:
            raise SystemExit(f"unknown variants {sorted(unknown)}; known: "
                             f"{[v.name for v in variants]}")
        variants = [v for v in variants if v.name in wanted]
    result = bench_serve(args.run_dir, template=args.config, backend=args.backend,
                         variants=variants, stock=not args.no_stock, runtimes=runtimes,
                         **common)
    write_outputs(result, format_summary(result), args.out, "serve", (plot_latency,))
    return 0


def cmd_soak(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flannel.benchmarks.output import write_outputs
    from flannel.benchmarks.soak import (format_soak, format_worst_case, plot_rss, soak,
                                         soak_files, worst_case)
    from flannel.decode import DEFAULT_MAX_PIXELS

    out = Path(args.out)
    if args.worst_case:
        result = worst_case(args.config, args.model, args.max_pixels or DEFAULT_MAX_PIXELS,
                            out / "files")
        write_outputs(result, format_worst_case(result), out, "worst_case")
        return 0 if all(s == 200 for s in result["statuses"]) else 1
    result = soak(args.config, args.model, soak_files(out / "files"),
                  seconds=60 * args.minutes, concurrency=args.concurrency, warmup_s=args.warmup)
    write_outputs(result, format_soak(result), out, "soak", (plot_rss,))
    return 0 if result["errors"] == result["wrong"] == 0 else 1


def cmd_decode(args: argparse.Namespace) -> int:
    from flannel.benchmarks.decode_memory import bench_decode, format_decode
    from flannel.benchmarks.output import write_outputs
    from flannel.decode import DEFAULT_MAX_PIXELS

    result = bench_decode(args.max_pixels or DEFAULT_MAX_PIXELS, args.batch, args.threads,
                          [o for o in args.only.split(",") if o])
    write_outputs(result, format_decode(result), args.out, "decode")
    return 0 if all(r["as_expected"] for r in result["rows"]) else 1


def cmd_syntaxes(args: argparse.Namespace) -> int:
    from flannel.benchmarks.dicom_syntaxes import bench_syntaxes, format_syntaxes
    from flannel.benchmarks.output import write_outputs

    result = bench_syntaxes(args.repeats, args.warmup, args.source)
    write_outputs(result, format_syntaxes(result), args.out, "syntaxes")
    return 0 if all(r["status"] == 200 for r in result["rows"]) else 1
