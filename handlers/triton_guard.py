"""The guard in front of Triton's REST port: nginx on the config's inference address.

    python -c "from flannel.handlers.triton_guard import guard_config; help(guard_config)"

Triton 2.51's HTTP frontend dies (SIGSEGV, every in-flight request lost) on a JSON body of about
4 MB or more, before it checks any key (measured here: 2 MB of base64 answers, 4 MB kills it;
upstream triton-inference-server/server#5840, open). A radiograph sent as base64 in a v2 JSON
body is that size, and a client without the key can send one. So ``flannel serve start
--runtime triton`` puts Triton's REST port on a private loopback port and this nginx on the
config's address, which

- refuses a JSON body over ``JSON_BODY_LIMIT`` with 413 and a JSON error naming the remedy
  (Triton's binary tensor extension, which ``flannel predict`` uses, or gRPC);
- refuses a binary-extension request whose JSON header part (``Inference-Header-Content-Length``)
  is not a number under ``HEADER_LIMIT``, and any body over ``BODY_LIMIT`` (TorchServe's
  ``max_request_size``);
- passes everything else on as it came, the key included: Triton checks it.

gRPC goes to Triton directly (protobuf, not JSON: 6 MB files answer).
"""
from __future__ import annotations

import shutil
from pathlib import Path

# JSON bodies reaching Triton: under the measured crash, with room (a 2.2 MB file in base64).
JSON_BODY_LIMIT = 3 * 1024 * 1024
# Any body: TorchServe's max_request_size in config.properties (a 4300 x 4300 16-bit DICOM).
BODY_LIMIT = 40 * 1024 * 1024
# The JSON header of a binary-extension request: digits of its length (under 1 MB).
HEADER_DIGITS = 6
HEADER_LIMIT = 10 ** HEADER_DIGITS
# Seconds nginx waits for Triton: the archive's response timeout and some.
UPSTREAM_TIMEOUT_S = 130


class GuardUnavailable(RuntimeError):
    """nginx is not installed."""


def nginx_binary() -> str:
    """The nginx to run.

    Raises:
        GuardUnavailable: none on PATH or in /usr/sbin.
    """
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
    if found is None:
        raise GuardUnavailable(
            "nginx is not installed: Triton 2.51's REST frontend crashes on JSON bodies of about "
            "4 MB (triton-inference-server/server#5840), so it is served behind an nginx guard; "
            "install it (Debian: apt-get install nginx-light)")
    return found


def _error(status: int, message: str) -> str:
    # A Triton-style error body whose message starts with the status, as the served model's do;
    # quoted for nginx (no quote inside).
    if "'" in message or '"' in message or "\\" in message:
        raise ValueError(f"no quotes in a guard message: {message!r}")
    return "'" + '{"error":"' + f"{status}: {message}" + '"}' + "'"


def guard_config(listen: tuple[str, int], upstream: tuple[str, int], folder: Path) -> str:
    """nginx.conf of the guard: ``listen`` (the config's inference address) in front of
    Triton's REST port at ``upstream``; pid, logs and temporary files under ``folder``."""
    host, port = listen
    listen_at = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    too_large = _error(413, f"a JSON request over {JSON_BODY_LIMIT // 2**20} MiB is refused before "
                            "Triton (its JSON reader fails on bodies near 4 MB): send files as raw "
                            "bytes in the binary tensor extension of Triton (flannel predict does) "
                            "or over gRPC")
    body_too_large = _error(413, f"request over {BODY_LIMIT // 2**20} MiB")
    bad_header = _error(413, "Inference-Header-Content-Length must be the length of the JSON "
                             f"header, under {HEADER_LIMIT:,} bytes")
    return f"""# The guard in front of Triton's REST port (flannel.handlers.triton_guard).
worker_processes 1;
daemon off;
pid {folder}/nginx.pid;
error_log {folder}/guard.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    server_tokens off;
    client_body_temp_path {folder}/client_body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    client_max_body_size {BODY_LIMIT};
    client_body_buffer_size {BODY_LIMIT};
    # Bodies are read whole into memory before Triton sees them; answers stream back unbuffered,
    # so no worker writes a temporary file (the folder is its owner's alone).
    proxy_request_buffering on;
    proxy_buffering off;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_read_timeout {UPSTREAM_TIMEOUT_S}s;
    proxy_send_timeout {UPSTREAM_TIMEOUT_S}s;
    upstream triton {{ server {upstream[0]}:{upstream[1]}; keepalive 16; }}
    # A binary-extension request names its JSON header's length; a JSON request does not.
    map $http_inference_header_content_length $flannel_json {{
        "" 1;
        default 0;
    }}
    map $http_inference_header_content_length $flannel_header_ok {{
        "" 1;
        "~^[0-9]{{1,{HEADER_DIGITS}}}$" 1;
        default 0;
    }}
    server {{
        listen {listen_at};
        default_type application/json;
        error_page 413 = @body_too_large;
        location / {{
            if ($flannel_header_ok = 0) {{ return 413 {bad_header}; }}
            if ($flannel_json) {{ rewrite ^ /_json$uri last; }}
            proxy_pass http://triton;
        }}
        location /_json/ {{
            internal;
            client_max_body_size {JSON_BODY_LIMIT};
            error_page 413 = @json_too_large;
            rewrite ^/_json(/.*)$ $1 break;
            proxy_pass http://triton;
        }}
        location @json_too_large {{ return 413 {too_large}; }}
        location @body_too_large {{ return 413 {body_too_large}; }}
    }}
}}
"""
