"""The parity gate: PyTorch eager (the checkpoint) against ONNX Runtime (the shipped file).

    flannel export parity runs/resnet18

Runs real validation images (split "val" of the run's split manifest, preprocessed with the spec
stored in the export manifest) through both at batch sizes 1, 3 and 8, and checks, in this order:
output names, shapes, values (max abs and rel diff against the spec's tolerances) and decisions
(argmax agreement must be 100%). The first failing stage raises a typed ``ParityError``.
``parity.json`` is written beside the artifacts whether the gate passes or fails, and the
manifest's ``parity`` field points to it.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from flannel.checkpoint import Checkpoint, load_checkpoint
from flannel.data.records import read_manifest as read_split_manifest
from flannel.decode import InputError
from flannel.export.manifest import (ONNX_FP32, ONNX_FP32_ORT_OPTIMIZED, PARITY_REPORT_NAME,
                                     PREPROCESS, ManifestError, artifact_path, export_dir_of,
                                     read_manifest, sha256_file, verify_manifest, write_manifest)
from flannel.export.onnx_export import LearnerOutputs
from flannel.export.specs import LEARNER, PARITY_BATCH_SIZES, OnnxSpec
from flannel.preprocess import PreprocessSpec, load_tensor

log = logging.getLogger(__name__)

# ONNX artifacts checked, in order: the portable graph, then ONNX Runtime's fused copy of it.
ONNX_ARTIFACTS = (ONNX_FP32, ONNX_FP32_ORT_OPTIMIZED)
# Denominator floor for the relative diff, so outputs near zero do not divide by ~0.
REL_DIFF_FLOOR = 1e-6
STAGES = ("manifest", "inputs", "names", "shapes", "values", "decisions")


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
    arch: str
    atol: float
    rtol: float
    batch_sizes: list[int]
    val_images: list[str]
    checkpoint_sha256: str = ""
    passed: bool = False
    failed_stage: str | None = None
    message: str = ""
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


def _resolve(path: str, *bases: Path) -> Path:
    """A path as written, or relative to the first base folder where it exists."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return next((b / p for b in bases if (b / p).exists()), p)


def val_images(run_dir: Path, max_images: int) -> list[Path]:
    """Paths of up to ``max_images`` validation images of the run's split manifest.

    Raises:
        ParityError: the run has no config, no manifest, or no validation rows.
    """
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise ParityError(f"{config_path} is missing: parity needs the run's split manifest")
    config = json.loads(config_path.read_text())
    if "manifest" not in config:
        raise ParityError(f"{config_path} has no 'manifest' entry")
    manifest = _resolve(config["manifest"], run_dir)
    try:
        rows = read_split_manifest(manifest, split="val")[:max_images]
    except FileNotFoundError as err:
        raise ParityError(str(err)) from err
    if not rows:
        raise ParityError(f"{manifest} has no 'val' rows: parity runs on real validation images")
    return [_resolve(r.path, manifest.parent) for r in rows]


def _check_spec(manifest: dict, export_dir: Path, ckpt: Checkpoint) -> PreprocessSpec:
    spec = PreprocessSpec.from_dict(manifest["preprocess"])
    shipped = PreprocessSpec.load(artifact_path(export_dir, manifest, PREPROCESS))
    if spec != ckpt.preprocess or shipped != ckpt.preprocess:
        raise ParityError(f"the preprocessing spec of the export ({spec}, file {shipped}) differs "
                          f"from the checkpoint's ({ckpt.preprocess}): re-run the export")
    return spec


def _check_checkpoint(manifest: dict, run_dir: Path) -> tuple[Path, str]:
    path = run_dir / manifest.get("checkpoint", "best.pt")
    if not path.is_file():
        raise ParityError(f"checkpoint {path} is missing: parity compares against it")
    digest = sha256_file(path)
    if digest != manifest.get("checkpoint_sha256"):
        raise ParityError(f"{path} has sha256 {digest} but the export was made from "
                          f"{manifest.get('checkpoint_sha256')}: re-run `flannel export onnx`")
    return path, digest


def _batch(tensors: list[torch.Tensor], size: int) -> torch.Tensor:
    """``size`` images, cycling through ``tensors`` when there are fewer."""
    return torch.stack([tensors[i % len(tensors)] for i in range(size)])


def _session(path: Path) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - ORT raises several pybind classes (Fail, InvalidGraph, ...)
        raise ParityError(f"ONNX Runtime cannot load {path}: {err}") from err


def _load_tensors(paths: list[Path], pre: PreprocessSpec) -> list[torch.Tensor]:
    try:
        return [load_tensor(p, pre) for p in paths]
    except (InputError, OSError) as err:
        raise ParityError(f"a validation image cannot be read: {err}") from err


def check_names(session: ort.InferenceSession, torch_outputs: tuple, artifact: str,
                spec: OnnxSpec) -> None:
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
                   rtol: float) -> ParityCheck:
    """Fill in diffs, tolerance and argmax agreement of one output (shapes must be equal)."""
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    check.max_abs_diff = float(diff.max()) if diff.size else 0.0
    rel = diff / np.maximum(np.abs(ref), REL_DIFF_FLOOR)
    check.max_rel_diff = float(rel.max()) if rel.size else 0.0
    # np.allclose's rule: an element passes when |got - ref| <= atol + rtol * |ref|.
    check.within_tolerance = bool(np.all(diff <= atol + rtol * np.abs(ref)))
    check.argmax_agreement = float(np.mean(got.argmax(axis=1) == ref.argmax(axis=1)))
    return check


def _run_artifact(artifact: str, path: Path, model: torch.nn.Module,
                  tensors: list[torch.Tensor], report: ParityReport,
                  spec: OnnxSpec) -> list[ParityCheck]:
    session = _session(path)
    checks = []
    for size in report.batch_sizes:
        x = _batch(tensors, size)
        with torch.no_grad():
            ref = tuple(t.numpy() for t in model(x))
        if size == report.batch_sizes[0]:
            check_names(session, ref, artifact, spec)
        got = session.run(list(spec.output_names), {spec.input_names[0]: x.numpy()})
        for name, r, g in zip(spec.output_names, ref, got):
            check = ParityCheck(artifact, size, name, list(r.shape), list(g.shape),
                                cycled=size > len(tensors))
            if r.shape == g.shape:
                compare_output(check, r, g, report.atol, report.rtol)
                log.info("%s batch %d %s: max abs diff %.3g, max rel diff %.3g, argmax "
                         "agreement %.0f%%", artifact, size, name, check.max_abs_diff,
                         check.max_rel_diff, 100 * check.argmax_agreement)
            checks.append(check)
    return checks


def judge(report: ParityReport, spec: OnnxSpec = LEARNER) -> None:
    """Raise the typed error of the first failing stage: shapes, then values, then decisions."""
    for c in report.checks:
        if c.torch_shape != c.onnx_shape:
            raise ShapeMismatch(f"{c.artifact} batch {c.batch_size} output {c.output!r}: ONNX "
                                f"Runtime shape {c.onnx_shape} != PyTorch {c.torch_shape}")
    for c in report.checks:
        if not c.within_tolerance:
            raise ValueMismatch(f"{c.artifact} batch {c.batch_size} output {c.output!r}: max abs "
                                f"diff {c.max_abs_diff:.3g}, max rel diff {c.max_rel_diff:.3g} "
                                f"exceed atol {report.atol:g} + rtol {report.rtol:g}")
    for c in report.checks:
        if c.output == spec.decision_output and c.argmax_agreement < 1.0:
            raise DecisionMismatch(f"{c.artifact} batch {c.batch_size} output {c.output!r}: "
                                   f"argmax agreement {100 * c.argmax_agreement:.1f}% "
                                   f"(100% required), max abs diff {c.max_abs_diff:.3g}")


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
    manifest.pop("created", None)
    manifest.pop("format", None)
    manifest["parity"] = {"passed": report.passed, "report": PARITY_REPORT_NAME,
                          "max_abs_diff": report.max_abs_diff,
                          "failed_stage": report.failed_stage}
    write_manifest(export_dir, manifest)


def _gate(run_dir: Path, report: ParityReport, max_images: int, spec: OnnxSpec) -> None:
    export_dir = export_dir_of(run_dir)
    manifest = verify_manifest(export_dir)  # checks the bytes that will be shipped
    report.arch = manifest["arch"]
    ckpt_path, report.checkpoint_sha256 = _check_checkpoint(manifest, run_dir)
    ckpt = load_checkpoint(ckpt_path)
    pre = _check_spec(manifest, export_dir, ckpt)
    paths = val_images(run_dir, max_images)
    report.val_images = [str(p) for p in paths]
    report.cycled_batch_sizes = [b for b in report.batch_sizes if b > len(paths)]
    if report.cycled_batch_sizes:
        log.info("only %d val images: batches %s repeat them", len(paths),
                 report.cycled_batch_sizes)
    tensors = _load_tensors(paths, pre)
    model = LearnerOutputs(ckpt.build_model()).eval()
    for artifact in (a for a in ONNX_ARTIFACTS if a in manifest["artifacts"]):
        path = artifact_path(export_dir, manifest, artifact)
        report.checks += _run_artifact(artifact, path, model, tensors, report, spec)
    judge(report, spec)


def run_parity(run_dir: str | Path, *, batch_sizes: tuple[int, ...] = PARITY_BATCH_SIZES,
               atol: float | None = None, rtol: float | None = None,
               max_images: int = 16) -> ParityReport:
    """Check the exported ONNX artifacts against the checkpoint on validation images.

    Args:
        run_dir: run folder with ``best.pt``, ``config.json`` and ``export/``.
        batch_sizes: batch sizes to compare at; small val splits are cycled to fill them.
        atol: absolute tolerance; None takes the learner spec's (1e-4 for fp32).
        rtol: relative tolerance; None takes the learner spec's.
        max_images: at most this many validation images are read.

    Returns:
        The passing report (also written to ``export/parity.json``).

    Raises:
        ParityError: a subclass naming the failing stage, with ``.report`` attached.
        ManifestError: an artifact does not match its sha256.
    """
    run_dir = Path(run_dir)
    spec = LEARNER
    report = ParityReport(run_dir=str(run_dir), arch="", batch_sizes=list(batch_sizes),
                          atol=spec.atol if atol is None else atol,
                          rtol=spec.rtol if rtol is None else rtol, val_images=[])
    try:
        _gate(run_dir, report, max_images, spec)
    except (ParityError, ManifestError) as err:
        _record(report, export_dir_of(run_dir), err)
        log.error("parity FAILED at stage %s: %s", report.failed_stage, err)
        err.report = report
        raise
    _record(report, export_dir_of(run_dir), None)
    log.info("parity passed: max abs diff %.3g over %d comparisons", report.max_abs_diff,
             len(report.checks))
    return report
