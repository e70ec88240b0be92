"""`flannel export triton`: a Triton model repository of one export, for a full Triton install.

    flannel export triton RUN_DIR                       # RUN_DIR/export/triton_repository
    flannel export triton RUN_DIR --out repo --archive model_store/x.mar --device cpu

A full Triton (NVIDIA's image, on a GPU cluster) runs the graph on its own backends; the product's
code only decodes files and shapes answers. The repository holds, for an export named ``<name>``:

- ``<name>_graph``: the parity-gated fp32 ONNX graph on Triton's ONNX Runtime backend, batched by
  Triton's dynamic batcher (input N x 1 x R x R float32 in [0, 1], the graph's outputs);
- ``<name>_trt``: the TensorRT engine as a ``tensorrt_plan``, only where the export holds one that
  passed its gate (``flannel export tensorrt``); an engine runs only on the GPU model and with the
  TensorRT version it was built with;
- ``<name>``: the Python-backend model (``flannel.handlers.triton_model``) over the unpacked
  archive: it decodes PNG, JPEG and DICOM files, preprocesses them with the archive's spec and
  sends the batch to ``<name>_graph`` through BLS;
- ``trusted_archives.json``: the trust list that model checks its archive against, named in its
  config by the path the repository has inside the server (``--mount-path``, KServe's
  ``/mnt/models`` by default);
- ``README.md``: what each model is and how to start Triton on the repository.

Every byte copied is checked first: the export's manifest and parity gate as ``flannel archive``
checks them, each artifact against its sha256, the ONNX graph's names and shapes against the
manifest's graph. The repository is written into a new folder beside ``--out`` and moved into
place once complete; an existing repository is replaced only with ``--overwrite``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from typing import TYPE_CHECKING

from flannel.artifacts import (INPUT_SPEC, MANIFEST_NAME, ONNX_FP32, ExportFolder, GraphSpec,
                               export_dir_of, graph_spec, parse_manifest, read_artifact,
                               sha256_file)
from flannel.handlers.open_inference import MAX_ITEMS
from flannel.handlers.triton_model import DEFAULT_ARCHIVE_DIR
from flannel.handlers.triton_repository import (MAX_BATCH_IMAGES, MODEL_PY, MODEL_VERSION,
                                                python_model_config, unpack_archive)
from flannel.handlers.trust import TRUST_LIST_NAME, TrustedArchive, trust_archive

if TYPE_CHECKING:  # the backends import torch: `flannel export --help` should not wait for it
    from flannel.backends import BackendSpec

log = logging.getLogger(__name__)

REPOSITORY_DIRNAME = "triton_repository"
# Where KServe puts a predictor's storageUri (downloaded, or a claim mounted) in its container.
DEFAULT_MOUNT_PATH = "/mnt/models"
GRAPH_SUFFIX = "_graph"
PLAN_SUFFIX = "_trt"
# File names Triton's ONNX Runtime and TensorRT backends look for in a version folder.
ONNX_MODEL_FILE = "model.onnx"
PLAN_MODEL_FILE = "model.plan"
INSTANCE_KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}
# One v2 request carries at most MAX_ITEMS images, as on TorchServe.
DEFAULT_MAX_BATCH_SIZE = MAX_ITEMS
# The Python model has already waited to fill its batch (the archive's maxBatchDelay); the graph
# model's own batcher only merges the BLS calls of its instances, so it waits 1 ms at most.
GRAPH_QUEUE_DELAY_US = 1000
README_NAME = "README.md"
# ONNX element types and Triton's names for them.
ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 6: "TYPE_INT32", 7: "TYPE_INT64",
                  9: "TYPE_BOOL"}


class TritonExportError(RuntimeError):
    """The export cannot be laid out as a Triton repository."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a graph model, its shape without the batch axis."""

    name: str
    data_type: str
    dims: tuple[int, ...]

    def pbtxt(self) -> str:
        """The tensor as a ``config.pbtxt`` entry. Triton wants at least one dimension besides
        the batch: a per-image scalar (shape [N]) is declared [1] and reshaped to []."""
        if not self.dims:
            return (f'{{ name: "{self.name}" data_type: {self.data_type} dims: [ 1 ] '
                    "reshape: { shape: [ ] } }")
        dims = ", ".join(str(d) for d in self.dims)
        return f'{{ name: "{self.name}" data_type: {self.data_type} dims: [ {dims} ] }}'


def graph_signature(onnx_bytes: bytes, graph: GraphSpec, side: int
                    ) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The inputs and outputs of the ONNX graph, checked against the manifest's names and the
    input spec: a free batch axis first, every other axis fixed, the input N x 1 x R x R.

    Raises:
        TritonExportError: naming what differs.
    """
    import onnx

    model = onnx.load_model_from_string(onnx_bytes)
    initializers = {i.name for i in model.graph.initializer}
    found = {}
    for value in [*model.graph.input, *model.graph.output]:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        axes = list(tensor.shape.dim)
        if not axes or axes[0].HasField("dim_value"):
            raise TritonExportError(f"{value.name}: the graph has no free batch axis; Triton "
                                    "batches along the first one")
        rest = tuple(a.dim_value if a.HasField("dim_value") else None for a in axes[1:])
        if None in rest or tensor.elem_type not in ONNX_TO_TRITON:
            raise TritonExportError(f"{value.name}: shape {rest} or element type "
                                    f"{tensor.elem_type} is not one Triton can batch")
        found[value.name] = TensorSpec(value.name, ONNX_TO_TRITON[tensor.elem_type], rest)
    names = (tuple(i.name for i in model.graph.input if i.name not in initializers),
             tuple(o.name for o in model.graph.output))
    if names != (graph.input_names, graph.output_names):
        raise TritonExportError(f"the ONNX graph's names {names} are not the manifest's "
                                f"{(graph.input_names, graph.output_names)}")
    inputs = [found[n] for n in graph.input_names]
    if inputs[0] != TensorSpec(graph.input_name, "TYPE_FP32", (1, side, side)):
        raise TritonExportError(f"the graph's input {inputs[0]} is not FP32 [N, 1, {side}, {side}]")
    return inputs, [found[n] for n in graph.output_names]


def graph_model_config(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], *,
                       max_batch_size: int, preferred_batch: int, instance_kind: str,
                       backend: str | None = None, platform: str | None = None,
                       notes: tuple[str, ...] = ()) -> str:
    """``config.pbtxt`` of a graph model (ONNX Runtime backend or TensorRT plan).

    Args:
        name: the model's name.
        inputs, outputs: its tensors (``graph_signature``).
        max_batch_size: the largest batch Triton hands the model.
        preferred_batch: a batch the dynamic batcher prefers besides ``max_batch_size``.
        instance_kind: ``KIND_GPU`` or ``KIND_CPU``.
        backend, platform: Triton's ``backend`` (``onnxruntime``) or ``platform``
            (``tensorrt_plan``).
        notes: comment lines at the top of the file.
    """
    preferred = ", ".join(str(b) for b in sorted({min(preferred_batch, max_batch_size),
                                                   max_batch_size}))
    runtime = f'backend: "{backend}"' if backend else f'platform: "{platform}"'
    comments = "".join(f"# {line}\n" for line in notes)
    tensors = {side: ",\n".join("  " + t.pbtxt() for t in group)
               for side, group in (("input", inputs), ("output", outputs))}
    return f"""{comments}name: "{name}"
{runtime}
max_batch_size: {max_batch_size}
input [
{tensors["input"]}
]
output [
{tensors["output"]}
]
dynamic_batching {{
  preferred_batch_size: [ {preferred} ]
  max_queue_delay_microseconds: {GRAPH_QUEUE_DELAY_US}
}}
instance_group [ {{ kind: {instance_kind} count: 1 }} ]
"""


def tensorrt_plan(manifest: dict) -> tuple[BackendSpec | None, str]:
    """The TensorRT backend whose engine the repository serves (in ``BACKENDS`` order, fp16
    first), and one line saying which engine or why there is none."""
    from flannel.backends import BACKENDS

    why = []
    for spec in BACKENDS.values():
        if spec.runtime != "tensorrt":
            continue
        entry = manifest["artifacts"].get(spec.artifact)
        if entry is None:
            why.append(f"no {spec.artifact} artifact")
        elif (entry.get("gate") or {}).get("passed") is not True:
            why.append(f"{spec.artifact} has not passed its gate")
        else:
            return spec, (f"{spec.artifact}: built on {entry.get('gpu')} (compute capability "
                          f"{entry.get('compute_capability')}) with TensorRT "
                          f"{entry.get('tensorrt_version')}, gate passed")
    return None, ("no TensorRT plan: " + "; ".join(why)
                  + " (`flannel export tensorrt` on the GPU model that serves it)")


def check_archive_of_export(mar: Path, export_dir: Path) -> None:
    """``mar`` was built from this very export: its manifest pins the export manifest's sha256,
    so the Python model answers with the graph that the graph models run.

    Raises:
        TritonExportError: another export's archive, or not an archive.
    """
    try:
        with zipfile.ZipFile(mar) as zf:
            archived = parse_manifest(zf.read(MANIFEST_NAME), mar)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise TritonExportError(f"{mar} is not an archive of `flannel archive`: {exc}") from None
    want = sha256_file(export_dir / MANIFEST_NAME)
    if archived.get("export_manifest_sha256") != want:
        raise TritonExportError(f"{mar.name} was built from another export (its manifest pins "
                                f"{str(archived.get('export_manifest_sha256'))[:12]}, {export_dir} "
                                f"has {want[:12]}): archive this export, or leave --archive out")


def _write_graph_model(repo: Path, name: str, model_file: str, data: bytes, config: str) -> None:
    version = repo / name / MODEL_VERSION
    version.mkdir(parents=True)
    (version / model_file).write_bytes(data)
    (repo / name / "config.pbtxt").write_text(config)


def _write_graph_models(repo: Path, name: str, export_dir: Path, manifest: dict,
                        instance_kind: str, max_batch_size: int) -> tuple[int, str]:
    """``<name>_graph`` and, where a gated engine exists, ``<name>_trt``, from checked bytes.

    Returns:
        The input side R, and the line that says which engine is served or why none is.
    """
    from flannel.handlers.archive import DEFAULT_BATCH_SIZE

    graph = graph_spec(manifest)
    side = int(json.loads(read_artifact(export_dir, manifest, INPUT_SPEC))["resize"])
    onnx_bytes = read_artifact(export_dir, manifest, ONNX_FP32)
    inputs, outputs = graph_signature(onnx_bytes, graph, side)
    # The graph models prefer the archive's default batch, the one the TensorRT engine's
    # profile is tuned for too (export/tensorrt.py DEFAULT_OPT_BATCH).
    tensors = {"inputs": inputs, "outputs": outputs, "preferred_batch": DEFAULT_BATCH_SIZE}
    sha = manifest["artifacts"][ONNX_FP32]["sha256"]
    _write_graph_model(repo, name + GRAPH_SUFFIX, ONNX_MODEL_FILE, onnx_bytes, graph_model_config(
        name + GRAPH_SUFFIX, **tensors, max_batch_size=max_batch_size,
        instance_kind=instance_kind, backend="onnxruntime",
        notes=(f"{ONNX_FP32} of {manifest['model_name']}, sha256 {sha[:12]}",)))
    plan, plan_line = tensorrt_plan(manifest)
    if plan is not None:
        engine_max = int(manifest["artifacts"][plan.artifact].get("max_batch", max_batch_size))
        # The engine takes fp32 in and out whatever its precision (export/tensorrt.py), so its
        # tensors are the fp32 graph's.
        _write_graph_model(repo, name + PLAN_SUFFIX, PLAN_MODEL_FILE,
                           read_artifact(export_dir, manifest, plan.artifact), graph_model_config(
                               name + PLAN_SUFFIX, **tensors,
                               max_batch_size=min(max_batch_size, engine_max),
                               instance_kind="KIND_GPU", platform="tensorrt_plan",
                               notes=(plan_line,)))
    return side, plan_line


def _listed_archive(run_dir: str | Path, export_dir: Path, name: str, archive: str | Path | None,
                    store: Path, trust_list: Path, allow_unvalidated: bool) -> Path:
    """The archive the Python model serves, listed in ``trust_list``: ``archive`` once it is
    known to be this export's, else one built into ``store`` as `flannel archive` builds it
    (backend ``ort-fp32``: the graph itself runs on the graph model)."""
    from flannel.backends import DEFAULT_BACKEND
    from flannel.handlers.archive import ArchiveSettings, build_archive

    if archive:
        check_archive_of_export(Path(archive), export_dir)
        trust_archive(archive, trust_list)
        return Path(archive)
    return build_archive(run_dir, store, model_name=name,
                         settings=ArchiveSettings(backend=DEFAULT_BACKEND),
                         trust_list=trust_list, allow_unvalidated=allow_unvalidated)


def _write_python_model(repo: Path, name: str, mar: Path, side: int, trust_param: str) -> None:
    """``<name>/``: the unpacked archive, checked against the repository's trust list as the
    model will check it, with its ``model.py`` and ``config.pbtxt``."""
    version = repo / name / MODEL_VERSION
    unpack_archive(mar, version / DEFAULT_ARCHIVE_DIR)
    archive = TrustedArchive(version / DEFAULT_ARCHIVE_DIR, repo / TRUST_LIST_NAME)
    ExportFolder(version / DEFAULT_ARCHIVE_DIR)  # every artifact against its sha256
    archived_side = int(json.loads(archive.read_file(
        archive.manifest["artifacts"][INPUT_SPEC]["path"]))["resize"])
    if archived_side != side:
        raise TritonExportError(f"{mar.name} preprocesses to {archived_side} px, the export's "
                                f"graph takes {side}")
    (version / "model.py").write_text(MODEL_PY)
    (repo / name / "config.pbtxt").write_text(python_model_config(
        name, archive.model_config(), side, trust_list=trust_param,
        graph_model=name + GRAPH_SUFFIX))


def repository_readme(name: str, export_dir: Path, graph: GraphSpec, side: int, mount_path: str,
                      plan_line: str, has_plan: bool) -> str:
    """The repository's README: what each model is and how to start Triton on it."""
    from flannel.handlers.triton_process import KEY_HEADER, RESTRICTED_APIS

    restricted = f"{','.join(RESTRICTED_APIS)}:{KEY_HEADER}=Bearer $KEY"
    plan = (f"- `{name}{PLAN_SUFFIX}/`: the same graph as a TensorRT plan ({plan_line}); it loads "
            "only on that GPU model with that TensorRT version. Point the Python model's "
            f"`graph_model` parameter at it to use it." if has_plan else f"- {plan_line}.")
    return f"""# Triton model repository of `{name}`
Written by `flannel export triton` from `{export_dir}`, to be mounted at `{mount_path}`.

- `{name}/`: Python backend (`flannel.handlers.triton_model`): `image` (PNG, JPEG, DICOM files) or
  `pixels` (FP32 [N, 1, {side}, {side}]) in, the product's answers out. It checks `1/archive` against
  `{mount_path}/{TRUST_LIST_NAME}` before loading and runs the graph on `{name}{GRAPH_SUFFIX}` (BLS).
- `{name}{GRAPH_SUFFIX}/`: the parity-gated fp32 ONNX graph on the ONNX Runtime backend: `{graph.input_name}`
  FP32 [N, 1, {side}, {side}] in [0, 1] in; {", ".join(f"`{o}`" for o in graph.output_names)} out.
{plan}
- `{TRUST_LIST_NAME}`: the archive's files and their sha256, which the Python model requires.

Start a full Triton (`nvcr.io/nvidia/tritonserver:<release>-py3`) on it, `$KEY` holding the key
clients send as `{KEY_HEADER}: Bearer <key>` (health needs none):

    tritonserver --model-repository={mount_path} --model-control-mode=none \\
        "--http-restricted-api={restricted}" \\
        "--grpc-restricted-protocol={restricted}"

The Python model imports `flannel`: install this package (the same version) into the Python
environment of Triton's Python backend. `deploy/kserve-triton.yaml` serves it on KServe.
"""


def _staging_folder(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    staging.chmod(0o755)  # readable by the server's account, like the folder it replaces
    return staging


def export_triton_repository(run_dir: str | Path, out: str | Path | None = None, *,
                             archive: str | Path | None = None, device: str = "gpu",
                             mount_path: str = DEFAULT_MOUNT_PATH,
                             max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                             allow_unvalidated: bool = False, overwrite: bool = False) -> Path:
    """Write the Triton model repository of ``run_dir``'s export.

    Args:
        run_dir: a learner run or ensemble folder with a verified, parity-passed ``export/``.
        out: the repository folder (default ``RUN_DIR/export/triton_repository``).
        archive: a ``.mar`` of this export to serve; default: one is built as `flannel archive`
            builds it (backend ``ort-fp32``) in a temporary store.
        device: where the graph model runs, ``gpu`` or ``cpu`` (the TensorRT plan always
            runs on the GPU).
        mount_path: the repository's absolute path inside the server; the Python model's
            ``trust_list`` parameter names the trust list there.
        max_batch_size: the largest batch the graph models take; at least what one BLS call of
            the Python model carries.
        allow_unvalidated: build the archive even though no external evaluation exists.
        overwrite: replace an existing ``out``.

    Returns:
        The repository folder.

    Raises:
        TritonExportError, ArchiveError: the export or the archive cannot be served (unverified,
            parity not passed, another export's archive, names or shapes that differ).
    """
    from flannel.handlers.archive import check_export

    export_dir = export_dir_of(run_dir)
    out = Path(out) if out else export_dir / REPOSITORY_DIRNAME
    if device not in INSTANCE_KINDS:
        raise TritonExportError(f"device {device!r}: use one of {sorted(INSTANCE_KINDS)}")
    if not PurePosixPath(mount_path).is_absolute():
        raise TritonExportError(f"--mount-path {mount_path!r} must be absolute")
    if max_batch_size < MAX_BATCH_IMAGES:
        raise TritonExportError(f"max batch size {max_batch_size}: one BLS call of the Python "
                                f"model carries up to {MAX_BATCH_IMAGES} images")
    if out.exists() and not overwrite:
        raise TritonExportError(f"{out} exists: pass --overwrite to replace it")
    manifest = check_export(export_dir)
    name = Path(archive).stem if archive else manifest["model_name"]
    staging = _staging_folder(out)
    try:
        side, plan_line = _write_graph_models(staging, name, export_dir, manifest,
                                              INSTANCE_KINDS[device], max_batch_size)
        with tempfile.TemporaryDirectory(prefix="flannel-triton-store-") as store:
            mar = _listed_archive(run_dir, export_dir, name, archive, Path(store),
                                  staging / TRUST_LIST_NAME, allow_unvalidated)
            _write_python_model(staging, name, mar, side,
                                str(PurePosixPath(mount_path) / TRUST_LIST_NAME))
        (staging / f"{TRUST_LIST_NAME}.lock").unlink(missing_ok=True)
        (staging / README_NAME).write_text(repository_readme(
            name, export_dir, graph_spec(manifest), side, mount_path, plan_line,
            (staging / (name + PLAN_SUFFIX)).is_dir()))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote the Triton repository %s (%s)", out, plan_line)
    return out


def summary_lines(repo: str | Path) -> list[str]:
    """One line per model of a repository: its runtime, instance kind, largest batch and file."""
    import re

    lines = []
    for config in sorted(Path(repo).glob("*/config.pbtxt")):
        text = config.read_text()
        runtime = re.search(r'^(?:backend|platform): "([^"]+)"', text, re.M)
        kind = re.search(r"kind: (KIND_\w+)", text)
        batch = re.search(r"^max_batch_size: (\d+)", text, re.M)
        files = sorted(p for p in (config.parent / MODEL_VERSION).iterdir() if p.is_file())
        size = sum(p.stat().st_size for p in (config.parent / MODEL_VERSION).rglob("*")
                   if p.is_file())
        lines.append(f"{config.parent.name:<28} {runtime[1] if runtime else '?':<14} "
                     f"{kind[1] if kind else '?':<9} max batch {batch[1] if batch else '?':>3}  "
                     f"{', '.join(p.name for p in files)} ({size:,d} B)")
    return lines
