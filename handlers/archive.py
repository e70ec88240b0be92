"""Build a self-contained TorchServe archive (.mar) from a verified export, learner or ensemble.

    flannel archive runs/x --model-store model_store --batch-size 8 --max-batch-delay 50

The archive holds the backend's model file, the input spec, the class names, the pinned reference
tensor and (unless ``--no-explanations``) the eager weights Grad-CAM explanations run on, the
model card (``flannel.model_card``: ``model_card.json`` and ``MODEL_CARD.md``, also written into
the export folder), the manifest narrowed to those artifacts (the handler re-verifies every sha256
and the pins before loading), the parity report, ``model-config.yaml`` and the handler. It is
built with torch-model-archiver's Python API. An export whose manifest does not verify, or whose
parity gate has not passed, is refused, and so is a model without an external evaluation
(``flannel evaluate``) unless ``--allow-unvalidated`` is given, which the card then says. Each
archive written is listed, with the sha256 of every file in it, in the trust list outside the
model store (``flannel.handlers.trust``) that `flannel serve start` and the handler check
archives against.
"""
from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from flannel.artifacts import (ANSWER_POLICY, EAGER_FP32, INDEX_TO_NAME, INPUT_SPEC,
                               MANIFEST_NAME, PARITY_REPORT_NAME, REFERENCE_INPUT, ManifestError,
                               artifact_entry, artifact_path, export_dir_of, sha256_file,
                               verify_manifest)
from flannel.backends import (BACKENDS, DEFAULT_BACKEND, BackendError, backend_spec,
                              check_entry_host)
from flannel.handlers.trust import (MAR_MANIFEST, archive_digest, file_differences,
                                    trust_archive, trust_list_path)
from flannel.model_card import (CARD_ARTIFACTS, collect_card, external_reports,
                                unvalidated_refusal, write_card)
from flannel.nvjpeg import AUTO as AUTO_JPEG_DECODER
from flannel.nvjpeg import CPU, NVJPEG, auto_jpeg_decoder, setting_problem

log = logging.getLogger(__name__)

HANDLER_FILE = Path(__file__).with_name("image_classifier.py")
MODEL_CONFIG_NAME = "model-config.yaml"
DEFAULT_MODEL_STORE = "model_store"
# What the handler loads besides the backend's model artifact; the rest of the export stays out.
SIDE_ARTIFACTS = (INPUT_SPEC, INDEX_TO_NAME, REFERENCE_INPUT, ANSWER_POLICY)
# TorchServe batches up to this many requests into one handler call; 8 is where ORT fp32 on these
# 2 cores stops gaining throughput per image (design notes, batch-8 timings).
DEFAULT_BATCH_SIZE = 8
# How long the frontend waits to fill a batch once a request is queued and the worker is free.
# A lone request pays all of it; under heavy load it costs nothing (the batch fills from the
# queue while the worker is busy). 5 ms keeps one request near the model's own latency; between
# the two, a few clients sending in waves fill batches better with a longer wait (lite ensemble,
# 2 cores, 512 px PNG, `flannel bench serve --max-batch-delay 5,10,20`: c=1 p50 93 / 97 / 102 ms,
# c=8 16.8 / 20.3 / 25.9 req/s, c=16 25.5 / 22.6 / 24.7 req/s). Set per archive with
# `flannel archive --max-batch-delay`.
DEFAULT_MAX_BATCH_DELAY_MS = 5
# One worker: with 2 cores a second worker only splits the same cores (see config.properties).
DEFAULT_WORKERS = 1
# Seconds before the frontend gives up on a batch: a batch of 8 large DICOMs decodes and runs in a
# few seconds here; 120 s leaves room for a cold first call without hiding a hung worker for long.
DEFAULT_RESPONSE_TIMEOUT_S = 120


# `--backend auto`: the fastest backend whose artifact passed its gate, timed when archiving.
AUTO_BACKEND = "auto"


class ArchiveError(RuntimeError):
    """The export cannot be archived (manifest does not verify, parity not passed)."""


@dataclass(frozen=True)
class ArchiveSettings:
    """What goes into model-config.yaml."""

    batch_size: int = DEFAULT_BATCH_SIZE
    max_batch_delay_ms: int = DEFAULT_MAX_BATCH_DELAY_MS
    workers: int = DEFAULT_WORKERS
    response_timeout_s: int = DEFAULT_RESPONSE_TIMEOUT_S
    # None: each worker decides at load time from the cores it may use (flannel.cpus), never
    # from the machine that built the archive.
    intra_op_threads: int | None = None
    backend: str = "auto"  # AUTO_BACKEND, resolved by build_archive
    # Served images above this many pixels are refused before decoding (None: the decoder's
    # default; the server's FLANNEL_MAX_PIXELS overrides either, see handlers/serving.py).
    max_pixels: int | None = None
    # Refuse (422) an image whose ood_score exceeds 1 and a DICOM whose header says it is not a
    # chest radiograph, instead of answering it with a "warnings" field (handlers/serving.py).
    strict_input: bool = False
    # Carry the eager weights so that /explanations and explain=true answer (Grad-CAM); off makes
    # a smaller archive whose explanations answer 501.
    explanations: bool = True
    # Explanations answered per handler call; the surplus gets 429 (see handlers/serving.py).
    explain_per_batch: int = 1
    # What decodes 8-bit greyscale JPEGs: "cpu" (libjpeg-turbo), "nvjpeg" (the GPU; GPU backends
    # only) or "auto", resolved by build_archive: nvjpeg where it measures faster here with the
    # same levels (flannel.nvjpeg).
    jpeg_decoder: str = CPU

    def __post_init__(self) -> None:
        if self.jpeg_decoder in (CPU, AUTO_JPEG_DECODER) or self.backend == AUTO_BACKEND:
            return  # "auto" is checked once build_archive has resolved it
        problem = setting_problem(self.jpeg_decoder, backend_spec(self.backend))
        if problem:
            raise ArchiveError(f"refusing to archive for {self.backend}: {problem}")

    def model_config(self) -> dict:
        """The model-config.yaml content TorchServe 0.12 reads from the archive."""
        handler = {"backend": backend_spec(self.backend).name, "inter_op_threads": 1,
                   "workers": self.workers}
        if self.intra_op_threads:
            handler["intra_op_threads"] = int(self.intra_op_threads)
        if self.max_pixels:
            handler["max_pixels"] = int(self.max_pixels)
        if self.strict_input:
            handler["strict_input"] = True
        if self.jpeg_decoder == NVJPEG:
            handler["jpeg_decoder"] = NVJPEG
        handler["explain_per_batch"] = int(self.explain_per_batch)
        return {"minWorkers": self.workers, "maxWorkers": self.workers,
                "batchSize": self.batch_size, "maxBatchDelay": self.max_batch_delay_ms,
                "responseTimeout": self.response_timeout_s,
                "deviceType": backend_spec(self.backend).device,
                "handler": handler}


def check_export(export_dir: Path) -> dict:
    """Verify sha256 of every artifact and that parity passed.

    Returns:
        The export manifest.

    Raises:
        ArchiveError: with the reason and the command that fixes it.
    """
    try:
        manifest = verify_manifest(export_dir)
    except ManifestError as exc:
        raise ArchiveError(f"refusing to archive {export_dir}: {exc}") from exc
    parity = manifest.get("parity") or {}
    if parity.get("passed") is not True:
        state = "failed" if parity else "has not been run"
        raise ArchiveError(f"refusing to archive {export_dir}: the parity gate {state} "
                           f"(manifest parity={parity}); run `flannel export parity` and fix it")
    return manifest


def check_backend_artifact(export_dir: Path, manifest: dict, backend: str) -> None:
    """This host can run the backend, and its artifact exists and passed the gate its manifest
    entry records (parity for the fp32 graph, written by ``flannel export parity``; its own
    validation-split gate for every other backend, ``flannel.export.gate``). The archive is built
    on the kind of host that serves it: a bf16 package on a CPU without native bf16, or an engine
    without a GPU, is refused here rather than at serving time.

    Raises:
        ArchiveError: naming the missing artifact or the failed gate and its figures.
    """
    spec = backend_spec(backend)
    problem = spec.host_problem()
    if problem:
        raise ArchiveError(f"refusing to archive {export_dir} for {spec.name}: {problem}")
    entry = manifest["artifacts"].get(spec.artifact)
    if entry is None:
        raise ArchiveError(f"refusing to archive {export_dir} for {spec.name}: the export has no "
                           f"{spec.artifact} artifact (run `flannel export {spec.export_command}`)")
    try:
        check_entry_host(spec, entry)
    except BackendError as exc:
        why = str(exc).removeprefix(f"backend {spec.name}: ")
        raise ArchiveError(f"refusing to archive {export_dir} for {spec.name}: {why}") from None
    gate = entry.get("gate") or {}
    if gate.get("passed") is not True:
        figures = {k: v for k, v in gate.items() if k != "passed"}
        raise ArchiveError(f"refusing to archive {export_dir} for {spec.name}: {spec.artifact} has "
                           f"not passed its {gate.get('name', 'export')} gate "
                           f"({figures or 'never run'}; run `flannel export {spec.export_command}`)")


def passing_backends(export_dir: Path, manifest: dict) -> list[str]:
    """Backends whose artifact is in the export, passed its gate, and can run on this host."""
    out = []
    for name in BACKENDS:
        try:
            check_backend_artifact(export_dir, manifest, name)
        except ArchiveError:
            continue
        out.append(name)
    return out


def fastest_passing_backend(export_dir: Path, manifest: dict, batch_size: int,
                            repeats: int = 3) -> str:
    """The backend to serve when none is named: of those that passed their gate, the one with the
    lowest median time for one batch of the pinned reference image on this machine."""
    import numpy as np

    from flannel.artifacts import graph_spec
    from flannel.cpus import usable_cores
    from flannel.backends import load_backend
    from flannel.timing import median_seconds

    names = passing_backends(export_dir, manifest)
    if len(names) == 1:
        return names[0]
    graph = graph_spec(manifest)
    ref = np.load(artifact_path(export_dir, manifest, REFERENCE_INPUT))
    batch = np.repeat(ref[None], batch_size, axis=0).astype(np.float32)
    times = {}
    for name in names:
        engine = load_backend(backend_spec(name), export_dir, manifest, graph, usable_cores())
        times[name] = median_seconds(lambda: engine.run(batch), warmup=1, repeats=repeats)
    best = min(times, key=times.get)
    log.info("backend auto: %s (batch %d, ms per image: %s)", best, batch_size,
             ", ".join(f"{n} {1000 * t / batch_size:.1f}" for n, t in times.items()))
    return best


def served_artifacts(backend: str = DEFAULT_BACKEND, explanations: bool = False) -> tuple[str, ...]:
    """Manifest keys an archive for ``backend`` carries: its model artifact, the side files, the
    eager weights when it answers explanations, and the model card."""
    extra = (EAGER_FP32,) if explanations else ()
    return (backend_spec(backend).artifact, *SIDE_ARTIFACTS, *extra, *CARD_ARTIFACTS)


def served_manifest(export_dir: Path, manifest: dict, backend: str = DEFAULT_BACKEND,
                    explanations: bool = False) -> dict:
    """The export manifest narrowed to the artifacts the handler uses.

    ``manifest`` is the export manifest with the model card's entries added (``with_card``). The
    ORT-optimised copy stays out of the archive: it would double its size, and the handler
    builds its own optimised graph in memory. The sha256 of every carried artifact is unchanged,
    and the full export manifest is pinned by its own sha256.
    """
    served = served_artifacts(backend, explanations)
    missing = [k for k in served if k not in manifest["artifacts"]]
    if missing:
        raise ArchiveError(f"export manifest in {export_dir} lacks artifacts {missing} that the "
                           f"{backend} backend needs")
    return {**manifest, "artifacts": {k: manifest["artifacts"][k] for k in served},
            "export_manifest_sha256": sha256_file(export_dir / MANIFEST_NAME)}


def with_card(export_dir: Path, manifest: dict, card: dict) -> dict:
    """Write the card into the export folder; the manifest with its two files' entries added
    (the export's own manifest.json stays as export wrote it)."""
    entries = {k: artifact_entry(export_dir, p) for k, p in write_card(card, export_dir).items()}
    return {**manifest, "artifacts": {**manifest["artifacts"], **entries}}


def check_validated(run_dir: str | Path, manifest: dict, allow_unvalidated: bool) -> None:
    """Refuse a model that no external evaluation of its checkpoint has seen, unless told to
    build anyway.

    Raises:
        ArchiveError: one line naming the command that makes an external evaluation.
    """
    if not allow_unvalidated and not external_reports(run_dir, manifest.get("checkpoint_sha256")):
        raise ArchiveError(unvalidated_refusal(run_dir))


def _extra_files(export_dir: Path, manifest: dict, tmp: Path, backend: str,
                 explanations: bool) -> list[Path]:
    # Everything served but the model artifact, which torch-model-archiver takes apart.
    files = [artifact_path(export_dir, manifest, k)
             for k in served_artifacts(backend, explanations)[1:]]
    served = tmp / MANIFEST_NAME
    served.write_text(json.dumps(served_manifest(export_dir, manifest, backend, explanations),
                                 indent=2, sort_keys=True))
    files.append(served)
    report = export_dir / manifest["parity"].get("report", PARITY_REPORT_NAME)
    if report.is_file():
        files.append(report)
    return files + [tmp / MODEL_CONFIG_NAME]


@contextlib.contextmanager
def _tempdir(folder: Path):
    previous = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = previous


def check_archive_contents(mar: Path, expected: dict[str, str]) -> tuple[str, int, dict]:
    """The .mar holds exactly the files it was built from (and TorchServe's MANIFEST.json),
    byte for byte: nothing else is listed as trusted.

    Returns:
        ``archive_digest(mar)``, for the trust list.

    Raises:
        ArchiveError: naming what differs; the .mar is removed.
    """
    digest = archive_digest(mar)
    files = {k: v for k, v in digest[2].items() if k != MAR_MANIFEST}
    if files != expected or MAR_MANIFEST not in digest[2]:
        mar.unlink()
        raise ArchiveError(f"refusing {mar.name}: it does not hold exactly the files it was "
                           f"built from ({file_differences(files, expected)}; "
                           f"{MAR_MANIFEST} {'present' if MAR_MANIFEST in digest[2] else 'missing'})")
    return digest


def build_archive(run_dir: str | Path, model_store: str | Path = DEFAULT_MODEL_STORE, *,
                  model_name: str | None = None, version: str = "1.0",
                  settings: ArchiveSettings = ArchiveSettings(),
                  trust_list: str | Path | None = None, allow_unvalidated: bool = False) -> Path:
    """Write ``<model_store>/<model_name>.mar`` from ``run_dir/export`` and list it as trusted.

    Args:
        run_dir: run folder with a verified, parity-passed ``export/``.
        model_store: folder TorchServe loads archives from; created if missing.
        model_name: served name; defaults to the manifest's ``model_name``.
        version: archive version, reported in every answer.
        settings: batching, workers and thread settings for model-config.yaml.
        trust_list: the trust list to add the archive to (default: ``trusted_archives.json``
            beside the model store, or ``$FLANNEL_TRUST_LIST``).
        allow_unvalidated: build even when ``run_dir/external/`` holds no external evaluation
            (the model card says so).

    Returns:
        Path of the .mar (overwritten if it exists).

    Raises:
        ArchiveError: the export does not verify, parity has not passed, or no external
            evaluation exists and ``allow_unvalidated`` is False.
    """
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import package_model
    from model_archiver.model_packaging_utils import ModelExportUtils

    export_dir = export_dir_of(run_dir)
    manifest = check_export(export_dir)
    check_validated(run_dir, manifest, allow_unvalidated)
    if settings.backend == AUTO_BACKEND:
        settings = replace(settings, backend=fastest_passing_backend(export_dir, manifest,
                                                                     settings.batch_size))
    if settings.jpeg_decoder == AUTO_JPEG_DECODER:
        decoder = auto_jpeg_decoder(backend_spec(settings.backend))
        settings = replace(settings, jpeg_decoder=decoder)
    check_backend_artifact(export_dir, manifest, settings.backend)
    name = model_name or manifest["model_name"]
    card = collect_card(run_dir, manifest, model_name=name, model_version=version,
                        backend=settings.backend,
                        export_manifest_sha256=sha256_file(export_dir / MANIFEST_NAME))
    manifest = with_card(export_dir, manifest, card)
    store = Path(model_store)
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flannel-archive-") as tmp:
        config_path = Path(tmp) / MODEL_CONFIG_NAME
        config_path.write_text(yaml.safe_dump(settings.model_config(), sort_keys=False))
        explanations = settings.explanations and EAGER_FP32 in manifest["artifacts"]
        if settings.explanations and not explanations:
            log.warning("%s has no eager weights (%s): explanations will answer 501; export it "
                        "again to serve them", export_dir, EAGER_FP32)
        extra = _extra_files(export_dir, manifest, Path(tmp), settings.backend, explanations)
        serialized = artifact_path(export_dir, manifest, backend_spec(settings.backend).artifact)
        sources = [HANDLER_FILE, serialized, *extra]
        # What the archive must hold, by name: torch-model-archiver flattens every file.
        expected = {p.name: sha256_file(p) for p in sources}
        config = ModelArchiverConfig(
            model_name=name, handler=str(HANDLER_FILE), version=version,
            serialized_file=str(serialized),
            extra_files=",".join(str(p) for p in extra), export_path=str(store),
            force=True, config_file=str(config_path))
        # torch-model-archiver stages the files in $TMPDIR/<model name>: a shared, predictable
        # folder another build (or another account) could write into before it is zipped.
        staging = Path(tmp) / "staging"
        staging.mkdir(mode=0o700)
        with _tempdir(staging):
            package_model(config, manifest=ModelExportUtils.generate_manifest_json(config))
    mar = store / f"{name}.mar"
    digest = check_archive_contents(mar, expected)
    entry = trust_archive(mar, trust_list, digest)
    log.info("wrote %s (%d bytes, sha256 %s), listed in %s", mar, mar.stat().st_size,
             entry["sha256"][:12], trust_list or trust_list_path(store))
    return mar
