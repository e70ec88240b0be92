"""The trust list: `flannel archive` lists each archive, `flannel serve start` and the worker refuse
anything else, and every artifact is loaded from the bytes that were checked.

    .venv/bin/pytest tests/test_trust.py -q
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest

from flannel.artifacts import verify_manifest, write_manifest
from flannel.handlers.archive import ArchiveSettings, build_archive
from flannel.handlers.serving import answer_batch, load_served_model
from flannel.handlers.trust import (TRUST_LIST_ENV, TRUST_LIST_NAME, TrustError, TrustedArchive,
                                    check_model_store, read_trust_list, trust_list_path)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ArchiveSettings(batch_size=2, workers=1, intra_op_threads=1)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def built(exported_tiny_run, tmp_path_factory):
    """(run, store, trust list, .mar): one archive built from a parity-checked tiny run."""
    from flannel.export.parity import run_parity

    root = tmp_path_factory.mktemp("trust")
    run = shutil.copytree(exported_tiny_run, root / "run")
    run_parity(run)
    mar = build_archive(run, root / "model_store", version="2.0", settings=SETTINGS)
    return run, root / "model_store", root / TRUST_LIST_NAME, mar


def rewrite_mar(src: Path, dest: Path, replace: dict[str, bytes] = {}, add: dict[str, bytes] = {}):
    """A copy of an archive with some members replaced and some added."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, replace.get(info.filename, zin.read(info)))
        for name, data in add.items():
            zout.writestr(name, data)
    return dest


@pytest.fixture
def unpacked(built, tmp_path) -> Path:
    """The archive unpacked as TorchServe unpacks it (a private copy a test may modify)."""
    with zipfile.ZipFile(built[3]) as zf:
        zf.extractall(tmp_path / "model")
    return tmp_path / "model"


# --- what `flannel archive` writes --------------------------------------------------------------

def test_archive_is_listed_with_every_file_it_holds(built):
    _, store, trust_list, mar = built
    assert trust_list_path(store, environ={}) == trust_list  # beside the store, outside it
    (entry,) = [e for e in read_trust_list(trust_list) if e["name"] == mar.name]
    assert entry["sha256"] == sha(mar.read_bytes()) and entry["bytes"] == mar.stat().st_size
    with zipfile.ZipFile(mar) as zf:
        members = {i.filename: sha(zf.read(i)) for i in zf.infolist() if not i.is_dir()}
    assert entry["files"] == members
    assert {"image_classifier.py", "model-config.yaml", "MAR-INF/MANIFEST.json", "manifest.json",
            "model.onnx", "model.eager.pt"} <= set(members)
    assert stat.S_IMODE(trust_list.stat().st_mode) == 0o644
    assert not list(store.glob("*.json"))  # nothing of the trust list inside the model store
    assert check_model_store(store) == [entry]


def test_archiving_again_replaces_the_entry_and_the_old_bytes_are_no_longer_trusted(built, tmp_path):
    run, _, _, _ = built
    store, trust_list = tmp_path / "store", tmp_path / "list.json"
    first = build_archive(run, store, version="1", settings=SETTINGS, trust_list=trust_list)
    old = tmp_path / "old.mar"
    shutil.copy(first, old)
    build_archive(run, store, version="2", settings=SETTINGS, trust_list=trust_list)
    (entry,) = read_trust_list(trust_list)
    assert entry["sha256"] == sha((store / first.name).read_bytes()) != sha(old.read_bytes())
    shutil.copy(old, store / first.name)  # roll back to the earlier build without archiving
    with pytest.raises(TrustError, match=rf"{first.name}: sha256 .* but the listed "
                                         rf"{first.name} .*changed: MAR-INF/MANIFEST.json"):
        check_model_store(store, trust_list)


# --- what `flannel serve start` refuses, before TorchServe starts ------------------------------

@pytest.mark.parametrize("change, words", [
    ({"replace": {"model-config.yaml": b"minWorkers: 8\n"}}, "changed: model-config.yaml"),
    ({"add": {"flannel/__init__.py": b"import os\n"}}, r"extra: flannel/__init__.py"),
    ({"replace": {"image_classifier.py": b"class Handler: pass\n"}}, "changed: image_classifier.py"),
])
def test_serve_start_refuses_a_modified_archive_naming_it_and_what_changed(built, tmp_path,
                                                                           change, words):
    _, _, trust_list, mar = built
    store = tmp_path / "model_store"
    store.mkdir()
    shutil.copy(mar, store / "good.mar")  # a listed archive beside it is admitted
    rewrite_mar(mar, store / mar.name, **change)
    with pytest.raises(TrustError) as err:
        check_model_store(store, trust_list)
    text = str(err.value)
    assert f"1 archive(s) not on the trust list {trust_list}" in text
    assert f"{mar.name}: sha256" in text and words in text and "good.mar" not in text


def test_serve_start_refuses_an_unlisted_archive_and_a_missing_list(built, tmp_path):
    run, _, trust_list, mar = built
    store = tmp_path / "model_store"
    other = build_archive(run, store, model_name="other", settings=SETTINGS,
                          trust_list=tmp_path / "elsewhere.json")
    shutil.copy(mar, store / mar.name)
    with pytest.raises(TrustError, match=r"other.mar: sha256 [0-9a-f]{12}, no archive of this "
                                         r"name is listed"):
        check_model_store(store, trust_list)
    with pytest.raises(TrustError, match=rf"{mar.name}: .*no archive of this name"):
        check_model_store(store, tmp_path / "elsewhere.json")
    other.unlink()
    with pytest.raises(TrustError, match=r"no trust list at .*missing.json: `flannel archive` "
                                         r"writes it"):
        check_model_store(store, tmp_path / "missing.json")


def test_serve_start_passes_the_list_to_workers_and_refuses_through_serve_error(built, tmp_path,
                                                                               monkeypatch):
    from flannel.handlers.trust import admit_server, server_env
    from flannel.handlers.ts_config import ServeError, loopback_config, server_info

    _, store, trust_list, _ = built
    config = loopback_config(tmp_path / "config.properties", store, REPO / "config.properties")
    monkeypatch.delenv(TRUST_LIST_ENV, raising=False)
    assert server_env(store)[TRUST_LIST_ENV] == str(trust_list)
    admit_server(server_info(config))  # the repository's config and a trusted store: admitted
    monkeypatch.setenv(TRUST_LIST_ENV, str(tmp_path / "other.json"))
    assert server_env(store)[TRUST_LIST_ENV] == str(tmp_path / "other.json")
    with pytest.raises(ServeError, match="no trust list at"):
        admit_server(server_info(config))


@pytest.mark.parametrize("line, words", [
    ("allowed_urls=file://.*/model_store/[^/]+[.]mar",
     r"allowed_urls admits file:///tmp/model_store/model.mar; allowed_urls admits file://.*"),
    ("enable_model_api=true", "enable_model_api=true lets the management key register models"),
    ("allowed_urls=https://example[.]com/.*", "allowed_urls admits https://example.com/model.mar"),
    ("#allowed_urls=(?!)",
     r"allowed_urls admits https://example.com/model.mar; .* admits http://127.0.0.1"),
])
def test_serve_start_refuses_a_config_that_registers_from_urls(built, tmp_path, line, words):
    from flannel.handlers.trust import admit_server
    from flannel.handlers.ts_config import ServeError, server_info

    _, store, _, _ = built
    text = (REPO / "config.properties").read_text().replace("allowed_urls=(?!)", "")
    (tmp_path / "config.properties").write_text(f"{text}\nmodel_store={store}\n{line}\n")
    with pytest.raises(ServeError,
                       match=rf"refusing to start with .*: {words}.* allowed_urls=\(\?!\)"):
        admit_server(server_info(tmp_path / "config.properties"))


def test_serve_start_refuses_a_store_holding_anything_but_archives(built, tmp_path):
    from flannel.handlers.trust import admit_server
    from flannel.handlers.ts_config import ServeError, loopback_config, server_info

    _, _, trust_list, mar = built
    store = tmp_path / "model_store"
    store.mkdir()
    shutil.copy(mar, store / mar.name)
    shutil.copy(trust_list, tmp_path / TRUST_LIST_NAME)
    (store / "README.md").write_text("archives live here\n")
    config = loopback_config(tmp_path / "config.properties", store, REPO / "config.properties")
    admit_server(server_info(config))
    (store / "pipeline.war").write_bytes(b"PK")
    (store / "model_dir").mkdir()
    with pytest.raises(ServeError, match=r"it holds model_dir, pipeline.war, which are not model "
                                         r"archives"):
        admit_server(server_info(config))


# --- what the worker refuses when it initialises ------------------------------------------------

def test_the_unpacked_archive_matches_its_entry(built, unpacked):
    _, _, trust_list, mar = built
    archive = TrustedArchive(unpacked, trust_list)
    assert archive.name == mar.name
    assert archive.model_config()["handler"]["intra_op_threads"] == 1
    assert archive.mar_manifest()["model"]["modelVersion"] == "2.0"


def _refused(unpacked: Path, trust_list: Path, words: str) -> None:
    with pytest.raises(TrustError, match=words):
        TrustedArchive(unpacked, trust_list)


def test_worker_refuses_extra_files_and_folders(built, unpacked):
    trust_list = built[2]
    (unpacked / "flannel").mkdir()
    _refused(unpacked, trust_list, r"not those of any archive .*closest is resnet18.mar .*"
                                   r"extra folders: flannel/")
    (unpacked / "flannel" / "__init__.py").write_text("raise SystemExit\n")
    _refused(unpacked, trust_list, r"extra: flannel/__init__.py")
    shutil.rmtree(unpacked / "flannel")
    (unpacked / "__pycache__").mkdir()
    (unpacked / "__pycache__" / "image_classifier.cpython-311.pyc").write_bytes(b"\0" * 16)
    _refused(unpacked, trust_list, r"extra: __pycache__/image_classifier.cpython-311.pyc")


def test_worker_refuses_a_swapped_handler_config_or_link(built, unpacked):
    trust_list = built[2]
    config = (unpacked / "model-config.yaml").read_bytes()
    (unpacked / "model-config.yaml").write_bytes(config.replace(b"intra_op_threads: 1",
                                                                b"intra_op_threads: 2"))
    _refused(unpacked, trust_list, "changed: model-config.yaml")
    (unpacked / "model-config.yaml").write_bytes(config)
    (unpacked / "image_classifier.py").write_text("class Handler: pass\n")
    _refused(unpacked, trust_list, "changed: image_classifier.py")
    (unpacked / "image_classifier.py").unlink()
    (unpacked / "image_classifier.py").symlink_to(built[0] / "export" / "manifest.json")
    _refused(unpacked, trust_list, "'image_classifier.py' is a link")


def test_a_self_consistent_swap_passes_the_manifest_but_not_the_trust_list(built, unpacked):
    """Class names swapped and manifest.json rewritten to match: the archive's own manifest check
    passes (it is self-referential), the trust list refuses."""
    trust_list = built[2]
    names = json.loads((unpacked / "index_to_name.json").read_text())
    names["0"], names["1"] = names["1"], names["0"]
    (unpacked / "index_to_name.json").write_text(json.dumps(names))
    manifest = json.loads((unpacked / "manifest.json").read_text())
    entry = manifest["artifacts"]["index_to_name"]
    entry["sha256"] = sha((unpacked / "index_to_name.json").read_bytes())
    entry["bytes"] = (unpacked / "index_to_name.json").stat().st_size
    write_manifest(unpacked, manifest)
    verify_manifest(unpacked)  # no ManifestError
    _refused(unpacked, trust_list, r"changed: index_to_name.json, manifest.json")


def test_worker_refuses_without_a_trust_list_from_its_environment(built, unpacked, monkeypatch):
    monkeypatch.delenv(TRUST_LIST_ENV, raising=False)
    with pytest.raises(TrustError, match=f"{TRUST_LIST_ENV} is not set in this worker's "
                                         "environment"):
        TrustedArchive(unpacked)
    monkeypatch.setenv(TRUST_LIST_ENV, str(built[2]))
    assert TrustedArchive(unpacked).name == built[3].name


# --- load-time checks: the bytes loaded are the bytes hashed ------------------------------------

def test_artifacts_are_loaded_from_the_bytes_that_were_checked(built, unpacked, monkeypatch):
    import onnxruntime as ort
    import torch

    archive = TrustedArchive(unpacked, built[2])
    files = archive.entry["files"]
    sessions, loads = [], []
    real_session, real_load = ort.InferenceSession, torch.load

    def session(model, *args, **kwargs):
        sessions.append(model)
        return real_session(model, *args, **kwargs)

    def load(f, *args, **kwargs):
        loads.append(f.getvalue() if isinstance(f, io.BytesIO) else f)
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(torch, "load", load)
    served = load_served_model(unpacked, {"intra_op_threads": 1}, source=archive)
    served.explainer.graph()
    (model,) = sessions
    assert isinstance(model, bytes) and sha(model) == files["model.onnx"]
    (weights,) = loads
    assert isinstance(weights, bytes) and sha(weights) == files["model.eager.pt"]


def test_a_file_swapped_after_the_folder_check_is_refused_when_it_is_loaded(built, unpacked):
    archive = TrustedArchive(unpacked, built[2])
    good = (unpacked / "model.onnx").read_bytes()
    (unpacked / "model.onnx").write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(TrustError, match=r"model.onnx in .* has sha256 [0-9a-f]{12}, but the "
                                         r"trust list has [0-9a-f]{12} for resnet18.mar"):
        load_served_model(unpacked, {"intra_op_threads": 1}, source=archive)


def test_eager_weights_swapped_after_initialize_are_refused_at_the_first_explanation(
        built, unpacked):
    """model.eager.pt is read at the first explanation, maybe hours after the model loaded: it is
    checked then, on the bytes that are loaded."""
    import torch

    from test_serving_unit import png_bytes

    archive = TrustedArchive(unpacked, built[2])
    served = load_served_model(unpacked, {"intra_op_threads": 1}, source=archive)
    state = torch.load(io.BytesIO((unpacked / "model.eager.pt").read_bytes()), weights_only=True)
    state = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    (unpacked / "model.eager.pt").write_bytes(buf.getvalue())
    with pytest.raises(TrustError, match="model.eager.pt in .* changed after the archive"):
        served.explainer.graph()
    (answer,) = answer_batch(served, [{"body": png_bytes()}])
    assert answer.status == 200  # predictions go on from the backend loaded at initialize
    assert np.isclose(sum(answer.body["probabilities"].values()), 1.0, atol=1e-4)


def test_an_archive_holding_anything_but_its_sources_is_never_listed(built, tmp_path):
    """torch-model-archiver zips whatever its staging folder holds; the builder lists an archive
    only when it holds exactly the files it was built from."""
    from flannel.handlers.archive import ArchiveError, check_archive_contents
    from flannel.handlers.trust import MAR_MANIFEST, archive_files

    mar = built[3]
    expected = {k: v for k, v in archive_files(mar).items() if k != MAR_MANIFEST}
    copy = shutil.copy(mar, tmp_path / mar.name)
    assert check_archive_contents(Path(copy), expected)[2] == archive_files(mar)
    injected = rewrite_mar(mar, tmp_path / "injected.mar", add={"flannel/__init__.py": b"x = 1\n"})
    with pytest.raises(ArchiveError, match=r"refusing injected.mar: .*extra: flannel/__init__.py"):
        check_archive_contents(injected, expected)
    assert not injected.exists()
