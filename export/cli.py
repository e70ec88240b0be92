"""`flannel export`: ONNX export and the parity gate of a learner run or an ensemble folder.

    flannel export onnx RUN_DIR      # write RUN_DIR/export (model.onnx, manifest.json, ...)
    flannel export parity RUN_DIR    # PyTorch vs ONNX Runtime on val images; non-zero on failure
    flannel export all RUN_DIR       # both, in that order
    flannel export int8 RUN_DIR      # ONNX Runtime static int8 (QDQ) behind its own gate
    flannel export compiled RUN_DIR  # AOTInductor bf16 + channels_last (or --precision fp32)
    flannel export tensorrt RUN_DIR  # TensorRT fp16 (or --precision fp32) engine; needs a GPU
    flannel export cuda RUN_DIR      # gate model.onnx on ONNX Runtime's CUDA provider; needs a GPU
    flannel export triton RUN_DIR    # a Triton model repository (graph, TensorRT plan, archive)

Each backend's gate prints one line; a host that cannot build a backend says why in one line
(exit status 2).
"""
from __future__ import annotations

import argparse
import sys

from flannel.artifacts import DEFAULT_OPSET, ONNX_FP32, ONNX_FP32_ORT_OPTIMIZED, PARITY_BATCH_SIZES

# Short artifact labels for the table; the full names are in parity.json.
_SHORT = {ONNX_FP32: "onnx", ONNX_FP32_ORT_OPTIMIZED: "ort-opt", "eager-preprocess": "preproc"}


def register(parser: argparse.ArgumentParser) -> None:
    """Add the ``onnx``, ``parity`` and ``all`` subcommands to the ``export`` stage parser."""
    sub = parser.add_subparsers(dest="export_command", metavar="COMMAND", required=True)
    onnx_p = sub.add_parser("onnx", help="export RUN_DIR/best.pt to RUN_DIR/export/model.onnx")
    parity_p = sub.add_parser("parity", help="check the export against the checkpoint")
    all_p = sub.add_parser("all", help="onnx, then parity")
    for p in (onnx_p, all_p):
        p.add_argument("--checkpoint", default="best.pt", help="checkpoint file in RUN_DIR")
        p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (>= 18)")
        p.add_argument("--operating-point", action="append", default=[], metavar="TARGET",
                       help='a target the decision thresholds meet on val, e.g. '
                            '"COVID-19:sensitivity>=0.95" or "Normal:specificity>=0.95" (at most '
                            '5%% of other images called Normal); repeat for several')
        p.add_argument("--coverage", type=float, default=None,
                       help="target coverage of the conformal prediction sets (default 0.9)")
        p.add_argument("--calibration", default="temperature",
                       choices=("temperature", "vector", "none"),
                       help="scaling of the served probabilities, fitted on val")
    for p in (parity_p, all_p):
        p.add_argument("--batch-sizes", type=int, nargs="+", default=list(PARITY_BATCH_SIZES))
        p.add_argument("--atol", type=float, default=None, help="default: the tolerance profile's")
        p.add_argument("--rtol", type=float, default=None, help="default: the tolerance profile's")
        p.add_argument("--max-images", type=int, default=16, help="val images read at most")
    for p in (onnx_p, parity_p, all_p):
        p.add_argument("run_dir", metavar="RUN_DIR",
                       help="learner run (flannel train) or ensemble folder (flannel ensemble)")
    int8_p = sub.add_parser("int8", help="quantise the fp32 graph to int8 and gate it on val")
    int8_p.add_argument("run_dir", metavar="RUN_DIR")
    int8_p.add_argument("--calibration", default="minmax",
                        choices=("minmax", "entropy", "percentile"))
    int8_p.add_argument("--exclude", default="fusion+depthwise",
                        help="parts left in fp32: none, or fusion, depthwise, heads joined by +")
    int8_p.add_argument("--calibration-images", type=int, default=256,
                        help="training images (seeded, class-stratified)")
    int8_p.add_argument("--max-fp32-ops", type=int, default=32,
                        help="if the int8 graph fails its gate, keep at most this many of its "
                             "most sensitive operators fp32 until it passes (0: no search)")
    int8_p.add_argument("--reduce-range", default="auto", choices=("auto", "on", "off"),
                        help="7-bit weights (auto: on CPUs without VNNI or AMX int8)")
    int8_p.set_defaults(func=cmd_int8)
    for name, helptext, precisions, func in (
            ("compiled", "torch.export + AOTInductor package (bf16 needs amx_bf16 or "
             "avx512_bf16), gated on val", ("bf16", "fp32"), cmd_compiled),
            ("tensorrt", "TensorRT engine from the ONNX graph (needs an NVIDIA GPU), gated on val",
             ("fp16", "fp32"), cmd_tensorrt)):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("run_dir", metavar="RUN_DIR")
        p.add_argument("--precision", default=precisions[0], choices=precisions)
        p.add_argument("--max-batch", type=int, default=32,
                       help="largest batch per call (archives may batch up to this)")
        p.set_defaults(func=func)
    cuda_p = sub.add_parser("cuda", help="gate model.onnx on ONNX Runtime's CUDA provider")
    cuda_p.add_argument("run_dir", metavar="RUN_DIR")
    cuda_p.set_defaults(func=cmd_cuda)
    register_triton(sub)
    onnx_p.set_defaults(func=cmd_onnx)
    parity_p.set_defaults(func=cmd_parity)
    all_p.set_defaults(func=cmd_all)


def format_table(report) -> str:
    """The parity report as a compact text table, one line per artifact/batch/output."""
    lines = [f"{'artifact':<8} {'batch':>5} {'output':<18} {'max abs':>9} {'max rel':>9} "
             f"{'argmax':>7}"]
    for c in report.checks:
        def num(v):
            return f"{v:9.2e}" if v is not None else f"{'-':>9}"
        agree = f"{100 * c.argmax_agreement:6.1f}%" if c.argmax_agreement is not None else "      -"
        batch = f"{c.batch_size}{'*' if c.cycled else ''}"
        lines.append(f"{_SHORT.get(c.artifact, c.artifact):<8} {batch:>5} {c.output:<18} "
                     f"{num(c.max_abs_diff)} {num(c.max_rel_diff)} {agree:>7}")
    if report.cycled_batch_sizes:
        lines.append(f"* only {len(report.val_images)} val images; larger batches repeat them")
    lines.append(f"tolerance ({report.tolerance_profile}): atol {report.atol:g}, rtol "
                 f"{report.rtol:g}, argmax agreement >= {100 * report.min_argmax_agreement:g}%; "
                 f"val images per class {report.val_labels}")
    return "\n".join(lines)


def cmd_onnx(args: argparse.Namespace) -> int:
    from flannel.artifacts import read_manifest
    from flannel.export.answer_policy import PolicyConfig
    from flannel.export.onnx_export import ExportError, export_onnx
    try:
        policy = PolicyConfig(calibration=args.calibration, operating_point=args.operating_point,
                              **({} if args.coverage is None else {"coverage": args.coverage}))
        export_dir = export_onnx(args.run_dir, checkpoint=args.checkpoint, opset=args.opset,
                                 policy=policy)
    except (ExportError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"export FAILED: {err}", file=sys.stderr)
        return 1
    manifest = read_manifest(export_dir)
    members = ", ".join(m["name"] for m in manifest["members"])
    print(f"exported {manifest['kind']} {manifest['model_name']} ({members}) with the {manifest['onnx']['exporter']} exporter "
          f"(opset {manifest['onnx']['opset']}) to {export_dir}")
    for name, entry in manifest["artifacts"].items():
        print(f"  {name:<24} {entry['path']:<22} {entry['bytes']:>11,d} B  {entry['sha256'][:12]}")
    print(f"answer policy: {export_dir / 'answer_report.md'}")
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    from flannel.artifacts import ManifestError
    from flannel.export.parity import ParityError, run_parity
    try:
        report = run_parity(args.run_dir, batch_sizes=tuple(args.batch_sizes), atol=args.atol,
                            rtol=args.rtol, max_images=args.max_images)
    except (ParityError, ManifestError) as err:
        report = getattr(err, "report", None)
        if report is not None and report.checks:
            print(format_table(report))
        stage = getattr(err, "stage", "manifest")
        print(f"parity FAILED ({type(err).__name__}, stage {stage}): {err}", file=sys.stderr)
        return 1
    print(format_table(report))
    print(f"parity PASSED: max abs diff {report.max_abs_diff:.2e} "
          f"(report: {args.run_dir}/export/parity.json)")
    return 0


def cmd_all(args: argparse.Namespace) -> int:
    return cmd_onnx(args) or cmd_parity(args)


def cmd_int8(args: argparse.Namespace) -> int:
    from flannel.export.int8 import Int8Config, Int8Error, export_int8

    cfg = Int8Config(calibration=args.calibration, exclude=args.exclude,
                     calibration_images=args.calibration_images,
                     max_fp32_ops=args.max_fp32_ops, reduce_range=args.reduce_range)
    return _gated(lambda: export_int8(args.run_dir, cfg), "ort-int8", (Int8Error,))

def _gated(build, backend: str, errors: tuple[type[Exception], ...]) -> int:
    """Run one backend's build-and-gate; print its gate line, or one error line (exit 2)."""
    from flannel.artifacts import ManifestError
    from flannel.export.gate import format_gate

    try:
        result = build()
    except (*errors, ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_gate(backend, result))
    return 0 if result["passed"] else 1


def cmd_compiled(args: argparse.Namespace) -> int:
    from flannel.export.compiled import TARGETS, CompiledError, export_compiled
    return _gated(lambda: export_compiled(args.run_dir, args.precision, args.max_batch),
                  TARGETS[args.precision].backend, (CompiledError,))


def cmd_tensorrt(args: argparse.Namespace) -> int:
    from flannel.export.tensorrt import TARGETS, TensorRtError, export_tensorrt
    return _gated(lambda: export_tensorrt(args.run_dir, args.precision, args.max_batch),
                  TARGETS[args.precision].backend, (TensorRtError,))


def cmd_cuda(args: argparse.Namespace) -> int:
    from flannel.export.cuda import CudaError, export_cuda
    return _gated(lambda: export_cuda(args.run_dir), "ort-cuda", (CudaError,))


def register_triton(sub) -> None:
    """The ``triton`` subcommand: ``flannel.export.triton_export.export_triton_repository``."""
    from flannel.export.triton_export import (DEFAULT_MAX_BATCH_SIZE, DEFAULT_MOUNT_PATH,
                                              INSTANCE_KINDS)

    p = sub.add_parser("triton", help="a Triton model repository for a full Triton install: "
                                      "the ONNX graph, a gated TensorRT plan, the archive")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="the repository (default: RUN_DIR/export/triton_repository)")
    p.add_argument("--archive", default=None, metavar="MAR",
                   help="a .mar of this export to serve (default: built as `flannel archive` "
                        "builds it, backend ort-fp32)")
    p.add_argument("--device", default="gpu", choices=sorted(INSTANCE_KINDS),
                   help="where Triton runs the ONNX graph (KIND_GPU or KIND_CPU)")
    p.add_argument("--mount-path", default=DEFAULT_MOUNT_PATH, metavar="PATH",
                   help="the repository's path inside the server, where the Python model finds "
                        "the trust list (KServe mounts storageUri at /mnt/models)")
    p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE, metavar="N",
                   help="the largest batch of the graph models")
    p.add_argument("--allow-unvalidated", action="store_true",
                   help="archive even though no external evaluation exists (the card says so)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing repository")
    p.set_defaults(func=cmd_triton)


def cmd_triton(args: argparse.Namespace) -> int:
    from flannel.artifacts import ManifestError, export_dir_of, read_manifest
    from flannel.export.triton_export import (TritonExportError, export_triton_repository,
                                              summary_lines, tensorrt_plan)
    from flannel.handlers.archive import ArchiveError
    from flannel.handlers.triton_repository import RepositoryError
    from flannel.handlers.trust import TrustError

    try:
        repo = export_triton_repository(
            args.run_dir, args.out, archive=args.archive, device=args.device,
            mount_path=args.mount_path, max_batch_size=args.max_batch_size,
            allow_unvalidated=args.allow_unvalidated, overwrite=args.overwrite)
    except (TritonExportError, ArchiveError, ManifestError, RepositoryError, TrustError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(repo)))
    plan, line = tensorrt_plan(read_manifest(export_dir_of(args.run_dir)))
    if plan is None:
        print(line)
    print(f"wrote {repo} (start Triton as its README.md says)")
    return 0
