"""Download a public chest X-ray dataset, extract it and check its layout.

    flannel data fetch muhammedtalo --out data/raw

Where no network exists (this workplace), the command fails with the URL and the reason; copy the
dataset by hand and point ``flannel data split`` at it. Kaggle-hosted sets need an API token
(``~/.kaggle/kaggle.json`` or ``KAGGLE_USERNAME`` / ``KAGGLE_KEY``).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from flannel.data.readers import LayoutNotFound, detect_layout

CHUNK = 1 << 20  # 1 MiB reads keep memory flat on multi-GB archives
TIMEOUT_S = 30  # per socket operation, not for the whole download
_KAGGLE_API = "https://www.kaggle.com/api/v1/datasets/download/"


@dataclass(frozen=True)
class DatasetSource:
    """Where one public dataset is published.

    Attributes:
        name: reader/layout name this archive must contain.
        url: archive URL.
        description: what it is, for messages.
        needs_kaggle: the URL needs a Kaggle API token.
        size_hint: approximate download size, for messages.
    """

    name: str
    url: str
    description: str
    needs_kaggle: bool = False
    size_hint: str = ""


SOURCES: dict[str, DatasetSource] = {
    "muhammedtalo": DatasetSource(
        "muhammedtalo", "https://github.com/muhammedtalo/COVID-19/archive/refs/heads/master.zip",
        "muhammedtalo/COVID-19 (Ozturk et al. 2020; 125 COVID-19, 500 normal, 500 pneumonia)",
        size_hint="about 1 GB"),
    "ieee8023": DatasetSource(
        "ieee8023",
        "https://github.com/ieee8023/covid-chestxray-dataset/archive/refs/heads/master.zip",
        "ieee8023 covid-chestxray-dataset (metadata.csv + images/)", size_hint="about 0.5 GB"),
    "radiography": DatasetSource(
        "radiography", _KAGGLE_API + "tawsifurrahman/covid19-radiography-database",
        "COVID-19 Radiography Database on Kaggle (21,165 images, 4 classes)", needs_kaggle=True,
        size_hint="about 0.8 GB"),
    "kaggle": DatasetSource(
        "kaggle", _KAGGLE_API + "paultimothymooney/chest-xray-pneumonia",
        "Kaggle chest-xray-pneumonia (5,863 paediatric images)", needs_kaggle=True,
        size_hint="about 1.2 GB"),
    "hannover": DatasetSource(
        "hannover",
        "https://github.com/ml-workgroup/covid-19-image-repository/archive/refs/heads/master.zip",
        "Hannover Medical School COVID-19 image repository (243 images, 71 patients)",
        size_hint="about 0.2 GB"),
    "openist": DatasetSource(
        "openist", "https://github.com/pi-null-mezon/OpenIST/archive/refs/heads/master.zip",
        "OpenIST normal adult chest radiographs (Datasets/Chest_x-ray)", size_hint="about 0.1 GB"),
}


class FetchError(RuntimeError):
    """A download or extraction that failed; the message says what to do."""


def kaggle_credentials(env: dict | None = None, home: Path | None = None) -> tuple[str, str] | None:
    """(username, key) from ``KAGGLE_USERNAME``/``KAGGLE_KEY`` or ``~/.kaggle/kaggle.json``."""
    env = os.environ if env is None else env
    if env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"):
        return env["KAGGLE_USERNAME"], env["KAGGLE_KEY"]
    token = (home or Path.home()) / ".kaggle" / "kaggle.json"
    if token.is_file():
        data = json.loads(token.read_text())
        if data.get("username") and data.get("key"):
            return data["username"], data["key"]
    return None


def _request(source: DatasetSource, url: str, credentials) -> urllib.request.Request:
    req = urllib.request.Request(url, headers={"User-Agent": "flannel-data-fetch"})
    if credentials:
        token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
        # Unredirected: urllib copies ordinary headers onto a redirect, whatever its host, and
        # Kaggle answers with a redirect to a storage host that must not see the token.
        req.add_unredirected_header("Authorization", f"Basic {token}")
    return req


def download(request: urllib.request.Request, dest: Path,
             opener: Callable = urllib.request.urlopen, progress: bool = True) -> str:
    """Stream a URL to ``dest`` (written as ``dest.part`` then renamed); return its sha256.

    Raises:
        FetchError: the URL cannot be opened or read, with the URL and the reason.
    """
    from tqdm import tqdm

    url = request.full_url
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    try:
        with opener(request, timeout=TIMEOUT_S) as resp, part.open("wb") as fh:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name,
                      disable=not progress) as bar:
                while chunk := resp.read(CHUNK):
                    fh.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        part.unlink(missing_ok=True)
        hint = " (check the Kaggle API token)" if exc.code in (401, 403) else ""
        raise FetchError(f"cannot download {url}: HTTP {exc.code} {exc.reason}{hint}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        raise FetchError(f"cannot download {url}: {reason} (no network, or the address moved; "
                         f"download it by hand and unpack it under {dest.parent})") from None
    part.replace(dest)
    return digest.hexdigest()


def extract_zip(archive: Path, dest: Path) -> Path:
    """Extract a zip into ``dest``, refusing members that would land outside it.

    Raises:
        FetchError: not a zip, or an unsafe member path.
    """
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.infolist():
                target = (root / member.filename).resolve()
                if not target.is_relative_to(root):
                    raise FetchError(f"{archive}: member {member.filename!r} escapes {dest}")
            zf.extractall(root)
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{archive}: not a zip archive ({exc})") from None
    return dest


@dataclass(frozen=True)
class FetchResult:
    """A fetched dataset: where it lies and what it is."""

    name: str
    url: str
    archive: str | None
    sha256: str | None
    root: str
    layout: str
    downloaded: bool


def _existing(dest: Path, name: str) -> str | None:
    try:
        return detect_layout(dest) if dest.is_dir() else None
    except LayoutNotFound:
        return None


def fetch(name: str, out: str | Path, *, url: str | None = None,
          opener: Callable = urllib.request.urlopen, env: dict | None = None,
          progress: bool = True) -> FetchResult:
    """Download, extract and check one public dataset.

    Args:
        name: key of ``SOURCES``.
        out: folder that receives ``NAME.zip`` and the extracted ``NAME/``.
        url: another address for the same archive (a mirror, a ``file://`` copy).
        opener: ``urlopen``-like callable (request, timeout=...) -> response.
        env: environment for the Kaggle token lookup (default ``os.environ``).
        progress: show a progress bar.

    Returns:
        The result; an already extracted dataset with the right layout is not downloaded again.

    Raises:
        FetchError: unknown name, missing Kaggle token, download/extraction failure, wrong layout.
    """
    if name not in SOURCES:
        raise FetchError(f"unknown dataset {name!r}; known: {', '.join(SOURCES)}")
    source, out = SOURCES[name], Path(out)
    url = url or source.url
    dest = out / name
    if _existing(dest, name) == source.name:
        return FetchResult(name, url, None, None, str(dest), source.name, downloaded=False)
    credentials = None
    if source.needs_kaggle and url.startswith(_KAGGLE_API):
        credentials = kaggle_credentials(env)
        if credentials is None:
            raise FetchError(
                f"{source.description} is published at {url} and needs a Kaggle API token: put "
                "kaggle.json in ~/.kaggle/ or set KAGGLE_USERNAME and KAGGLE_KEY "
                "(https://www.kaggle.com/settings, 'Create New Token'), then run this again")
    out.mkdir(parents=True, exist_ok=True)
    archive = out / f"{name}.zip"
    digest = download(_request(source, url, credentials), archive, opener, progress)
    extract_zip(archive, dest)
    layout = _existing(dest, name)
    if layout != source.name:
        raise FetchError(f"{archive} from {url} extracted to {dest} but holds "
                         f"{'layout ' + layout if layout else 'no known layout'}, "
                         f"not {source.name}")
    return FetchResult(name, url, str(archive), digest, str(dest), layout, downloaded=True)

