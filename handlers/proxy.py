"""The authenticating proxy in front of TorchServe in a Kubernetes pod: its nginx.conf, and the
Secret holding the keys that every replica accepts.

    flannel serve proxy-secret --name flannel-cxr-keys | kubectl apply -f -
    flannel serve proxy-config nginx.conf --config config.proxied.properties

TorchServe 0.12 draws its keys at start (``TokenAuthorization.init``: ``SecureRandom``, written
to ``key_file.json``, never read from anywhere), so N replicas behind one Service hold N
different key sets. In the pod, TorchServe therefore runs with its own token authorization off,
every endpoint on the pod's loopback (``container_config(behind_proxy=True)``), and nginx in
front checks ``Authorization: Bearer <key>`` (HTTP and gRPC) against one Secret mounted in every
replica. ``/ping`` is answered without a key only on a probe port that no Service and no
NetworkPolicy rule exposes.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from flannel.handlers.ts_config import read_properties, server_info

# 256 random bits, as hex: nginx matches map keys without regard to case, which costs hex
# nothing (TorchServe's own keys are 48 bits).
KEY_BYTES = 32
KEY_PATTERN = re.compile(r"[0-9a-f]{64}")
# The Secret's entries: the key clients send, and the same key(s) as nginx map lines.
SECRET_KEY_ENTRY = "inference-key"
SECRET_MAP_ENTRY = "keys.map"
# Seconds the proxy waits for TorchServe beyond its own default_response_timeout, so that
# TorchServe's timeout answer, not the proxy's, reaches the client.
UPSTREAM_SLACK_S = 10
# Requests the proxy lets reach TorchServe at once, HTTP and gRPC together: 16 concurrent
# maximum-size uploads are what TorchServe's frontend heap survives (SECURITY.md, "Frontend
# memory"; TorchServe 0.12 has no connection limit of its own). nginx buffers each body first and
# answers 502 at once beyond the cap, which clients retry like a 503.
MAX_UPSTREAM_CONNS = {"http": 12, "grpc": 4}


@dataclass(frozen=True)
class ProxyLayout:
    """Where the proxy listens and what it reads and writes inside the pod."""

    http_port: int = 8080
    grpc_port: int = 7070
    probe_port: int = 8090
    listen_host: str = "0.0.0.0"
    # The Secret's mount in the proxy container (deploy/kubernetes.yaml).
    keys_map: str = f"/etc/flannel-proxy/keys/{SECRET_MAP_ENTRY}"
    # nginx's pid file and request-body buffers: an emptyDir, the root file system is read-only.
    temp_dir: str = "/tmp/nginx"


def new_key() -> str:
    """A fresh inference key for the proxy (hex, ``KEY_BYTES`` random bytes)."""
    return secrets.token_hex(KEY_BYTES)


def keys_map(keys: list[str]) -> str:
    """nginx ``map`` lines admitting each key as ``Authorization: Bearer <key>``.

    Raises:
        ValueError: a key is not ``KEY_BYTES`` bytes of lower-case hex (a quote or a semicolon
            would change the map itself).
    """
    if not keys:
        raise ValueError("at least one key is needed")
    for key in keys:
        if not KEY_PATTERN.fullmatch(key):
            raise ValueError(f"a proxy key is {2 * KEY_BYTES} lower-case hex digits "
                             f"(flannel serve proxy-secret makes one); got {len(key)} characters")
    return "".join(f'"Bearer {key}" 1;\n' for key in keys)


def proxy_secret(name: str, keys: list[str]) -> str:
    """A Kubernetes Secret (YAML) with the current key (``keys[0]``, the one to hand to clients)
    and the map of every key still accepted (the rest: keys being rotated out)."""
    doc = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
           "metadata": {"name": name, "labels": {"app": "flannel-cxr"}},
           "stringData": {SECRET_KEY_ENTRY: keys[0], SECRET_MAP_ENTRY: keys_map(keys)}}
    return yaml.dump(doc, Dumper=_BlockDumper, sort_keys=False)


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings as YAML literal blocks, as a person would."""


_BlockDumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def _host_port(address: str) -> str:
    parts = urlsplit(address if "//" in address else f"//{address}")
    host = parts.hostname or "127.0.0.1"
    return f"[{host}]:{parts.port}" if ":" in host else f"{host}:{parts.port}"


def nginx_config(ts_config: str | Path, layout: ProxyLayout = ProxyLayout()) -> str:
    """nginx.conf for the proxy in front of the TorchServe that ``ts_config`` describes (one
    started from ``container_config(behind_proxy=True)``): HTTP and gRPC inference behind the
    key map, ``/ping`` alone on the probe port, request size and timeouts from the config."""
    info = server_info(ts_config)
    props = read_properties(ts_config)
    scheme = urlsplit(info.inference_url).scheme or "http"
    http_server, grpc_server = _host_port(info.inference_url), _host_port(info.grpc_inference)
    body_limit = int(props.get("max_request_size", 6553500))
    timeout_s = int(props.get("default_response_timeout", 120)) + UPSTREAM_SLACK_S
    tmp, host = layout.temp_dir, layout.listen_host
    return f"""# Written by `flannel serve proxy-config` from {Path(ts_config).name}: the pod's authenticating
# proxy. Every request on the HTTP and gRPC ports needs "Authorization: Bearer <key>" with a key
# from the map (the Secret of `flannel serve proxy-secret`); TorchServe behind it listens on the
# pod's loopback with its own token authorization off. The probe port answers GET /ping only.
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
    access_log /dev/stdout;
    server_tokens off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size {body_limit};
    proxy_request_buffering on;
    proxy_read_timeout {timeout_s}s;
    proxy_send_timeout {timeout_s}s;
    grpc_read_timeout {timeout_s}s;
    grpc_send_timeout {timeout_s}s;
    # A map line is "Bearer " and 64 hex digits: longer than nginx's default bucket of 64 bytes.
    map_hash_bucket_size 128;
    upstream torchserve {{ server {http_server} max_conns={MAX_UPSTREAM_CONNS["http"]}; }}
    upstream torchserve_grpc {{ server {grpc_server} max_conns={MAX_UPSTREAM_CONNS["grpc"]}; }}
    map $http_authorization $flannel_key_ok {{
        default 0;
        include {layout.keys_map};
    }}
    server {{
        listen {host}:{layout.http_port};
        location / {{
            if ($flannel_key_ok != 1) {{ return 401; }}
            proxy_set_header Authorization "";
            proxy_pass {scheme}://torchserve;
        }}
    }}
    server {{
        listen {host}:{layout.grpc_port} http2;
        location / {{
            if ($flannel_key_ok != 1) {{ return 401; }}
            grpc_set_header Authorization "";
            grpc_pass grpc://torchserve_grpc;
        }}
    }}
    server {{
        listen {host}:{layout.probe_port};
        location = /ping {{
            limit_except GET {{ deny all; }}
            proxy_pass {scheme}://{http_server}/ping;   # outside the cap: a probe under load
        }}
        location / {{ return 404; }}
    }}
}}
"""
