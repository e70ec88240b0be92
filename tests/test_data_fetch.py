"""Fetch: the URL table, download + extraction + layout check on local archives, clear failures."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import urllib.error
import zipfile
from pathlib import Path

import pytest

from fixtures_data import build_kaggle, build_muhammedtalo
from flannel.data.fetch import SOURCES, FetchError, extract_zip, fetch, kaggle_credentials
from flannel.data.readers import READERS


def zip_tree(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder).as_posix())
    return archive


class FakeResponse(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def test_url_table():
    assert set(SOURCES) == set(READERS)
    for name, source in SOURCES.items():
        assert source.name == name and source.url.startswith("https://")
    assert SOURCES["muhammedtalo"].url.startswith("https://github.com/muhammedtalo/COVID-19/")
    assert SOURCES["ieee8023"].url.startswith("https://github.com/ieee8023/covid-chestxray-dataset/")
    assert {n for n, s in SOURCES.items() if s.needs_kaggle} == {"radiography", "kaggle"}
    assert SOURCES["kaggle"].url.endswith("paultimothymooney/chest-xray-pneumonia")


def test_fetch_file_url_extracts_and_checks_layout(tmp_path):
    build_muhammedtalo(tmp_path / "src" / "COVID-19-master")
    archive = zip_tree(tmp_path / "src", tmp_path / "master.zip")
    result = fetch("muhammedtalo", tmp_path / "raw", url=archive.as_uri(), progress=False)
    assert result.downloaded and result.layout == "muhammedtalo"
    assert result.sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert len(READERS["muhammedtalo"](result.root).samples) == 9
    again = fetch("muhammedtalo", tmp_path / "raw", url=archive.as_uri(), progress=False)
    assert not again.downloaded and again.root == result.root


def test_fetch_finds_openist_normals_three_folders_down(tmp_path):
    from test_data_readers import build_openist
    build_openist(tmp_path / "src" / "OpenIST-master")  # writes Datasets/Chest_x-ray below it
    archive = zip_tree(tmp_path / "src", tmp_path / "master.zip")
    result = fetch("openist", tmp_path / "raw", url=archive.as_uri(), progress=False)
    assert result.layout == "openist"
    assert READERS["openist"](result.root).samples


def test_fetch_wrong_layout_is_an_error(tmp_path):
    build_kaggle(tmp_path / "src")
    archive = zip_tree(tmp_path / "src", tmp_path / "other.zip")
    with pytest.raises(FetchError, match="holds layout kaggle, not muhammedtalo"):
        fetch("muhammedtalo", tmp_path / "raw", url=archive.as_uri(), progress=False)


def test_no_network_names_url_and_reason(tmp_path):
    def offline(request, timeout):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    with pytest.raises(FetchError) as info:
        fetch("ieee8023", tmp_path, opener=offline, progress=False)
    message = str(info.value)
    assert SOURCES["ieee8023"].url in message and "name resolution" in message
    assert not list(tmp_path.glob("*.part"))


def test_cli_fetch_failure_is_one_line_no_traceback(tmp_path, capsys):
    from flannel.cli import main
    missing = (tmp_path / "nowhere.zip").as_uri()
    assert main(["data", "fetch", "muhammedtalo", "--out", str(tmp_path), "--url", missing,
                 "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot download " + missing) and "Traceback" not in err


def test_kaggle_needs_credentials(tmp_path):
    with pytest.raises(FetchError, match="needs a Kaggle API token"):
        fetch("radiography", tmp_path, env={}, progress=False)


def test_kaggle_credentials_sent(tmp_path):
    build_kaggle(tmp_path / "src")
    data = zip_tree(tmp_path / "src", tmp_path / "k.zip").read_bytes()
    seen = []

    def opener(request, timeout):
        seen.append(request)
        return FakeResponse(data)
    result = fetch("kaggle", tmp_path / "raw", opener=opener, progress=False,
                   env={"KAGGLE_USERNAME": "ann", "KAGGLE_KEY": "k3y"})
    assert result.layout == "kaggle"
    assert seen[0].get_header("Authorization") == "Basic " + base64.b64encode(b"ann:k3y").decode()
    assert seen[0].full_url == SOURCES["kaggle"].url


def test_credentials_are_not_sent_on_a_redirect_to_another_host(tmp_path):
    """Two real servers on loopback: the first (the API) gets the token and redirects, the
    second (the storage host) serves the archive and must not see the token."""
    import http.server
    import threading

    from flannel.data.fetch import _request, download

    payload = b"zip bytes"
    seen: dict[str, str | None] = {}

    def handler(name, respond):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                seen[name] = self.headers.get("Authorization")
                respond(self)

            def log_message(self, *args):
                pass
        return Handler

    def serve_file(h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    storage = http.server.HTTPServer(("127.0.0.1", 0), handler("storage", serve_file))

    def redirect(h):
        h.send_response(302)
        h.send_header("Location", f"http://localhost:{storage.server_port}/blob.zip")
        h.end_headers()
    api = http.server.HTTPServer(("127.0.0.1", 0), handler("api", redirect))
    for server in (api, storage):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        request = _request(SOURCES["kaggle"], f"http://127.0.0.1:{api.server_port}/download",
                           ("ann", "k3y"))
        download(request, tmp_path / "k.zip", progress=False)
    finally:
        api.shutdown()
        storage.shutdown()
    assert (tmp_path / "k.zip").read_bytes() == payload
    assert seen == {"api": "Basic " + base64.b64encode(b"ann:k3y").decode(), "storage": None}


def test_kaggle_credentials_from_token_file(tmp_path):
    (tmp_path / ".kaggle").mkdir()
    (tmp_path / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": "u", "key": "k"}))
    assert kaggle_credentials(env={}, home=tmp_path) == ("u", "k")
    assert kaggle_credentials(env={}, home=tmp_path / "none") is None


def test_http_error_hints_at_token(tmp_path):
    def forbidden(request, timeout):
        raise urllib.error.HTTPError(request.full_url, 401, "Unauthorized", {}, None)
    with pytest.raises(FetchError, match="HTTP 401 Unauthorized.*Kaggle API token"):
        fetch("kaggle", tmp_path, opener=forbidden, env={"KAGGLE_USERNAME": "u", "KAGGLE_KEY": "k"},
              progress=False)


def test_zip_slip_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../outside.png", b"x")
    with pytest.raises(FetchError, match="escapes"):
        extract_zip(archive, tmp_path / "dest")
    assert not (tmp_path / "outside.png").exists()
    (tmp_path / "notzip.zip").write_bytes(b"not a zip")
    with pytest.raises(FetchError, match="not a zip"):
        extract_zip(tmp_path / "notzip.zip", tmp_path / "dest")
