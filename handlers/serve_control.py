"""Start, stop and inspect TorchServe for a config.properties, and read its API tokens.

    flannel serve start --config config.properties
    flannel serve status && flannel serve stop

TorchServe runs in the folder holding the config (relative ``model_store`` resolves there, and
TorchServe writes ``key_file.json`` into its working folder). Logs go to ``<that folder>/logs``;
the launcher's pid file, the worker sockets and unpacked archives go to ``logs/run``, so two
configs in two folders run two independent servers.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

KEY_FILE = "key_file.json"
LOG_DIR = "logs"
# Under logs/: TMPDIR of the launcher (its .model_server.pid) and java.io.tmpdir (worker sockets,
# unpacked archives). Unix socket paths must stay under ~100 characters, so keep it short.
RUN_DIR = "run"
PID_FILE = ".model_server.pid"
# The launcher's and the JVM's console output (logs/*.log hold the same, better organised).
CONSOLE_LOG = "console.log"
# Seconds between readiness polls: a model load takes a few seconds here.
POLL_S = 0.5
# Seconds one management API call may take before the poll treats the server as not ready yet.
HTTP_TIMEOUT_S = 5.0
log = logging.getLogger(__name__)
# Seconds the JVM gets to stop its workers after SIGTERM (TorchServe's launcher waits 60).
STOP_TIMEOUT_S = 60


class ServeError(RuntimeError):
    """TorchServe did not start, did not become ready, or is not running."""


@dataclass
class ServerInfo:
    """Where a TorchServe started from a config listens and where its state lives."""

    config: Path
    workdir: Path
    inference_url: str
    management_url: str
    metrics_url: str
    grpc_inference: str
    grpc_management: str
    model_store: Path
    key_file: Path
    log_dir: Path
    pid: int | None = None
    models: dict[str, int] = field(default_factory=dict)  # name -> READY workers

    def describe(self) -> str:
        """Multi-line summary for the CLI."""
        models = ", ".join(f"{m} ({n} ready)" for m, n in self.models.items()) or "none"
        return (f"TorchServe pid {self.pid}\n  inference  {self.inference_url}  grpc {self.grpc_inference}\n"
                f"  management {self.management_url}  grpc {self.grpc_management}\n"
                f"  metrics    {self.metrics_url}/metrics\n  models     {models}\n"
                f"  tokens     {self.key_file}\n  logs       {self.log_dir}")


def read_properties(config: str | Path) -> dict[str, str]:
    """key=value lines of a Java properties file (comments and blank lines skipped)."""
    props = {}
    for line in Path(config).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def server_info(config: str | Path = "config.properties", model_store: str | Path | None = None) -> ServerInfo:
    """Addresses and paths of the server a config describes (TorchServe's defaults where unset)."""
    config = Path(config).resolve()
    props = read_properties(config)
    workdir = config.parent
    store = Path(model_store or props.get("model_store", "model_store"))
    return ServerInfo(
        config=config, workdir=workdir,
        inference_url=props.get("inference_address", "http://127.0.0.1:8080"),
        management_url=props.get("management_address", "http://127.0.0.1:8081"),
        metrics_url=props.get("metrics_address", "http://127.0.0.1:8082"),
        grpc_inference=f"{props.get('grpc_inference_address', '127.0.0.1')}:{props.get('grpc_inference_port', '7070')}",
        grpc_management=f"{props.get('grpc_management_address', '127.0.0.1')}:{props.get('grpc_management_port', '7071')}",
        model_store=store if store.is_absolute() else workdir / store,
        key_file=workdir / KEY_FILE, log_dir=workdir / LOG_DIR, pid=_read_pid(workdir))


# Address keys of config.properties and whether each takes a URL or a bare port.
ADDRESS_KEYS = {"inference_address": "http", "management_address": "http",
                "metrics_address": "http", "grpc_inference_port": "port",
                "grpc_management_port": "port"}


def free_ports(n: int) -> list[int]:
    """``n`` TCP ports free on 127.0.0.1 right now."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def loopback_config(dest: str | Path, store: str | Path,
                    template: str | Path = "config.properties", **overrides: str) -> Path:
    """A copy of ``template`` at ``dest`` with every endpoint on a free loopback port, the model
    store ``store`` and any other ``key=value`` overrides: a private server beside the usual one
    (tests, benchmarks)."""
    ports = dict(zip(ADDRESS_KEYS, free_ports(len(ADDRESS_KEYS))))
    lines = []
    for line in Path(template).read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if key in ports:
            kind = ADDRESS_KEYS[key]
            line = f"{key}=http://127.0.0.1:{ports[key]}" if kind == "http" else f"{key}={ports[key]}"
        elif key == "model_store":
            line = f"model_store={store}"
        elif key in overrides:
            line = f"{key}={overrides.pop(key)}"
        lines.append(line)
    lines += [f"{k}={v}" for k, v in overrides.items()]
    Path(dest).write_text("\n".join(lines) + "\n")
    return Path(dest)


# What a container publishes: inference over HTTP and gRPC. Management and metrics stay on the
# container's loopback (docker exec / kubectl exec or port-forward).
CONTAINER_PUBLIC = {"inference_address": "http", "grpc_inference_address": "host"}


def container_config(template: str | Path, dest: str | Path) -> Path:
    """``template`` rewritten for a container: the inference addresses (HTTP and gRPC) on all
    of the container's interfaces, so that the runtime's port mapping or a Kubernetes Service
    reaches them; every other line, token authorization and the closed model API included,
    unchanged."""
    lines = [f"# Written by `flannel serve container-config` from {Path(template).name}: inference "
             f"on the container's interfaces, management and metrics on its loopback."]
    for line in Path(template).read_text().splitlines():
        key, _, value = line.partition("=")
        kind = CONTAINER_PUBLIC.get(key.strip())
        if kind == "http":
            line = f"{key}=http://0.0.0.0:{value.rsplit(':', 1)[1]}"
        elif kind == "host":
            line = f"{key}=0.0.0.0"
        lines.append(line)
    Path(dest).write_text("\n".join(lines) + "\n")
    return Path(dest)


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


def _run_dir(workdir: Path) -> Path:
    return workdir / LOG_DIR / RUN_DIR


def _read_pid(workdir: Path) -> int | None:
    """Pid of a live TorchServe started for this folder, or None."""
    import psutil

    pid_file = _run_dir(workdir) / PID_FILE
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if psutil.pid_exists(pid) else None


def _launcher_env(info: ServerInfo) -> dict[str, str]:
    run_dir = _run_dir(info.workdir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # TMPDIR: where the launcher keeps its pid file; TEMP: the JVM's java.io.tmpdir.
    return {**os.environ, "TMPDIR": str(run_dir), "TEMP": str(run_dir),
            "LOG_LOCATION": str(info.log_dir), "METRICS_LOCATION": str(info.log_dir)}


def _launcher(info: ServerInfo, *args: str) -> tuple[int, str]:
    """Run TorchServe's own launcher; returns its exit code and what it printed.

    The JVM inherits the launcher's stdout, so it goes to a file: a pipe would stay open for the
    life of the server.
    """
    cmd = [sys.executable, "-m", "ts.model_server", *args]
    env = _launcher_env(info)
    out_path = info.log_dir / CONSOLE_LOG
    start = out_path.stat().st_size if out_path.is_file() else 0
    with out_path.open("ab") as out:
        code = subprocess.run(cmd, cwd=info.workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=STOP_TIMEOUT_S).returncode
    with out_path.open("rb") as fh:
        fh.seek(start)
        printed = fh.read(4096).decode(errors="replace")
    return code, printed


def model_readiness(info: ServerInfo, token: str) -> dict[str, int]:
    """READY workers per registered model, from the management API.

    Raises:
        requests.RequestException: the management API does not answer.
    """
    import requests

    headers = {"Authorization": f"Bearer {token}"}
    base = info.management_url.rstrip("/")
    listing = requests.get(f"{base}/models", headers=headers, timeout=HTTP_TIMEOUT_S)
    listing.raise_for_status()
    ready = {}
    for model in listing.json().get("models", []):
        name = model["modelName"]
        ready[name] = sum(w.get("status") == "READY" for v in describe_model(info, token, name)
                          for w in v.get("workers", []))
    return ready


def describe_model(info: ServerInfo, token: str, model: str) -> list[dict]:
    """The management API's description of ``model``, one dict per version (batchSize,
    maxBatchDelay, workers with their pid and status, ...).

    Raises:
        requests.RequestException: the management API does not answer or refuses.
    """
    import requests

    answer = requests.get(f"{info.management_url.rstrip('/')}/models/{model}",
                          headers={"Authorization": f"Bearer {token}"}, timeout=HTTP_TIMEOUT_S)
    answer.raise_for_status()
    return answer.json()


def worker_pids(info: ServerInfo, model: str) -> list[int]:
    """The process ids of ``model``'s workers, from the management API (its key from the key
    file, renewed when expired)."""
    desc = describe_model(info, current_token(info, "management"), model)
    return sorted(int(w["pid"]) for v in desc for w in v.get("workers", []) if w.get("pid"))


def _log_tail(info: ServerInfo, lines: int = 15) -> str:
    out = []
    for name in ("ts_log.log", "model_log.log"):
        path = info.log_dir / name
        if path.is_file():
            out.append(f"--- {path} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(out)


def wait_until_ready(info: ServerInfo, timeout: float) -> dict[str, int]:
    """Poll until every archive in the model store has a READY worker.

    Raises:
        ServeError: the server died or was not ready in time (with the log tails).
    """
    import requests

    expected = {p.stem for p in info.model_store.glob("*.mar")}
    deadline = time.monotonic() + timeout
    ready: dict[str, int] = {}
    while time.monotonic() < deadline:
        if _read_pid(info.workdir) is None:
            raise ServeError(f"TorchServe exited during start-up\n{_log_tail(info)}")
        if info.key_file.is_file():
            try:
                ready = model_readiness(info, read_tokens(info.key_file)["management"])
                if set(ready) >= expected and all(ready.values()):
                    return ready
            except (requests.RequestException, ValueError, KeyError):
                pass  # frontend still starting or key file half-written
        time.sleep(POLL_S)
    raise ServeError(f"TorchServe not ready after {timeout:.0f} s (workers: {ready}, "
                     f"expected models {sorted(expected)})\n{_log_tail(info)}")


def start_server(config: str | Path = "config.properties", model_store: str | Path | None = None,
                 wait: bool = True, timeout: float = 120) -> ServerInfo:
    """Start TorchServe with ``config`` (token authorization on, no config snapshots).

    Args:
        config: the config.properties; TorchServe runs in its folder.
        model_store: overrides the config's ``model_store``.
        wait: block until every archive in the store has a READY worker.
        timeout: seconds to wait for that.

    Returns:
        The server's addresses, token file and ready workers per model.

    Raises:
        ServeError: already running for this folder, failed to launch, or not ready in time.
    """
    info = server_info(config, model_store)
    if info.pid is not None:
        raise ServeError(f"TorchServe already runs for {info.workdir} (pid {info.pid}); "
                         "`flannel serve stop` first")
    if not info.model_store.is_dir():
        raise ServeError(f"model store {info.model_store} does not exist: run `flannel archive` first")
    info.key_file.unlink(missing_ok=True)  # a stale file from a killed server holds dead keys
    code, printed = _launcher(info, "--start", "--ts-config", str(info.config), "--ncs",
                              "--model-store", str(info.model_store))
    if code != 0:
        raise ServeError(f"torchserve --start failed ({code}): {printed}")
    info.pid = _read_pid(info.workdir)
    if wait:
        info.models = wait_until_ready(info, timeout)
    return info


def stop_server(config: str | Path = "config.properties", timeout: float = STOP_TIMEOUT_S) -> bool:
    """Stop the TorchServe started for ``config`` and wait for the JVM and its workers to exit.

    Returns:
        True if a server was stopped, False if none was running.

    Raises:
        ServeError: it was still running after ``timeout`` seconds.
    """
    import psutil

    info = server_info(config)
    if info.pid is None:
        return False
    try:
        procs = [psutil.Process(info.pid), *psutil.Process(info.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    _launcher(info, "--stop")
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    if alive:
        raise ServeError(f"still running after {timeout} s: pids {[p.pid for p in alive]}")
    info.key_file.unlink(missing_ok=True)
    return True


def server_status(config: str | Path = "config.properties") -> ServerInfo | None:
    """The running server for ``config`` with READY workers per model, or None if not running."""
    import requests

    info = server_info(config)
    if info.pid is None:
        return None
    try:
        info.models = model_readiness(info, read_tokens(info.key_file)["management"])
    except (OSError, requests.RequestException, ValueError, KeyError):
        info.models = {}
    return info
