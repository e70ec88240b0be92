"""A private Orthanc PACS on loopback, with its DICOMweb plugin, for tests.

    with running_orthanc(tmp_path) as pacs:
        requests.get(pacs.dicomweb_url + "/instances")

Each instance has its own config, storage and HTTP port in a temporary folder, no DICOM port,
no remote access; it is stopped (and killed if it lingers) however the block ends. A system
Orthanc service, where the Debian package started one, is never touched.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import requests

from flannel.handlers.ports import free_ports

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
# Orthanc starts in about a second; this allows for 2 cores shared with other tests.
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
# Another process may take the free port before Orthanc binds it: start again on new ones.
START_TRIES = 3


@dataclass(frozen=True)
class OrthancServer:
    url: str
    process: subprocess.Popen

    @property
    def dicomweb_url(self) -> str:
        return self.url + "/dicom-web"


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if Path(p).is_file()), None)


def orthanc_missing() -> str | None:
    """Why a private Orthanc cannot start here, or None when it can."""
    if orthanc_binary() is None:
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)"
    if not PLUGIN.is_file():
        return f"the DICOMweb plugin {PLUGIN} is missing (apt-get install orthanc-dicomweb)"
    return None


def write_config(root: Path, port: int) -> Path:
    config = {"Name": "flannel-test", "HttpPort": port, "DicomServerEnabled": False,
              "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
              "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
              "Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    path = root / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def _ready(url: str, process: subprocess.Popen) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.get(url + "/system", timeout=2).ok:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.2)
    return False


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def running_orthanc(root: Path) -> Iterator[OrthancServer]:
    """A started Orthanc with its files under ``root``; stopped when the block ends."""
    root.mkdir(parents=True, exist_ok=True)
    for attempt in range(START_TRIES):
        (port,) = free_ports(1)
        config = write_config(root, port)
        with (root / "orthanc.log").open("a") as log:
            process = subprocess.Popen([orthanc_binary(), str(config)], cwd=root, stdout=log,
                                       stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            if _ready(url, process):
                yield OrthancServer(url, process)
                return
        finally:
            stop(process)
    tail = (root / "orthanc.log").read_text()[-2000:]
    raise RuntimeError(f"Orthanc did not start in {START_TRIES} tries:\n{tail}")
