"""A Triton model repository for the archives of a model store (``flannel serve start --runtime
triton``), one Python-backend model per archive.

    python -c "from flannel.handlers.triton_repository import serving_repository as s; \\
               print(s('model_store', '/tmp/repo'))"

Each archive is unpacked into ``<repo>/<name>/1/archive`` exactly as TorchServe unpacks it (the
model checks the folder against the trust list before loading anything); ``<repo>/<name>/1/model.py``
imports the adapter (``flannel.handlers.triton_model``). ``config.pbtxt`` carries the archive's
``model-config.yaml``: its batch size becomes the dynamic batcher's preferred batch and its
delay the queue delay, its workers the instance count.
"""
from __future__ import annotations

import shutil
import zipfile
from pathlib import Path, PurePosixPath

from flannel.handlers import open_inference as v2
from flannel.handlers.triton_model import (ARCHIVE_PARAM, DEFAULT_ARCHIVE_DIR, GRAPH_PARAM,
                                           IMAGE_INPUT, PIXELS_INPUT, TRUST_PARAM)

MODEL_VERSION = "1"
# The model.py of every archive's model: the adapter lives in the installed package.
MODEL_PY = ('"""Serves the archive in ./archive with flannel.handlers.triton_model."""\n'
            "from flannel.handlers.triton_model import TritonPythonModel  # noqa: F401\n")
# Images one dynamic batch may hold: a single v2 request may carry MAX_ITEMS, as on TorchServe.
MAX_BATCH_IMAGES = v2.MAX_ITEMS
# Outputs an answer may carry (``serving._answer``), with their datatypes. Triton checks each
# response output against this list; shapes vary (per image, or per model for the names).
OUTPUTS = {"probabilities": "TYPE_FP32", "prediction": "TYPE_STRING", "classes": "TYPE_STRING",
           "learner_weights": "TYPE_FP32", "learners": "TYPE_STRING",
           "decision": "TYPE_STRING", "prediction_set": "TYPE_BOOL", "refer": "TYPE_BOOL",
           "ood_score": "TYPE_FP32", "model_card_sha256": "TYPE_STRING",
           "explanation": "TYPE_STRING", "dicom_sr": "TYPE_STRING", "dicom_sc": "TYPE_STRING",
           "warnings": "TYPE_STRING"}


class RepositoryError(RuntimeError):
    """An archive cannot be laid out as a Triton model."""


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def python_model_config(name: str, model_config: dict, input_side: int, *,
                        trust_list: str | Path | None = None, graph_model: str | None = None,
                        archive_dir: str = DEFAULT_ARCHIVE_DIR) -> str:
    """``config.pbtxt`` of one archive's Python-backend model.

    Args:
        name: the model's name (the archive's).
        model_config: the archive's ``model-config.yaml``.
        input_side: R of the archive's (N, 1, R, R) preprocessed input.
        trust_list: the trust list the model checks its archive against.
        graph_model: run the graph on this Triton model (BLS) instead of in-process.
        archive_dir: the unpacked archive, relative to the version folder.
    """
    batch = int(model_config.get("batchSize", 1))
    delay_us = int(model_config.get("maxBatchDelay", 0)) * 1000
    workers = int(model_config.get("minWorkers", 1))
    params = {ARCHIVE_PARAM: archive_dir}
    if trust_list:
        params[TRUST_PARAM] = str(trust_list)
    if graph_model:
        params[GRAPH_PARAM] = graph_model
    outputs = ",\n".join(f"  {{ name: {_quoted(n)} data_type: {t} dims: [ -1 ] }}"
                         for n, t in OUTPUTS.items())
    parameters = "\n".join(f"parameters: {{ key: {_quoted(k)} value: {{ string_value: "
                           f"{_quoted(v)} }} }}" for k, v in params.items())
    preferred = min(batch, MAX_BATCH_IMAGES)
    return f"""name: {_quoted(name)}
backend: "python"
max_batch_size: {MAX_BATCH_IMAGES}
input [
  {{ name: "{IMAGE_INPUT}" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "{PIXELS_INPUT}" data_type: TYPE_FP32 dims: [ 1, {input_side}, {input_side} ] optional: true }}
]
output [
{outputs}
]
dynamic_batching {{
  preferred_batch_size: [ {preferred} ]
  max_queue_delay_microseconds: {delay_us}
}}
instance_group [ {{ kind: KIND_CPU count: {workers} }} ]
{parameters}
"""


def unpack_archive(mar: Path, dest: Path) -> None:
    """Unpack ``mar`` into ``dest`` (made empty first), refusing any entry that would land
    outside it or is not a plain file or folder."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with zipfile.ZipFile(mar) as zf:
        for info in zf.infolist():
            path = PurePosixPath(info.filename)
            if path.is_absolute() or ".." in path.parts or "\\" in info.filename:
                raise RepositoryError(f"{mar.name}: entry {info.filename[:100]!r} would land "
                                      f"outside the model's folder")
            kind = (info.external_attr >> 16) & 0o170000
            if kind not in (0, 0o100000, 0o040000):
                raise RepositoryError(f"{mar.name}: entry {info.filename[:100]!r} is not a plain "
                                      f"file or folder")
            target = dest.joinpath(*path.parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, target.open("wb") as out:
                shutil.copyfileobj(src, out)


def _archive_facts(archive_dir: Path, trust_list: Path) -> tuple[dict, int]:
    """The model-config.yaml and the input side of an unpacked archive, read through the trust
    check the model repeats when it loads."""
    import json

    from flannel.artifacts import INPUT_SPEC
    from flannel.handlers.trust import TrustedArchive

    archive = TrustedArchive(archive_dir, trust_list)
    spec = json.loads(archive.read(INPUT_SPEC))
    return archive.model_config(), int(spec["resize"])


def serving_repository(model_store: str | Path, repo: str | Path,
                       trust_list: str | Path | None = None) -> list[str]:
    """Lay out every archive of ``model_store`` as a Python-backend model under ``repo``.

    The store must already be admitted (``flannel.handlers.trust.check_model_store``).

    Returns:
        The model names, sorted.

    Raises:
        RepositoryError, TrustError: an archive that cannot be unpacked or does not check.
    """
    from flannel.handlers.trust import trust_list_path

    store, repo = Path(model_store), Path(repo)
    trust_list = Path(trust_list) if trust_list else trust_list_path(store)
    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir(parents=True)
    names = []
    for mar in sorted(store.glob("*.mar")):
        name = mar.stem
        version = repo / name / MODEL_VERSION
        unpack_archive(mar, version / DEFAULT_ARCHIVE_DIR)
        model_config, side = _archive_facts(version / DEFAULT_ARCHIVE_DIR, trust_list)
        (version / "model.py").write_text(MODEL_PY)
        (repo / name / "config.pbtxt").write_text(
            python_model_config(name, model_config, side, trust_list=trust_list))
        names.append(name)
    return names
