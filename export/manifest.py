"""The export manifest: every artifact with its sha256, plus what is needed to use it.

    python -c "from flannel.export.manifest import verify_manifest; verify_manifest('runs/x/export')"

Later stages (archive, handler) call ``verify_manifest`` and refuse an artifact whose bytes do not
match. The manifest is JSON so that it can be read without this package.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1

# The export folder's contract, shared by export, parity, archive and the handler: artifact keys
# of the manifest and the file each one is written to. Readers look files up through the
# manifest's ``artifacts[key]["path"]``, never by file name.
EXPORT_DIRNAME = "export"
ONNX_FP32 = "onnx_fp32"
ONNX_FP32_ORT_OPTIMIZED = "onnx_fp32_ort_optimized"
PREPROCESS = "preprocess"
INDEX_TO_NAME = "index_to_name"
ARTIFACT_FILES = {ONNX_FP32: "model.onnx", ONNX_FP32_ORT_OPTIMIZED: "model.optimized.onnx",
                  PREPROCESS: "preprocess.json", INDEX_TO_NAME: "index_to_name.json"}
PARITY_REPORT_NAME = "parity.json"


class ManifestError(RuntimeError):
    """An artifact is missing or its sha256 does not match the manifest."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def export_dir_of(run_dir: str | Path) -> Path:
    """The export folder of a run folder."""
    return Path(run_dir) / EXPORT_DIRNAME


def artifact_path(export_dir: str | Path, manifest: dict, key: str) -> Path:
    """Where the manifest says artifact ``key`` lives.

    Raises:
        ManifestError: the manifest lists no such artifact.
    """
    try:
        return Path(export_dir) / manifest["artifacts"][key]["path"]
    except KeyError:
        raise ManifestError(f"the manifest in {export_dir} lists no {key!r} artifact") from None


def artifact_entry(export_dir: Path, path: Path) -> dict:
    """Manifest entry of one file, with its path relative to the export folder."""
    return {"path": str(path.relative_to(export_dir)), "sha256": sha256_file(path),
            "bytes": path.stat().st_size}


def write_manifest(export_dir: str | Path, manifest: dict) -> Path:
    """Write ``manifest`` (with ``format`` and ``created`` filled in) to ``export_dir``."""
    export_dir = Path(export_dir)
    manifest = {"format": MANIFEST_FORMAT,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                **manifest}
    path = export_dir / MANIFEST_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def read_manifest(export_dir: str | Path) -> dict:
    path = Path(export_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST_NAME} in {export_dir}: run `flannel export onnx` first")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{path}: manifest format {manifest.get('format')} is not "
                            f"{MANIFEST_FORMAT}")
    return manifest


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
        path = export_dir / entry["path"]
        if not path.is_file():
            raise ManifestError(f"artifact {name!r} is missing: {path}")
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise ManifestError(f"artifact {name!r} ({path}) has sha256 {actual}, but the manifest "
                                f"says {entry['sha256']}: refusing to load a modified artifact")
    return manifest
