"""Health probe of a TorchServe started from a config: ``GET /ping`` on its inference address,
with the inference key when the config keeps token authorization on.

    flannel serve probe --config config.properties        # exit 0: Healthy; 1: anything else

TorchServe 0.12 checks the key on every route of the inference port, ``/ping`` included
(``ServerInitializer`` puts ``TokenAuthorizationHandler`` ahead of ``InferenceRequestHandler``,
which answers ``/ping``), so a bare ``GET /ping`` is refused with 400 while the server is fine.
This probe is what the container recipes run instead: Docker's ``HEALTHCHECK`` (token
authorization on, the key read from the server's ``key_file.json``) and the Kubernetes exec
probes (behind the pod's proxy, token authorization off on the pod's loopback).
"""
from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

from flannel.handlers.ts_config import (KEY_FILE, LOG_DIR, ServeError, moved_address,
                                        server_info, token_authorization_on)

# Seconds one probe waits for /ping: below the 5 s probe timeout of the recipes, so the probe
# reports a slow server itself instead of being killed by the runtime.
PROBE_TIMEOUT_S = 4.0
# A key that expires within this many seconds is renewed first: a probe must not fail because the
# key it read expired on the way to the server.
KEY_MARGIN_S = 5.0


@dataclass(frozen=True)
class ProbeResult:
    """Whether the server is healthy, and one line saying what the probe saw."""

    healthy: bool
    message: str


def _ping_url(inference_url: str) -> str:
    """``/ping`` of an inference address, through loopback where it binds all interfaces."""
    host = urlsplit(inference_url if "//" in inference_url else f"http://{inference_url}").hostname
    url = moved_address(inference_url, "127.0.0.1") if host in (None, "0.0.0.0", "::") else inference_url
    return url.rstrip("/") + "/ping"


def probe(config: str | Path, workdir: str | Path | None = None,
          timeout: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """Ask the server ``config`` describes whether it is healthy.

    Args:
        config: the config TorchServe was started with.
        workdir: TorchServe's working folder, where it writes ``key_file.json``; default the
            config's folder (how ``flannel serve start`` runs it).
        timeout: seconds to wait for the answer.

    Returns:
        healthy when /ping answers 200 with status "Healthy" (every model has its minimum of
        ready workers); otherwise what went wrong, in one line.
    """
    from flannel.handlers.keys import current_token

    info = server_info(config)
    if workdir is not None:
        workdir = Path(workdir)
        info = replace(info, workdir=workdir, key_file=workdir / KEY_FILE, log_dir=workdir / LOG_DIR)
    url = _ping_url(info.inference_url)
    headers = {}
    if token_authorization_on(info.config):
        try:
            headers["Authorization"] = f"Bearer {current_token(info, margin_s=KEY_MARGIN_S)}"
        except (ServeError, OSError, ValueError, KeyError) as exc:
            return ProbeResult(False, f"no usable inference key in {info.key_file}: {exc}")
    # An https inference address carries a certificate for the name clients use, not for
    # 127.0.0.1; the probe only talks to its own host, so it does not check the name.
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as answer:
            body = answer.read(4096).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return ProbeResult(False, f"{url}: HTTP {exc.code} {exc.read(200).decode(errors='replace').strip()}")
    except (urllib.error.URLError, OSError) as exc:
        return ProbeResult(False, f"{url}: {getattr(exc, 'reason', exc)}")
    try:
        status = json.loads(body).get("status")
    except (ValueError, AttributeError):
        status = None
    if status != "Healthy":
        return ProbeResult(False, f"{url}: answered {body.strip()[:200]!r}")
    return ProbeResult(True, f"{url}: Healthy")
