"""The artifact contract between export, archive and serving, for every model kind.

    python -c "from flannel.artifacts import verify_manifest; print(verify_manifest('runs/x/export')['kind'])"

An export folder (and an unpacked .mar) holds ``manifest.json`` and the files it lists with their
sha256. The manifest says everything a reader needs, so the archive and the handler read only it:

- ``kind`` (``learner`` or ``ensemble``) and its graph names (``GraphSpec``): one input "image",
  the outputs, and the decision output whose argmax is the answer;
- ``input``: the one input every kind takes, an N x 1 x R x R float32 batch in [0, 1], and the
  preprocessing spec that makes it from a decoded file on the host (``flannel.preprocess``:
  intensity policy and the square resize to R). Each member's resize, crop, channel copy and
  normalisation are inside the graph, so the parity gate covers them too;
- ``precision``, ``runtime`` and ``tolerance_profile`` (``TOLERANCES``), per artifact;
- ``members``: every learner inside (architecture, checkpoint sha256, its own preprocessing);
- ``pins``: the flannel version and commit that exported it, and the sha256 of the input tensor
  computed for a fixed reference image, which the handler recomputes before serving;
- ``artifacts``: file, sha256 and size of every file.

The manifest is JSON so that it can be read without this package.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 2

# Artifact keys of the manifest and the file each one is written to. Readers look files up
# through ``artifacts[key]["path"]``, never by file name.
EXPORT_DIRNAME = "export"
ONNX_FP32 = "onnx_fp32"
ONNX_FP32_ORT_OPTIMIZED = "onnx_fp32_ort_optimized"
INPUT_SPEC = "input_spec"
INDEX_TO_NAME = "index_to_name"
REFERENCE_INPUT = "reference_input"
# ONNX Runtime static int8 (QDQ) quantisation of ONNX_FP32, with its own gate (export/int8.py).
ONNX_INT8 = "onnx_int8"
# The same fp32 graph run by ONNX Runtime's CUDA execution provider, gated on a GPU
# (export/cuda.py): its own entry, so that its gate is recorded apart from the CPU one.
ONNX_FP32_CUDA = "onnx_fp32_cuda"
# AOTInductor packages of the eager graph (export/compiled.py): bf16 + channels_last, and fp32.
AOTI_BF16 = "aoti_bf16"
AOTI_FP32 = "aoti_fp32"
# TensorRT engines (export/tensorrt.py): fp32 from ONNX_FP32; fp16 from ONNX_FP16, the same module
# exported with each learner's network in fp16 (TensorRT 11 takes precision from the graph's types).
ONNX_FP16 = "onnx_fp16"
TENSORRT_FP16 = "tensorrt_fp16"
TENSORRT_FP32 = "tensorrt_fp32"
# The served graph's eager fp32 weights (``flannel.graphs.served_graph`` rebuilds the module from
# the manifest's members): what Grad-CAM explanations run on, whatever backend answers predictions.
EAGER_FP32 = "eager_fp32"
# What the handler applies to the calibrated probabilities (operating point, prediction sets, the
# OOD warning) and the figures that judge them (export/answer_policy.py).
ANSWER_POLICY = "answer_policy"
# The model card the archive writes (flannel.model_card); answers carry its sha256.
MODEL_CARD = "model_card"
ARTIFACT_FILES = {ONNX_FP32: "model.onnx", ONNX_FP32_ORT_OPTIMIZED: "model.optimized.onnx",
                  INPUT_SPEC: "input_spec.json", INDEX_TO_NAME: "index_to_name.json",
                  REFERENCE_INPUT: "reference_input.npy", ONNX_INT8: "model.int8.onnx",
                  ONNX_FP32_CUDA: "model.onnx", AOTI_BF16: "model.bf16.pt2",
                  AOTI_FP32: "model.fp32.pt2", ONNX_FP16: "model.fp16.onnx", TENSORRT_FP16: "model.fp16.engine",
                  TENSORRT_FP32: "model.fp32.engine", EAGER_FP32: "model.eager.pt",
                  ANSWER_POLICY: "answer_policy.json"}
PARITY_REPORT_NAME = "parity.json"
# The graph output that says how unlike the training radiographs an image is (flannel.ood):
# at most 1 passes.
OOD_SCORE = "ood_score"
# The served ``ood_score`` at most this passes: the score is the distance over the threshold set
# on the validation split (flannel.ood), so the boundary is 1 by construction.
OOD_PASS_LIMIT = 1.0

# Dynamo exporter with onnxscript needs opset 18 or later.
DEFAULT_OPSET = 18
# Batch sizes parity is checked at: single requests, an odd size, and a typical serving batch.
PARITY_BATCH_SIZES = (1, 3, 8)


@dataclass(frozen=True)
class Tolerance:
    """How close an artifact must stay to its fp32 reference (one profile per precision).

    An element passes when ``|got - ref| <= atol + rtol * |ref|`` (``np.allclose``'s rule; values
    are not judged when ``atol`` is None, only recorded), the decision output's argmax must agree
    on at least ``min_argmax_agreement`` of the images, and where ``max_macro_f1_drop`` is set the
    macro-F1 against the labels may fall at most that much below the reference's.
    """

    name: str
    atol: float | None
    rtol: float | None
    min_argmax_agreement: float
    max_macro_f1_drop: float | None = None

    def values_pass(self, diff, ref) -> bool:
        """Whether every element of ``|got - ref|`` (``diff``) is within the value tolerance."""
        import numpy as np

        if self.atol is None:
            return True
        return bool(np.all(diff <= self.atol + (self.rtol or 0.0) * np.abs(ref)))


# fp32 PyTorch vs ONNX Runtime (or a compiled fp32 graph, or fp32 CUDA kernels): kernels differ in
# summation order; 1e-4 on probabilities in [0, 1] is ~1000x the fp32 epsilon and far below any
# decision margin that matters.
FP32 = Tolerance("fp32", atol=1e-4, rtol=1e-3, min_argmax_agreement=1.0)
# bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4%), and the error of a deep network's
# logits grows with depth. Measured on the real data's 114 validation images (README): max abs
# diff of resnet18's probabilities 0.026; of the lite ensemble's 0.062 (learner weights 0.075),
# with one decision of 114 changed. Held to 0.1 on values in [0, 1] and 99% agreement; the
# macro-F1 change is recorded, not judged (one changed image moves it by ~0.01 at this size).
BF16 = Tolerance("bf16", atol=1e-1, rtol=0.0, min_argmax_agreement=0.99)
# fp16 (TensorRT) keeps 11 bits of mantissa with fp32 accumulation: tighter than bf16.
FP16 = Tolerance("fp16", atol=1e-2, rtol=0.0, min_argmax_agreement=0.99)
# int8 moves probabilities by up to tenths on borderline images while keeping decisions: it is held
# to decisions and macro-F1, and its value differences are recorded, not judged.
INT8 = Tolerance("int8", atol=None, rtol=None, min_argmax_agreement=0.99,
                 max_macro_f1_drop=0.01)
TOLERANCES = {t.name: t for t in (FP32, BF16, FP16, INT8)}


@dataclass(frozen=True)
class GraphSpec:
    """Input and output names of one model kind's graph."""

    kind: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    decision_output: str = "probabilities"
    batch_axis_name: str = "batch"
    # Outputs in [0, 1] that answers carry besides the decision (an ensemble's learner weights).
    answer_outputs: tuple[str, ...] = ()
    # Unbounded per-image scores that answers carry; gates compare them relative to
    # max(1, |reference|) (``relative_diff``), as they are not in [0, 1].
    score_outputs: tuple[str, ...] = (OOD_SCORE,)

    @property
    def input_name(self) -> str:
        return self.input_names[0]

    @property
    def served_outputs(self) -> tuple[str, ...]:
        """What serving asks a backend for, and what every backend's gate compares."""
        return (self.decision_output, *self.answer_outputs, *self.score_outputs)


def relative_diff(diff, ref):
    """A score output's difference as gates judge it: ``|got - ref| / max(1, |ref|)``; absolute
    near the threshold of 1, relative far beyond it where only pass or fail matters."""
    import numpy as np

    return diff / np.maximum(1.0, np.abs(ref))


# A base learner: the common image batch in; logits, calibrated probabilities and the
# out-of-distribution score out.
LEARNER = GraphSpec("learner", ("image",), ("logits", "probabilities", OOD_SCORE))
# A fused ensemble: the common image batch in; calibrated fused probabilities, one weight per
# learner and the out-of-distribution score out.
ENSEMBLE = GraphSpec("ensemble", ("image",), ("probabilities", "learner_weights", OOD_SCORE),
                     answer_outputs=("learner_weights",))
KINDS = {s.kind: s for s in (LEARNER, ENSEMBLE)}


class ManifestError(RuntimeError):
    """An artifact is missing, its sha256 does not match, or the manifest is not understood."""


def graph_spec(manifest: dict) -> GraphSpec:
    """The ``GraphSpec`` of a manifest's kind, checked against the names the manifest records."""
    kind = manifest.get("kind")
    if kind not in KINDS:
        raise ManifestError(f"unknown model kind {kind!r}; known: {sorted(KINDS)}")
    spec = KINDS[kind]
    graph = manifest.get("graph", {})
    recorded = (tuple(graph.get("input_names", ())), tuple(graph.get("output_names", ())))
    if recorded != (spec.input_names, spec.output_names):
        raise ManifestError(f"the manifest's graph names {recorded} are not those of a {kind} "
                            f"{(spec.input_names, spec.output_names)}")
    return spec


def graph_entry(spec: GraphSpec, input_side: int) -> dict:
    """The manifest's ``graph`` section: names, the decision output and the input's shape."""
    return {"input_names": list(spec.input_names), "output_names": list(spec.output_names),
            "decision_output": spec.decision_output,
            "input_shape": [spec.batch_axis_name, 1, input_side, input_side],
            "input_dtype": "float32", "input_range": [0.0, 1.0]}


def tolerance_of(manifest: dict) -> Tolerance:
    """The tolerance profile a manifest (or one artifact entry of it) names."""
    name = manifest.get("tolerance_profile")
    if name not in TOLERANCES:
        raise ManifestError(f"unknown tolerance profile {name!r}; known: {sorted(TOLERANCES)}")
    return TOLERANCES[name]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def export_dir_of(run_dir: str | Path) -> Path:
    """The export folder of a run folder (learner or ensemble)."""
    return Path(run_dir) / EXPORT_DIRNAME


def contained_path(export_dir: str | Path, relative: str, key: str) -> Path:
    """``export_dir / relative``, refused unless it stays inside ``export_dir``: a manifest is
    read from archives that may come from elsewhere, and an absolute or ``..`` path in it would
    make the loader open (and hash, and hand to a runtime) any file on the host.

    Raises:
        ManifestError: naming the artifact and its path.
    """
    rel = Path(relative)
    base = Path(export_dir).resolve()
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ManifestError(f"artifact {key!r}: path {relative!r} must be relative and inside "
                            f"the export folder; refusing the manifest")
    path = (base / rel).resolve()
    if not path.is_relative_to(base):  # a symlink out of the folder
        raise ManifestError(f"artifact {key!r}: {relative!r} resolves to {path}, outside "
                            f"{base}; refusing the manifest")
    return Path(export_dir) / rel


def artifact_path(export_dir: str | Path, manifest: dict, key: str) -> Path:
    """Where the manifest says artifact ``key`` lives (always inside ``export_dir``).

    Raises:
        ManifestError: the manifest lists no such artifact, or its path leaves ``export_dir``.
    """
    try:
        relative = manifest["artifacts"][key]["path"]
    except KeyError:
        raise ManifestError(f"the manifest in {export_dir} lists no {key!r} artifact") from None
    return contained_path(export_dir, relative, key)


def artifact_entry(export_dir: Path, path: Path, **fields) -> dict:
    """Manifest entry of one file, with its path relative to the export folder."""
    return {"path": str(path.relative_to(export_dir)), "sha256": sha256_file(path),
            "bytes": path.stat().st_size, **fields}


def write_manifest(export_dir: str | Path, manifest: dict) -> Path:
    """Write ``manifest`` (with ``format`` and ``created`` filled in) to ``export_dir``."""
    export_dir = Path(export_dir)
    manifest = {"format": MANIFEST_FORMAT,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                **{k: v for k, v in manifest.items() if k not in ("format", "created")}}
    path = export_dir / MANIFEST_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def parse_manifest(data: bytes | str, path: str | Path) -> dict:
    """A manifest from its bytes (``path`` only names it in errors)."""
    manifest = json.loads(data)
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ManifestError(f"{path}: manifest format {found} is not "
                            f"{MANIFEST_FORMAT}: export the run again with this version")
    return manifest


def read_manifest(export_dir: str | Path) -> dict:
    path = Path(export_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST_NAME} in {export_dir}: run `flannel export onnx` first")
    return parse_manifest(path.read_bytes(), path)


def verify_manifest(export_dir: str | Path) -> dict:
    """Check every artifact listed in the manifest against its sha256.

    Returns:
        The manifest.

    Raises:
        ManifestError: naming the first missing or mismatching artifact.
    """
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    for name, entry in manifest.get("artifacts", {}).items():
        path = contained_path(export_dir, entry["path"], name)
        if not path.is_file():
            raise ManifestError(f"artifact {name!r} is missing: {path}")
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise ManifestError(f"artifact {name!r} ({path}) has sha256 {actual}, but the manifest "
                                f"says {entry['sha256']}: refusing to load a modified artifact")
    return manifest


def read_artifact(export_dir: str | Path, manifest: dict, key: str) -> bytes:
    """Artifact ``key``'s bytes, read once and checked against the manifest's sha256. Callers
    parse or load these bytes and never open the file again, so what runs is what was checked.

    Raises:
        ManifestError: the artifact is not listed, leaves the folder, or its sha256 differs.
    """
    path = artifact_path(export_dir, manifest, key)
    data = path.read_bytes()
    actual = sha256_bytes(data)
    if actual != manifest["artifacts"][key]["sha256"]:
        raise ManifestError(f"artifact {key!r} ({path}) has sha256 {actual}, but the manifest "
                            f"says {manifest['artifacts'][key]['sha256']}: refusing to load a "
                            "modified artifact")
    return data


class ExportFolder:
    """An export folder (or an unpacked archive outside a server) checked against its own
    manifest: every artifact when it is opened (``verify_manifest``), and each artifact's bytes
    again when they are read (``read_artifact``). This is the export's consistency check; what a
    server trusts is decided by the trust list (``flannel.handlers.trust``)."""

    def __init__(self, export_dir: str | Path) -> None:
        self.export_dir = Path(export_dir)
        self.manifest = verify_manifest(self.export_dir)

    def read(self, key: str) -> bytes:
        return read_artifact(self.export_dir, self.manifest, key)
