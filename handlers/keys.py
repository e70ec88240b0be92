"""TorchServe's API keys: read them from ``key_file.json``, know when they expire, renew them.

    from flannel.handlers.keys import current_token
    key = current_token(server_info("config.properties"))   # renewed first when expiring

    FLANNEL_INFERENCE_KEY=... flannel predict a.png     # or: --token-file key.txt

A key is never taken from a command line: every local user can read a process's arguments.
``flannel predict`` takes one from a file (``--token-file``) or from ``KEY_ENV``.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
from pathlib import Path

from flannel.handlers.ts_config import HTTP_TIMEOUT_S, ServeError, ServerInfo

log = logging.getLogger(__name__)

# The environment variable holding an inference key for `flannel predict`.
KEY_ENV = "FLANNEL_INFERENCE_KEY"


def read_tokens(key_file: str | Path) -> dict[str, str]:
    """Keys from TorchServe 0.12's key file.

    The frontend writes ``key_file.json`` into its working folder as
    ``{"management": {"key", "expiration time"}, "inference": {...}, "API": {"key"}}``.

    Returns:
        {"inference": key, "management": key, "api": key}
    """
    data = json.loads(Path(key_file).read_text())
    return {"inference": data["inference"]["key"], "management": data["management"]["key"],
            "api": data.get("API", {}).get("key", "")}


def read_key_file(path: str | Path) -> str:
    """The inference key in ``path``: a file holding only the key, or a TorchServe key file
    (``key_file.json``, its ``inference`` key).

    Raises:
        ServeError: the file cannot be read or holds no key.
    """
    try:
        text = Path(path).read_text().strip()
        key = read_tokens(path)["inference"] if text.startswith("{") else text
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ServeError(f"no inference key in {path}: {type(exc).__name__} {exc}") from None
    if not key or any(c.isspace() for c in key):
        raise ServeError(f"no inference key in {path}: expected the key alone or a key_file.json")
    return key


class TokenExpired(ServeError):
    """A key has expired and cannot be renewed here (no API key at hand)."""


def token_expiry(key_file: str | Path, kind: str = "inference") -> _dt.datetime | None:
    """When the ``kind`` key ("inference" or "management") of a key file expires (UTC), or None
    when the file does not say."""
    entry = json.loads(Path(key_file).read_text()).get(kind, {})
    stamp = entry.get("expiration time")
    if not stamp:
        return None
    return _dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def renew_token(info: ServerInfo, kind: str = "inference") -> str:
    """Have TorchServe issue a new ``kind`` key (its token API on the management address,
    authorised by the API key); TorchServe rewrites the key file. Returns the new key.

    Raises:
        ServeError: the key file holds no API key or TorchServe refuses.
    """
    import requests

    api = read_tokens(info.key_file)["api"]
    if not api:
        raise TokenExpired(f"{info.key_file} holds no API key to renew the {kind} key with")
    answer = requests.get(f"{info.management_url.rstrip('/')}/token", params={"type": kind},
                          headers={"Authorization": f"Bearer {api}"}, timeout=HTTP_TIMEOUT_S)
    if answer.status_code != 200:
        raise ServeError(f"TorchServe refused to renew the {kind} key: HTTP "
                         f"{answer.status_code} {answer.text.strip()[:200]}")
    return read_tokens(info.key_file)[kind]


def current_token(info: ServerInfo, kind: str = "inference", *, margin_s: float = 60.0,
                  now: _dt.datetime | None = None) -> str:
    """The ``kind`` key from the key file, renewed first when it has expired or will within
    ``margin_s`` seconds (TorchServe's keys expire after ``token_expiration_min`` minutes).

    Raises:
        ServeError: no key file (the server is not running from this config), or the key has
            expired and cannot be renewed; the message says when it expired and how to renew.
    """
    if not info.key_file.is_file():
        raise ServeError(f"no {info.key_file}: is TorchServe running from {info.config}?")
    expires = token_expiry(info.key_file, kind)
    now = now or _dt.datetime.now(_dt.timezone.utc)
    if expires is None or (expires - now).total_seconds() > margin_s:
        return read_tokens(info.key_file)[kind]
    log.info("the %s key expires at %s: renewing it", kind, expires.isoformat())
    try:
        return renew_token(info, kind)
    except TokenExpired as exc:
        raise TokenExpired(f"the {kind} key in {info.key_file} expired at "
                           f"{expires.isoformat()} and {exc}; renew it with the management "
                           f"API's /token?type={kind}") from None

