"""`flannel archive`: contents of the .mar, and refusal of unverified or unchecked exports.

    .venv/bin/pytest tests/test_archive.py -q
"""
from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import yaml

from flannel.cli import main as flannel_main
from flannel.data.records import read_manifest as read_rows
from flannel.artifacts import read_manifest, write_manifest
from flannel.handlers.archive import ArchiveError, ArchiveSettings, build_archive
from flannel.handlers.serving import answer_batch, load_served_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checked_run(exported_tiny_run, tmp_path_factory) -> Path:
    """A private copy of the exported tiny run with parity passed."""
    from flannel.export.parity import run_parity

    run = shutil.copytree(exported_tiny_run, tmp_path_factory.mktemp("archive") / "run")
    run_parity(run)
    return run


@pytest.fixture(scope="module")
def mar(checked_run, tmp_path_factory) -> Path:
    settings = ArchiveSettings(batch_size=4, max_batch_delay_ms=30, workers=2, response_timeout_s=90)
    return build_archive(checked_run, tmp_path_factory.mktemp("store"), version="3.1",
                         settings=settings)


def test_archive_holds_the_served_artifacts_with_their_export_hashes(mar, checked_run):
    manifest = read_manifest(checked_run / "export")
    assert mar.name == f"{manifest['model_name']}.mar"
    with zipfile.ZipFile(mar) as zf:
        names = set(zf.namelist())
        archived = json.loads(zf.read("manifest.json"))
        assert set(archived["artifacts"]) == {"onnx_fp32", "input_spec", "index_to_name",
                                              "reference_input", "answer_policy", "eager_fp32",
                                              "model_card", "model_card_markdown"}
        for key, entry in archived["artifacts"].items():
            # The card is written by the archive step, into the export folder too.
            assert entry == manifest["artifacts"].get(key) or entry["sha256"] == hashlib.sha256(
                (checked_run / "export" / entry["path"]).read_bytes()).hexdigest()
            assert hashlib.sha256(zf.read(entry["path"])).hexdigest() == entry["sha256"]
        assert archived["export_manifest_sha256"] == hashlib.sha256(
            (checked_run / "export" / "manifest.json").read_bytes()).hexdigest()
        # The ORT-optimised copy is not served and would double the archive.
        assert manifest["artifacts"]["onnx_fp32_ort_optimized"]["path"] not in names
        assert {"manifest.json", "parity.json", "model-config.yaml", "image_classifier.py",
                "input_spec.json", "index_to_name.json", "reference_input.npy",
                "model.onnx", "model.eager.pt", "model_card.json", "MODEL_CARD.md"} <= names
        mar_manifest = json.loads(zf.read("MAR-INF/MANIFEST.json"))
        config = yaml.safe_load(zf.read("model-config.yaml"))
    assert mar_manifest["model"] == {"modelName": manifest["model_name"], "modelVersion": "3.1",
                                     "serializedFile": "model.onnx", "handler": "image_classifier.py",
                                     "configFile": "model-config.yaml"}
    assert config["batchSize"] == 4 and config["maxBatchDelay"] == 30
    assert config["minWorkers"] == config["maxWorkers"] == 2 and config["responseTimeout"] == 90
    assert config["handler"]["backend"] == "ort-fp32"
    assert config["handler"]["explain_per_batch"] == 1
    # threads are decided by each worker where it runs, unless the archive was built with a value
    assert config["handler"]["inter_op_threads"] == 1 and "intra_op_threads" not in config["handler"]


def test_unpacked_archive_serves_like_the_export(mar, checked_run, tmp_path):
    with zipfile.ZipFile(mar) as zf:
        zf.extractall(tmp_path)
    config = yaml.safe_load((tmp_path / "model-config.yaml").read_text())
    from_mar = load_served_model(tmp_path, config["handler"], version="3.1")
    from_export = load_served_model(checked_run / "export")
    manifest_csv = json.loads((checked_run / "config.json").read_text())["manifest"]
    image = Path(read_rows(manifest_csv, split="val")[0].path).read_bytes()
    got, want = answer_batch(from_mar, [image, b"junk"]), answer_batch(from_export, [image])
    assert [a.status for a in got] == [200, 400]
    assert got[0].body["probabilities"] == want[0].body["probabilities"]
    assert got[0].body["version"] == "3.1"


@pytest.mark.parametrize("bad_path", ["/etc/hostname", "../outside.json", "sub/../../x.json",
                                      "link/index_to_name.json"])
def test_unpacked_archive_with_a_path_outside_it_refuses_to_load(mar, tmp_path, bad_path):
    """A manifest is read from archives that may come from elsewhere: an absolute path, a
    ``..`` or a symlink out of the folder must not make the loader open another file."""
    from flannel.artifacts import ManifestError

    model_dir = tmp_path / "model"
    with zipfile.ZipFile(mar) as zf:
        zf.extractall(model_dir)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(model_dir / "index_to_name.json", outside / "index_to_name.json")
    (model_dir / "link").symlink_to(outside)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    manifest["artifacts"]["index_to_name"]["path"] = bad_path
    (model_dir / "manifest.json").write_text(json.dumps(manifest))
    config = yaml.safe_load((model_dir / "model-config.yaml").read_text())
    with pytest.raises(ManifestError, match="index_to_name.*(must be relative|outside)"):
        load_served_model(model_dir, config["handler"])


def _refused(run: Path, store: Path, words: str) -> None:
    with pytest.raises(ArchiveError, match=words):
        build_archive(run, store)
    assert not list(store.glob("*.mar")) if store.exists() else True


def test_refuses_export_without_parity(exported_run_dir, tmp_path):
    _refused(exported_run_dir, tmp_path / "store", "parity gate has not been run")


def test_refuses_failed_parity(checked_run, tmp_path):
    run = shutil.copytree(checked_run, tmp_path / "run")
    manifest = read_manifest(run / "export")
    manifest["parity"]["passed"] = False
    write_manifest(run / "export", manifest)
    _refused(run, tmp_path / "store", "parity gate failed")


def test_refuses_modified_artifact(checked_run, tmp_path):
    run = shutil.copytree(checked_run, tmp_path / "run")
    (run / "export" / "index_to_name.json").write_text('{"0": "Normal"}')
    _refused(run, tmp_path / "store", "index_to_name.*sha256")


def test_cli_archives_and_refuses(checked_run, exported_run_dir, tmp_path, capsys):
    store = tmp_path / "store"
    assert flannel_main(["archive", str(checked_run), "--model-store", str(store),
                         "--batch-size", "2", "--max-batch-delay", "10", "--workers", "1"]) == 0
    with zipfile.ZipFile(store / "resnet18.mar") as zf:
        config = yaml.safe_load(zf.read("model-config.yaml"))
    assert (config["batchSize"], config["maxBatchDelay"], config["maxWorkers"]) == (2, 10, 1)
    assert flannel_main(["archive", str(checked_run), "--model-store", str(tmp_path / "small"),
                         "--no-explanations"]) == 0
    with zipfile.ZipFile(tmp_path / "small" / "resnet18.mar") as zf:
        assert "model.eager.pt" not in zf.namelist()
        assert "eager_fp32" not in json.loads(zf.read("manifest.json"))["artifacts"]
    assert flannel_main(["archive", str(exported_run_dir), "--model-store", str(tmp_path / "s2")]) == 2
    assert "parity" in capsys.readouterr().out
