"""The parity gate: PyTorch eager (the checkpoints) against ONNX Runtime (the shipped file).

    flannel export parity runs/resnet18      # a learner run
    flannel export parity runs/ensemble      # an ensemble folder

Runs real validation images (split "val" of the run's split manifest, a seeded sample stratified
by class) through both, on the served input (``flannel.artifacts``: decode and resize on the
host, each learner's crop and normalisation inside the graph), at batch sizes 1, 3 and 8. It
checks, in this order: output names, shapes, values (max abs and rel diff against the manifest's
tolerance profile) and decisions (argmax agreement of the decision output). For every learner
whose own resize equals the served input's side, it also checks that the in-graph preprocessing
gives the tensor training evaluated on. The first failing stage raises a typed ``ParityError``.
``parity.json`` is written beside the artifacts whether the gate passes or fails, and the
manifest's ``parity`` field points to it.
"""
from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from flannel.artifacts import (INPUT_SPEC, ONNX_FP32, ONNX_FP32_ORT_OPTIMIZED, PARITY_BATCH_SIZES,
                               PARITY_REPORT_NAME, GraphSpec, ManifestError, artifact_path,
                               export_dir_of, graph_spec, read_manifest, sha256_file,
                               tolerance_of, verify_manifest, write_manifest)
from flannel.data.records import read_manifest as read_split_manifest, resolve_path
from flannel.decode import GrayImage, InputError, read_gray
from flannel.export.sources import ServedSource, load_fitted, load_source
from flannel.preprocess import PreprocessSpec, to_tensor

log = logging.getLogger(__name__)

# ONNX artifacts checked, in order: the portable graph, then ONNX Runtime's fused copy of it.
ONNX_ARTIFACTS = (ONNX_FP32, ONNX_FP32_ORT_OPTIMIZED)
# The in-graph preprocessing of one learner against its training-time transform.
PREPROCESS_CHECK = "eager-preprocess"
# Denominator floor for the relative diff, so outputs near zero do not divide by ~0.
REL_DIFF_FLOOR = 1e-6
STAGES = ("manifest", "inputs", "names", "shapes", "values", "decisions")
# Seed of the stratified validation sample, so every run of the gate checks the same images.
SAMPLE_SEED = 0


class ParityError(RuntimeError):
    """The ONNX artifact does not reproduce the checkpoint; ``stage`` says which check failed."""

    stage = "inputs"

    def __init__(self, message: str, report: "ParityReport | None" = None) -> None:
        super().__init__(message)
        self.report = report


class OutputNameMismatch(ParityError):
    stage = "names"


class ShapeMismatch(ParityError):
    stage = "shapes"


class ValueMismatch(ParityError):
    stage = "values"


class DecisionMismatch(ParityError):
    stage = "decisions"


@dataclass
class ParityCheck:
    """One artifact x batch size x output comparison."""

    artifact: str
    batch_size: int
    output: str
    torch_shape: list[int]
    onnx_shape: list[int]
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    within_tolerance: bool | None = None
    argmax_agreement: float | None = None
    cycled: bool = False


@dataclass
class ParityReport:
    """Everything the gate measured; JSON-serialisable with ``to_dict``."""

    run_dir: str
    model_name: str
    atol: float
    rtol: float
    batch_sizes: list[int]
    val_images: list[str]
    kind: str = ""
    members: list[str] = field(default_factory=list)
    tolerance_profile: str = ""
    min_argmax_agreement: float = 1.0
    checkpoint_sha256: str = ""
    passed: bool = False
    failed_stage: str | None = None
    message: str = ""
    val_labels: dict = field(default_factory=dict)
    cycled_batch_sizes: list[int] = field(default_factory=list)
    checks: list[ParityCheck] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float | None:
        diffs = [c.max_abs_diff for c in self.checks if c.max_abs_diff is not None]
        return max(diffs) if diffs else None

    def to_dict(self) -> dict:
        return {**asdict(self), "max_abs_diff": self.max_abs_diff}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def stratified_sample(rows: list, max_images: int, seed: int = SAMPLE_SEED) -> list:
    """Up to ``max_images`` rows, classes taken in turn, each class shuffled with ``seed``.

    A manifest sorted by label would otherwise give its first class only.
    """
    by_label: dict[str, list] = defaultdict(list)
    for row in rows:
        by_label[row.label].append(row)
    rng = random.Random(seed)
    queues = []
    for label in sorted(by_label):
        group = list(by_label[label])
        rng.shuffle(group)
        queues.append(group)
    picked: list = []
    while len(picked) < max_images and any(queues):
        for queue in queues:
            if queue and len(picked) < max_images:
                picked.append(queue.pop())
    return picked


def val_images(split_manifest: Path | None, max_images: int,
               run_dir: Path | None = None) -> tuple[list[Path], dict[str, int]]:
    """Paths of a seeded, class-stratified sample of validation images, and its label counts.

    Raises:
        ParityError: no split manifest is known, it is missing, or it has no validation rows.
    """
    if split_manifest is None:
        raise ParityError(f"{run_dir}: no split manifest is recorded; parity runs on real "
                          "validation images")
    try:
        rows = stratified_sample(read_split_manifest(split_manifest, split="val"), max_images)
    except FileNotFoundError as err:
        raise ParityError(str(err)) from err
    if not rows:
        raise ParityError(f"{split_manifest} has no 'val' rows: parity runs on real validation "
                          "images")
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[row.label] += 1
    return [resolve_path(r.path, split_manifest.parent) for r in rows], dict(sorted(counts.items()))


def check_source(manifest: dict, export_dir: Path, source: ServedSource) -> PreprocessSpec:
    """The checkpoints and input spec the export was made from are still these ones; then
    ``source.module`` gets what the export fitted (``flannel.export.sources.load_fitted``)."""
    digest = sha256_file(source.checkpoint)
    if digest != manifest.get("checkpoint_sha256"):
        raise ParityError(f"{source.checkpoint} has sha256 {digest} but the export was made from "
                          f"{manifest.get('checkpoint_sha256')}: re-run `flannel export onnx`")
    recorded = {m["name"]: m["checkpoint_sha256"] for m in manifest.get("members", [])}
    current = {m["name"]: m["checkpoint_sha256"] for m in source.members}
    if recorded != current:
        raise ParityError(f"the members' checkpoints changed since export (manifest {recorded}, "
                          f"now {current}): re-run `flannel export onnx`")
    spec = PreprocessSpec.from_dict(manifest["input"]["spec"])
    shipped = PreprocessSpec.load(artifact_path(export_dir, manifest, INPUT_SPEC))
    if spec != source.input_spec or shipped != source.input_spec:
        raise ParityError(f"the input spec of the export ({spec}, file {shipped}) differs from "
                          f"the model's ({source.input_spec}): re-run the export")
    try:
        load_fitted(source, export_dir, manifest)
    except (ManifestError, ValueError, KeyError) as exc:
        raise ParityError(f"cannot load what the export fitted: {exc}") from exc
    return spec


def _batch(tensors: list[torch.Tensor], size: int) -> torch.Tensor:
    """``size`` images, cycling through ``tensors`` when there are fewer."""
    return torch.stack([tensors[i % len(tensors)] for i in range(size)])


def _session(path: Path) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - ORT raises several pybind classes (Fail, InvalidGraph, ...)
        raise ParityError(f"ONNX Runtime cannot load {path}: {err}") from err


def _read_images(paths: list[Path], max_pixels: int) -> list[GrayImage]:
    try:
        return [read_gray(p, max_pixels=max_pixels) for p in paths]
    except (InputError, OSError) as err:
        raise ParityError(f"a validation image cannot be read: {err}") from err


def check_names(session: ort.InferenceSession, torch_outputs: tuple, artifact: str,
                spec: GraphSpec) -> None:
    """Raise ``OutputNameMismatch`` unless session, spec and torch outputs line up by name."""
    inputs = tuple(i.name for i in session.get_inputs())
    outputs = tuple(o.name for o in session.get_outputs())
    if inputs != spec.input_names:
        raise OutputNameMismatch(f"{artifact}: ONNX Runtime inputs {inputs} != spec "
                                 f"{spec.input_names}")
    if outputs != spec.output_names:
        raise OutputNameMismatch(f"{artifact}: ONNX Runtime outputs {outputs} != spec "
                                 f"{spec.output_names}")
    if len(torch_outputs) != len(spec.output_names):
        raise OutputNameMismatch(f"{artifact}: PyTorch returns {len(torch_outputs)} outputs, "
                                 f"spec names {len(spec.output_names)}: {spec.output_names}")


def compare_output(check: ParityCheck, ref: np.ndarray, got: np.ndarray, atol: float,
                   rtol: float, with_argmax: bool = True) -> ParityCheck:
    """Fill in diffs, tolerance and argmax agreement of one output (shapes must be equal)."""
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    check.max_abs_diff = float(diff.max()) if diff.size else 0.0
    rel = diff / np.maximum(np.abs(ref), REL_DIFF_FLOOR)
    check.max_rel_diff = float(rel.max()) if rel.size else 0.0
    # np.allclose's rule: an element passes when |got - ref| <= atol + rtol * |ref|.
    check.within_tolerance = bool(np.all(diff <= atol + rtol * np.abs(ref)))
    if with_argmax and ref.ndim == 2:
        check.argmax_agreement = float(np.mean(got.argmax(axis=1) == ref.argmax(axis=1)))
    return check


def _run_artifact(artifact: str, path: Path, model: torch.nn.Module,
                  tensors: list[torch.Tensor], report: ParityReport,
                  spec: GraphSpec) -> list[ParityCheck]:
    session = _session(path)
    checks = []
    for size in report.batch_sizes:
        x = _batch(tensors, size)
        with torch.no_grad():
            ref = tuple(t.numpy() for t in model(x))
        if size == report.batch_sizes[0]:
            check_names(session, ref, artifact, spec)
        got = session.run(list(spec.output_names), {spec.input_name: x.numpy()})
        for name, r, g in zip(spec.output_names, ref, got):
            check = ParityCheck(artifact, size, name, list(r.shape), list(g.shape),
                                cycled=size > len(tensors))
            if r.shape == g.shape:
                compare_output(check, r, g, report.atol, report.rtol)
                agreement = ("" if check.argmax_agreement is None else
                             f", argmax agreement {100 * check.argmax_agreement:.0f}%")
                log.info("%s batch %d %s: max abs diff %.3g, max rel diff %.3g%s", artifact,
                         size, name, check.max_abs_diff, check.max_rel_diff, agreement)
            checks.append(check)
    return checks


def preprocess_checks(source: ServedSource, images: list[GrayImage],
                      served: torch.Tensor, report: ParityReport) -> list[ParityCheck]:
    """Each learner's in-graph preprocessing against its training-time ``to_tensor``, for the
    learners whose own resize is the served side (the others resize twice by design)."""
    checks = []
    learners = getattr(source.module, "learners", [source.module])
    for member, lg in zip(source.members, learners):
        spec = lg.preprocess.spec
        if spec.resize != source.input_spec.resize:
            continue
        with torch.no_grad():
            got = lg.preprocess(served).numpy()
        ref = torch.stack([to_tensor(img, spec) for img in images]).numpy()
        check = ParityCheck(PREPROCESS_CHECK, len(images), member["name"], list(ref.shape),
                            list(got.shape))
        if ref.shape == got.shape:
            compare_output(check, ref, got, report.atol, report.rtol, with_argmax=False)
        checks.append(check)
    return checks


def judge(report: ParityReport, spec: GraphSpec) -> None:
    """Raise the typed error of the first failing stage: shapes, then values, then decisions."""
    for c in report.checks:
        if c.torch_shape != c.onnx_shape:
            raise ShapeMismatch(f"{c.artifact} batch {c.batch_size} output {c.output!r}: "
                                f"shape {c.onnx_shape} != PyTorch {c.torch_shape}")
    for c in report.checks:
        if not c.within_tolerance:
            raise ValueMismatch(f"{c.artifact} batch {c.batch_size} output {c.output!r}: max abs "
                                f"diff {c.max_abs_diff:.3g}, max rel diff {c.max_rel_diff:.3g} "
                                f"exceed atol {report.atol:g} + rtol {report.rtol:g}")
    need = report.min_argmax_agreement
    for c in report.checks:
        if c.output == spec.decision_output and c.argmax_agreement < need:
            raise DecisionMismatch(f"{c.artifact} batch {c.batch_size} output {c.output!r}: "
                                   f"argmax agreement {100 * c.argmax_agreement:.1f}% "
                                   f"({100 * need:g}% required), max abs diff "
                                   f"{c.max_abs_diff:.3g}")


def _record(report: ParityReport, export_dir: Path, error: Exception | None) -> None:
    report.passed = error is None
    if error is not None:
        report.failed_stage = getattr(error, "stage", "manifest")
        report.message = str(error)
    if not export_dir.is_dir():  # nothing was exported: there is nowhere to write a report
        return
    report.save(export_dir / PARITY_REPORT_NAME)
    try:
        manifest = read_manifest(export_dir)
    except ManifestError:
        return
    manifest["parity"] = {"passed": report.passed, "report": PARITY_REPORT_NAME,
                          "max_abs_diff": report.max_abs_diff,
                          "failed_stage": report.failed_stage}
    # The fp32 graphs' gate is this one: each artifact entry says which gate it passed.
    for key in (ONNX_FP32, ONNX_FP32_ORT_OPTIMIZED):
        if key in manifest.get("artifacts", {}):
            manifest["artifacts"][key]["gate"] = {
                "name": "parity", "profile": report.tolerance_profile, "passed": report.passed,
                "max_abs_diff": report.max_abs_diff}
    write_manifest(export_dir, manifest)


def _gate(run_dir: Path, report: ParityReport, max_images: int, atol: float | None,
          rtol: float | None) -> None:
    export_dir = export_dir_of(run_dir)
    manifest = verify_manifest(export_dir)  # checks the bytes that will be shipped
    spec = graph_spec(manifest)
    tolerance = tolerance_of(manifest)
    report.atol = tolerance.atol if atol is None else atol
    report.rtol = tolerance.rtol if rtol is None else rtol
    report.tolerance_profile, report.min_argmax_agreement = (tolerance.name,
                                                             tolerance.min_argmax_agreement)
    report.model_name, report.kind = manifest["model_name"], manifest["kind"]
    report.members = [m["name"] for m in manifest.get("members", [])]
    try:
        source = load_source(run_dir, Path(manifest.get("checkpoint", "best.pt")).name)
    except (FileNotFoundError, RuntimeError, ValueError) as err:
        raise ParityError(f"cannot load the model the export was made from: {err}") from err
    report.checkpoint_sha256 = sha256_file(source.checkpoint)
    input_spec = check_source(manifest, export_dir, source)
    paths, report.val_labels = val_images(source.split_manifest, max_images, run_dir)
    report.val_images = [str(p) for p in paths]
    report.cycled_batch_sizes = [b for b in report.batch_sizes if b > len(paths)]
    if report.cycled_batch_sizes:
        log.info("only %d val images: batches %s repeat them", len(paths),
                 report.cycled_batch_sizes)
    images = _read_images(paths, input_spec.max_pixels)
    tensors = [to_tensor(img, input_spec) for img in images]
    report.checks += preprocess_checks(source, images, torch.stack(tensors), report)
    model = source.module.eval()
    for artifact in (a for a in ONNX_ARTIFACTS if a in manifest["artifacts"]):
        path = artifact_path(export_dir, manifest, artifact)
        report.checks += _run_artifact(artifact, path, model, tensors, report, spec)
    judge(report, spec)


def run_parity(run_dir: str | Path, *, batch_sizes: tuple[int, ...] = PARITY_BATCH_SIZES,
               atol: float | None = None, rtol: float | None = None,
               max_images: int = 16) -> ParityReport:
    """Check the exported ONNX artifacts against the eager model on validation images.

    Args:
        run_dir: a learner run or an ensemble folder with ``export/``.
        batch_sizes: batch sizes to compare at; small val splits are cycled to fill them.
        atol: absolute tolerance; None takes the manifest's tolerance profile (1e-4 for fp32).
        rtol: relative tolerance; None takes the profile's.
        max_images: at most this many validation images, stratified by class.

    Returns:
        The passing report (also written to ``export/parity.json``).

    Raises:
        ParityError: a subclass naming the failing stage, with ``.report`` attached.
        ManifestError: an artifact does not match its sha256.
    """
    run_dir = Path(run_dir)
    report = ParityReport(run_dir=str(run_dir), model_name="", batch_sizes=list(batch_sizes),
                          atol=float("nan") if atol is None else atol,
                          rtol=float("nan") if rtol is None else rtol, val_images=[])
    try:
        _gate(run_dir, report, max_images, atol, rtol)
    except (ParityError, ManifestError) as err:
        _record(report, export_dir_of(run_dir), err)
        log.error("parity FAILED at stage %s: %s", report.failed_stage, err)
        err.report = report
        raise
    _record(report, export_dir_of(run_dir), None)
    log.info("parity passed: max abs diff %.3g over %d comparisons", report.max_abs_diff,
             len(report.checks))
    return report
