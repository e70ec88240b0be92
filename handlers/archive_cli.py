"""`flannel archive`: build a TorchServe .mar from a run folder's verified, parity-passed export.

    flannel archive runs/x --model-store model_store --batch-size 8 --max-batch-delay 50 --workers 1
    flannel archive runs/x --allow-unvalidated    # no `flannel evaluate` yet; the card says so
"""
from __future__ import annotations

import argparse

from flannel.backends import BACKENDS
from flannel.handlers.archive import (AUTO_BACKEND, DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_DELAY_MS,
                                      DEFAULT_MODEL_STORE, DEFAULT_RESPONSE_TIMEOUT_S,
                                      DEFAULT_WORKERS, ArchiveError, ArchiveSettings, build_archive)
from flannel.handlers.trust import trust_list_path
from flannel.nvjpeg import AUTO, CPU, JPEG_DECODERS


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run folder holding export/ (flannel export onnx + parity)")
    parser.add_argument("--model-store", default=DEFAULT_MODEL_STORE, help="where the .mar goes")
    parser.add_argument("--trust-list", default=None, metavar="PATH",
                        help="the trust list the archive is added to (default: "
                             "trusted_archives.json beside the model store, or "
                             "$FLANNEL_TRUST_LIST); flannel serve start and the handler refuse "
                             "archives it does not list")
    parser.add_argument("--model-name", default=None, help="served name (default: the manifest's)")
    parser.add_argument("--version", default="1.0", help="archive version")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--max-batch-delay", type=int, default=DEFAULT_MAX_BATCH_DELAY_MS,
                        metavar="MS", help="ms the frontend waits to fill a batch")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument("--response-timeout", type=int, default=DEFAULT_RESPONSE_TIMEOUT_S, metavar="S")
    parser.add_argument("--intra-op-threads", type=int, default=None,
                        help="threads per worker (default: decided by each worker at load time, "
                             "the cores it may use divided by the workers)")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="served images above this many pixels are refused before decoding "
                             "(default 36,000,000; FLANNEL_MAX_PIXELS in the server's "
                             "environment overrides it)")
    parser.add_argument("--strict-input", action="store_true",
                        help="refuse (422) images whose ood_score exceeds 1 and DICOM files "
                             "whose header says they are not chest radiographs (another modality "
                             "or body part) instead of answering them with a warning")
    parser.add_argument("--no-explanations", dest="explanations", action="store_false",
                        help="leave the eager weights out: a smaller archive whose "
                             "/explanations answer 501")
    parser.add_argument("--explain-per-batch", type=int, default=1, metavar="N",
                        help="Grad-CAM explanations answered per handler call; more in one "
                             "batch get 429, so explanations never hold predictions up for long")
    parser.add_argument("--backend", choices=[AUTO_BACKEND, *sorted(BACKENDS)],
                        default=AUTO_BACKEND,
                        help="the inference backend the archive serves with (auto: the fastest "
                             "one here whose artifact passed its gate)")
    parser.add_argument("--jpeg-decoder", choices=[*JPEG_DECODERS, AUTO], default=CPU,
                        help="what decodes 8-bit greyscale JPEGs: cpu (libjpeg-turbo), nvjpeg "
                             "(the GPU; GPU backends only), or auto: nvjpeg where it gives the "
                             "same image faster on this host")
    parser.add_argument("--allow-unvalidated", action="store_true",
                        help="build even though no external evaluation of the model exists "
                             "(flannel evaluate RUN_DIR DIR ...); its model card says so")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        settings = ArchiveSettings(
            batch_size=args.batch_size, max_batch_delay_ms=args.max_batch_delay,
            workers=args.workers, response_timeout_s=args.response_timeout,
            intra_op_threads=args.intra_op_threads, backend=args.backend,
            max_pixels=args.max_pixels, strict_input=args.strict_input,
            explanations=args.explanations, explain_per_batch=args.explain_per_batch,
            jpeg_decoder=args.jpeg_decoder)
        mar = build_archive(args.run_dir, args.model_store, model_name=args.model_name,
                            version=args.version, settings=settings, trust_list=args.trust_list,
                            allow_unvalidated=args.allow_unvalidated)
    except ArchiveError as exc:
        print(f"error: {exc}")
        return 2
    print(f"wrote {mar}, listed in {args.trust_list or trust_list_path(args.model_store)}")
    print(f"model card: flannel card {mar}")
    print("serve it with: flannel serve start (which checks every archive against that list)")
    return 0
