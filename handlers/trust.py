"""The trust list: which model archives the operator built, recorded outside the model store.

    python -c "from flannel.handlers.trust import check_model_store; print(check_model_store('model_store'))"

``flannel archive`` records each ``.mar`` it writes in ``trusted_archives.json`` (by default
beside the model store folder, which is the config's folder in the usual layout; the
``FLANNEL_TRUST_LIST`` environment variable names another file): the archive's sha256 and the
sha256 of every file inside it. ``flannel serve start`` refuses a model store holding an archive
whose sha256 is not listed, naming each one, before TorchServe starts, and hands the list's
absolute path to TorchServe's workers (TorchServe passes its own environment on to them).

In a worker, ``TrustedArchive`` requires the unpacked archive to hold exactly the files of one
listed archive (the handler, ``model-config.yaml`` and ``MAR-INF/MANIFEST.json`` included; an
extra file or folder is refused), and each read returns bytes checked against the list at the
moment they are read, which the caller then parses or loads: no file is read again after its
check.

``manifest.json`` inside an archive only says that an export is consistent with itself; whoever
can rewrite an archive can rewrite it too. The trust list is the anchor: it lives outside the
model store and is written by whoever builds archives, not by the account that serves them.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import os
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Iterator, Mapping

from flannel.artifacts import (MANIFEST_NAME, artifact_path, parse_manifest, sha256_bytes,
                               sha256_file)

TRUST_LIST_NAME = "trusted_archives.json"
TRUST_LIST_ENV = "FLANNEL_TRUST_LIST"
TRUST_LIST_FORMAT = 1
# Readable by the server, which checks against it; writable by its owner only: the account that
# builds archives (in a container, not the account TorchServe runs as).
TRUST_LIST_MODE = 0o644
MAR_MANIFEST = "MAR-INF/MANIFEST.json"
MODEL_CONFIG = "model-config.yaml"
# Digits of a sha256 quoted in messages: enough to tell two archives apart by eye.
SHORT = 12


class TrustError(RuntimeError):
    """An archive, or an unpacked archive, is not one that the trust list names."""


def trust_list_path(model_store: str | Path, environ: Mapping[str, str] | None = None) -> Path:
    """The trust list for ``model_store``: ``FLANNEL_TRUST_LIST`` when set, else
    ``trusted_archives.json`` in the folder that holds the model store."""
    environ = os.environ if environ is None else environ
    if environ.get(TRUST_LIST_ENV):
        return Path(environ[TRUST_LIST_ENV]).absolute()
    return Path(model_store).resolve().parent / TRUST_LIST_NAME


def server_env(model_store: str | Path) -> dict[str, str]:
    """What TorchServe's launcher needs in its environment for the workers to check archives:
    the trust list's absolute path, and no bytecode written beside the unpacked handler (a
    ``__pycache__`` folder would be an extra file there, and the worker refuses extra files)."""
    return {TRUST_LIST_ENV: str(trust_list_path(model_store)), "PYTHONDONTWRITEBYTECODE": "1"}


# --- the .mar side: what `flannel archive` lists and `flannel serve start` checks ----------------

def archive_digest(mar: str | Path) -> tuple[str, int, dict[str, str]]:
    """The sha256 and size of a .mar and the sha256 of every file inside it, from one read."""
    data = Path(mar).read_bytes()
    return sha256_bytes(data), len(data), archive_files(io.BytesIO(data), Path(mar).name)


def archive_files(mar: str | Path | io.BytesIO, name: str | None = None) -> dict[str, str]:
    """sha256 of every file inside a .mar, by its path in the archive.

    Raises:
        TrustError: not a zip file, or a member that could land outside the unpacked folder
            (absolute, ``..``, a link) or is listed twice.
    """
    label = name or Path(mar).name
    files: dict[str, str] = {}
    try:
        with zipfile.ZipFile(mar) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                name = info.filename
                parts = PurePosixPath(name).parts
                if (name.startswith("/") or "\\" in name or ".." in parts
                        or stat.S_ISLNK(info.external_attr >> 16) or name in files):
                    raise TrustError(f"{label}: member {name[:100]!r} is absolute, "
                                     "leaves the archive, is a link or is listed twice")
                files[name] = sha256_bytes(zf.read(info))
    except zipfile.BadZipFile as exc:
        raise TrustError(f"{label} is not a zip archive ({exc})") from None
    return files


def trust_archive(mar: str | Path, trust_list: str | Path | None = None,
                  digest: tuple[str, int, dict[str, str]] | None = None) -> dict:
    """List ``mar`` (its sha256 and its files') in the trust list, replacing an earlier entry of
    the same name in the same model store.

    Args:
        mar: the archive ``flannel archive`` just wrote.
        trust_list: where the list lives (default: ``trust_list_path`` of the archive's store).
        digest: ``archive_digest(mar)`` as the caller checked it (default: read now).

    Returns:
        The entry written.
    """
    mar = Path(mar).resolve()
    path = Path(trust_list) if trust_list else trust_list_path(mar.parent)
    sha, size, files = digest or archive_digest(mar)
    entry = {"name": mar.name, "model_store": str(mar.parent), "sha256": sha, "bytes": size,
             "archived": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
             "files": files}
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        kept = [a for a in (read_trust_list(path) if path.exists() else [])
                if (a["name"], a["model_store"]) != (entry["name"], entry["model_store"])]
        _write_atomically(path, {"format": TRUST_LIST_FORMAT, "archives": [*kept, entry]})
    return entry


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Two `flannel archive` runs at once must not lose each other's entry."""
    import fcntl

    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _write_atomically(path: Path, content: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(content, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, TRUST_LIST_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_trust_list(path: str | Path) -> list[dict]:
    """The archives a trust list names.

    Raises:
        TrustError: no list there, or one this version cannot read.
    """
    path = Path(path)
    try:
        content = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise TrustError(f"no trust list at {path}: `flannel archive` writes it when it builds an "
                         f"archive (set {TRUST_LIST_ENV} if it lives elsewhere)") from None
    except (OSError, ValueError) as exc:
        raise TrustError(f"cannot read the trust list {path}: {exc}") from None
    if not isinstance(content, dict) or content.get("format") != TRUST_LIST_FORMAT:
        raise TrustError(f"{path} is not a format-{TRUST_LIST_FORMAT} trust list; build the "
                         "archives again with `flannel archive`")
    return list(content.get("archives") or [])


def file_differences(got: Mapping[str, str], want: Mapping[str, str]) -> str:
    """The files that differ between two {path: sha256} maps, in one line."""
    changed = sorted(p for p in got.keys() & want.keys() if got[p] != want[p])
    extra = sorted(got.keys() - want.keys())
    missing = sorted(want.keys() - got.keys())
    parts = [f"{label}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
             for label, names in (("changed", changed), ("extra", extra), ("missing", missing))
             if names]
    return "; ".join(parts) or "the same files"


def _why_untrusted(mar: Path, sha: str, entries: list[dict]) -> str:
    same_name = [e for e in entries if e["name"] == mar.name]
    if not same_name:
        return f"sha256 {sha[:SHORT]}, no archive of this name is listed"
    listed = next((e for e in same_name if e["model_store"] == str(mar.parent.resolve())),
                  same_name[-1])
    try:
        detail = file_differences(archive_files(mar), listed["files"])
    except TrustError as exc:
        detail = str(exc)
    return (f"sha256 {sha[:SHORT]}, but the listed {mar.name} (archived {listed['archived']}) has "
            f"{listed['sha256'][:SHORT]}: {detail}")


def check_model_store(model_store: str | Path, trust_list: str | Path | None = None) -> list[dict]:
    """Every .mar in ``model_store`` is on the trust list.

    Returns:
        The entries of the archives found (none when the store holds no archive).

    Raises:
        TrustError: naming every archive that is not listed, with why.
    """
    store = Path(model_store)
    mars = sorted(store.glob("*.mar"))
    if not mars:
        return []
    path = Path(trust_list) if trust_list else trust_list_path(store)
    entries = read_trust_list(path)
    by_sha = {e["sha256"]: e for e in entries}
    admitted, refused = [], []
    for mar in mars:
        sha = sha256_file(mar)
        if sha in by_sha:
            admitted.append(by_sha[sha])
        else:
            refused.append(f"{mar.name}: {_why_untrusted(mar, sha, entries)}")
    if refused:
        raise TrustError(f"refusing to serve {store}: {len(refused)} archive(s) not on the trust "
                         f"list {path}:\n  " + "\n  ".join(refused) + "\nbuild them with "
                         "`flannel archive` (which lists them) or take them out of the store")
    return admitted


# TorchServe's allowed_urls when a config sets none (ConfigManager.DEFAULT_TS_ALLOWED_URLS).
DEFAULT_ALLOWED_URLS = r"file://.*|http(s)?://.*"
# URLs a config must not admit: remote ones, and local files in and out of the model store.
PROBE_URLS = ("https://example.com/model.mar", "http://127.0.0.1/model.war",
              "file:///tmp/model_store/model.mar", "file:///srv/model.war")
# Store entries that are not archives but may sit there (model_store/README.md).
STORE_NOTES = ("*.md",)


def registration_problems(props: Mapping[str, str], model_store: Path) -> list[str]:
    """Why a config would let the management API load an archive from somewhere: the model API
    on, or ``allowed_urls`` admitting a URL. TorchServe 0.12 registers workflows, and the models
    they name, from any URL ``allowed_urls`` admits, whatever ``enable_model_api`` says."""
    import re

    problems = []
    if props.get("enable_model_api", "false").strip().lower() == "true":
        problems.append("enable_model_api=true lets the management key register models")
    value = props.get("allowed_urls", DEFAULT_ALLOWED_URLS)
    probes = (*PROBE_URLS, f"file://{Path(model_store).resolve().as_posix()}/model.mar")
    for pattern in value.split(","):
        try:
            admitted = [u for u in probes if re.fullmatch(pattern, u, re.IGNORECASE)]
        except re.error:
            admitted = [f"(a pattern this check cannot read: {pattern[:60]!r})"]
        problems += [f"allowed_urls admits {u}" for u in admitted]
    return problems


def store_intruders(model_store: Path) -> list[str]:
    """Entries of the model store other than archives and notes: a workflow archive or a folder
    there could be registered by name over the management API."""
    return sorted(p.name for p in Path(model_store).iterdir()
                  if not (p.is_file() and (p.suffix == ".mar" or
                                           any(p.match(n) for n in STORE_NOTES))))


def admit_server(info) -> None:
    """What ``flannel serve start`` checks before it launches TorchServe: every archive in the
    store is on the trust list, nothing else is in the store, and the config registers nothing
    from a URL.

    Args:
        info: the ``ServerInfo`` of the config about to start.

    Raises:
        ServeError: naming each refused archive, stray entry or config line.
    """
    from flannel.handlers.ts_config import ServeError, read_properties

    try:
        check_model_store(info.model_store)
    except TrustError as exc:
        raise ServeError(str(exc)) from None
    stray = store_intruders(info.model_store)
    if stray:
        raise ServeError(f"refusing to serve {info.model_store}: it holds {', '.join(stray[:8])}, "
                         "which are not model archives; only .mar files built by `flannel "
                         "archive` belong there")
    problems = registration_problems(read_properties(info.config), info.model_store)
    if problems:
        raise ServeError(f"refusing to start with {info.config}: " + "; ".join(problems) +
                         ". Set enable_model_api=false and allowed_urls=(?!) (no URL): archives "
                         "are served from the model store alone")


# --- the worker side: the unpacked archive, checked when the handler initialises and loads -------

def worker_trust_list(environ: Mapping[str, str] | None = None) -> Path:
    """The trust list a worker checks against: ``FLANNEL_TRUST_LIST``, which only the server's
    environment can set (never anything inside the archive).

    Raises:
        TrustError: it is not set.
    """
    environ = os.environ if environ is None else environ
    if not environ.get(TRUST_LIST_ENV):
        raise TrustError(f"{TRUST_LIST_ENV} is not set in this worker's environment, so there is "
                         "nothing to check the archive against: start TorchServe with `flannel "
                         f"serve start` (which sets it), or set {TRUST_LIST_ENV} to the trust "
                         "list `flannel archive` wrote")
    return Path(environ[TRUST_LIST_ENV])


def unpacked_files(model_dir: str | Path) -> tuple[dict[str, str], set[str]]:
    """sha256 of every file under an unpacked archive, and its folders, by relative path.

    Raises:
        TrustError: a link or anything else that is neither a file nor a folder.
    """
    root = Path(model_dir)
    files: dict[str, str] = {}
    folders: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISDIR(mode):
                folders.add(rel)
            elif stat.S_ISREG(mode):
                files[rel] = sha256_file(path)
            else:
                raise TrustError(f"refusing to load {root}: {rel[:100]!r} is a link or a special "
                                 "file, which no archive holds")
    return files, folders


def _read_regular(path: Path) -> bytes:
    """A regular file's bytes, never through a link."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise TrustError(f"{path} is not a regular file")
        return fh.read()


class TrustedArchive:
    """An unpacked archive that holds exactly one listed archive's files, read through checks.

    Args:
        model_dir: the folder TorchServe unpacked the archive into.
        trust_list: the list to check against (default: ``worker_trust_list()``).

    Raises:
        TrustError: the folder's files are not exactly those of any listed archive; the message
            names the closest listed archive and the files that differ.
    """

    def __init__(self, model_dir: str | Path, trust_list: str | Path | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.trust_list = Path(trust_list) if trust_list else worker_trust_list()
        entries = read_trust_list(self.trust_list)
        files, folders = unpacked_files(self.model_dir)
        for entry in entries:
            parents = {p.as_posix() for f in entry["files"] for p in PurePosixPath(f).parents}
            if entry["files"] == files and folders <= parents:
                self.entry = entry
                break
        else:
            raise TrustError(self._refusal(entries, files, folders))
        self._manifest: dict | None = None

    def _refusal(self, entries: list[dict], files: dict[str, str], folders: set[str]) -> str:
        head = (f"refusing to load {self.model_dir}: its files are not those of any archive on "
                f"the trust list {self.trust_list}")
        if not entries:
            return head + " (the list is empty)"
        closest = max(entries, key=lambda e: len(e["files"].items() & files.items()))
        known = {p.as_posix() for f in closest["files"] for p in PurePosixPath(f).parents}
        stray = sorted(f"{d}/" for d in folders - known)
        detail = file_differences(files, closest["files"])
        if stray:
            detail += f"; extra folders: {', '.join(stray[:8])}"
        return f"{head}; closest is {closest['name']} (archived {closest['archived']}): {detail}"

    @property
    def name(self) -> str:
        """The listed archive's file name."""
        return self.entry["name"]

    def read_file(self, relative: str) -> bytes:
        """One file's bytes, checked against the trust list now: parse or load these bytes.

        Raises:
            TrustError: the file is not in the archive, or it changed since the folder was checked.
        """
        want = self.entry["files"].get(relative)
        if want is None:
            raise TrustError(f"{relative[:100]!r} is not a file of the trusted archive {self.name}")
        try:
            data = _read_regular(self.model_dir / relative)
        except OSError as exc:
            raise TrustError(f"cannot read {relative} of {self.name} in {self.model_dir}: {exc}") \
                from None
        got = sha256_bytes(data)
        if got != want:
            raise TrustError(f"{relative} in {self.model_dir} has sha256 {got[:SHORT]}, but the "
                             f"trust list has {want[:SHORT]} for {self.name}: it changed after "
                             "the archive was built; refusing to load it")
        return data

    @property
    def manifest(self) -> dict:
        """The export manifest the archive carries, parsed from checked bytes."""
        if self._manifest is None:
            self._manifest = parse_manifest(self.read_file(MANIFEST_NAME),
                                            self.model_dir / MANIFEST_NAME)
        return self._manifest

    def read(self, key: str) -> bytes:
        """Artifact ``key`` of the manifest: its bytes, checked against the trust list now."""
        path = artifact_path(self.model_dir, self.manifest, key)
        return self.read_file(path.relative_to(self.model_dir).as_posix())

    def model_config(self) -> dict:
        """``model-config.yaml`` as the trust list has it (TorchServe parsed the file on disk
        before this check ran)."""
        import yaml

        return yaml.safe_load(self.read_file(MODEL_CONFIG)) or {}

    def mar_manifest(self) -> dict:
        """``MAR-INF/MANIFEST.json`` (model name, version, handler) as the trust list has it."""
        return json.loads(self.read_file(MAR_MANIFEST))
