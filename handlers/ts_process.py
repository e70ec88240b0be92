"""Start, stop and inspect TorchServe for a config.properties (token authorization on).

    flannel serve start --config config.properties
    flannel serve status && flannel serve stop

TorchServe's own launcher (``python -m ts.model_server``) runs in the config's folder, with its
pid file and temporary files under ``logs/run`` (``flannel.handlers.ts_config``). It runs under
umask 077, so everything TorchServe creates (``key_file.json`` above all, and the logs) is
private to the account from the moment it exists. A start that fails (TorchServe exits, a worker
never becomes ready, the wait times out) stops the JVM and every worker it had started before it
raises; a config generated on free loopback ports (``ts_config.loopback_config``) whose port
was taken meanwhile is given new ports and started again.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from flannel.handlers.keys import read_tokens
from flannel.handlers.management import model_readiness
from flannel.handlers.ports import free_ports, handed_out
from flannel.handlers.ts_config import (ADDRESS_KEYS, ServeError, ServerInfo, read_pid,
                                        read_properties, run_dir, server_info,
                                        token_authorization_on)

log = logging.getLogger(__name__)

# The launcher's and the JVM's console output (logs/*.log hold the same, better organised).
CONSOLE_LOG = "console.log"
# Seconds between readiness polls: a model load takes a few seconds here.
POLL_S = 0.5
# Seconds the JVM gets to stop its workers after SIGTERM (TorchServe's launcher waits 60).
STOP_TIMEOUT_S = 60
# After a failed start: seconds the JVM gets to stop its workers before all of them are killed.
FAILED_START_STOP_S = 15
# TorchServe (the JVM and the workers it forks) inherits this umask: key_file.json, which the JVM
# creates before it chmods it to 0600, is 0600 from its first byte on.
LAUNCH_UMASK = 0o077
# Starts of a generated loopback config whose port another process took before TorchServe bound it.
BIND_ATTEMPTS = 3
# What the JVM prints (REST and gRPC alike) when a port it should listen on is taken.
BIND_FAILURE = "Address already in use"


class PortTaken(ServeError):
    """TorchServe exited because a port of its config was already in use."""


def _launcher_env(info: ServerInfo) -> dict[str, str]:
    tmp = run_dir(info.workdir)
    tmp.mkdir(parents=True, exist_ok=True)
    # TMPDIR: where the launcher keeps its pid file; TEMP: the JVM's java.io.tmpdir.
    from flannel.handlers.trust import server_env  # the workers' trust list

    return {**os.environ, "TMPDIR": str(tmp), "TEMP": str(tmp),
            "LOG_LOCATION": str(info.log_dir), "METRICS_LOCATION": str(info.log_dir),
            **server_env(info.model_store)}


def _console_size(info: ServerInfo) -> int:
    path = info.log_dir / CONSOLE_LOG
    return path.stat().st_size if path.is_file() else 0


def _console_since(info: ServerInfo, offset: int, limit: int = 1 << 20) -> str:
    path = info.log_dir / CONSOLE_LOG
    if not path.is_file():
        return ""
    with path.open("rb") as fh:
        fh.seek(offset)
        return fh.read(limit).decode(errors="replace")


def _launcher(info: ServerInfo, *args: str) -> tuple[int, str]:
    """Run TorchServe's own launcher under ``LAUNCH_UMASK``; returns its exit code and what it
    printed.

    The JVM inherits the launcher's stdout, so it goes to a file: a pipe would stay open for the
    life of the server.
    """
    cmd = [sys.executable, "-m", "ts.model_server", *args]
    env = _launcher_env(info)
    info.log_dir.mkdir(parents=True, exist_ok=True)
    start = _console_size(info)
    with (info.log_dir / CONSOLE_LOG).open("ab") as out:
        code = subprocess.run(cmd, cwd=info.workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=STOP_TIMEOUT_S, umask=LAUNCH_UMASK).returncode
    return code, _console_since(info, start, 4096)


def _log_tail(info: ServerInfo, lines: int = 15) -> str:
    out = []
    for name in ("ts_log.log", "model_log.log"):
        path = info.log_dir / name
        if path.is_file():
            out.append(f"--- {path} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(out)


def endpoints(info: ServerInfo) -> dict[str, tuple[str, int]]:
    """(host, port) of every endpoint the config has TorchServe listen on."""
    def host_port(address: str) -> tuple[str, int]:
        parts = urlsplit(address if "//" in address else f"//{address}")
        return parts.hostname or "127.0.0.1", int(parts.port)

    found = {"inference": host_port(info.inference_url),
             "management": host_port(info.management_url),
             "grpc inference": host_port(info.grpc_inference),
             "grpc management": host_port(info.grpc_management)}
    if read_properties(info.config).get("enable_metrics_api", "true").lower() != "false":
        found["metrics"] = host_port(info.metrics_url)
    return found


def _accepts(address: tuple[str, int]) -> bool:
    host = "127.0.0.1" if address[0] in ("0.0.0.0", "") else address[0]
    try:
        with socket.create_connection((host, address[1]), timeout=1.0):
            return True
    except OSError:
        return False


def wait_until_ready(info: ServerInfo, timeout: float,
                     on_poll: Callable[[], None] | None = None) -> dict[str, int]:
    """Poll until every endpoint accepts connections and every archive in the model store has a
    READY worker. TorchServe binds its gRPC ports after the REST ones and exits when one is
    taken, so REST answering alone is not ready.

    Args:
        on_poll: called once per poll (``start_server`` notes the processes TorchServe started).

    Raises:
        ServeError: the server died or was not ready in time (with the log tails).
    """
    import requests

    expected = {p.stem for p in info.model_store.glob("*.mar")}
    deadline = time.monotonic() + timeout
    ready: dict[str, int] = {}
    while time.monotonic() < deadline:
        if on_poll:
            on_poll()
        if read_pid(info.workdir) is None:
            raise ServeError(f"TorchServe exited during start-up\n{_log_tail(info)}")
        # With token authorization off (behind the pod's proxy) TorchServe writes no key file.
        keyed = token_authorization_on(info.config)
        if info.key_file.is_file() or not keyed:
            try:
                token = read_tokens(info.key_file)["management"] if keyed else ""
                ready = model_readiness(info, token)
                if (set(ready) >= expected and all(ready.values())
                        and all(map(_accepts, endpoints(info).values()))):
                    return ready
            except (requests.RequestException, ValueError, KeyError):
                pass  # frontend still starting or key file half-written
        time.sleep(POLL_S)
    raise ServeError(f"TorchServe not ready after {timeout:.0f} s (workers: {ready}, "
                     f"expected models {sorted(expected)})\n{_log_tail(info)}")


def _running(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class LaunchedProcesses:
    """The JVM one start launched and every process seen below it (workers, which outlive a
    JVM that dies), so that a failed start can stop all of them."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.procs: dict[int, "psutil.Process"] = {}
        try:
            self.jvm = psutil.Process(pid)
            self.procs[pid] = self.jvm
        except psutil.NoSuchProcess:
            self.jvm = None

    def note_children(self) -> None:
        import psutil

        if self.jvm is None:
            return
        try:
            for child in self.jvm.children(recursive=True):
                self.procs.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass

    def stop(self, timeout: float = FAILED_START_STOP_S) -> None:
        """SIGTERM to the JVM (it stops its workers), then SIGKILL to whatever is left."""
        import psutil

        self.note_children()
        alive = [p for p in self.procs.values() if _running(p)]
        if self.jvm is not None and self.jvm in alive:
            try:
                self.jvm.terminate()
            except psutil.NoSuchProcess:
                pass
            _, alive = psutil.wait_procs(alive, timeout=timeout)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=timeout)


def _reassign_ports(config: Path) -> bool:
    """Give a config generated by ``loopback_config`` (every port handed out by ``free_ports``
    in this process) new free ports; returns False, leaving the file alone, for any other."""
    lines = config.read_text().splitlines()
    found = {}
    for i, line in enumerate(lines):
        key, _, value = line.partition("=")
        if key.strip() in ADDRESS_KEYS:
            head, _, port = value.strip().rpartition(":")
            if port.isdigit():
                found[i] = (key.strip(), head, int(port))
    if len(found) != len(ADDRESS_KEYS) or not handed_out([p for _, _, p in found.values()]):
        return False
    for (i, (key, head, _)), port in zip(found.items(), free_ports(len(found))):
        lines[i] = f"{key}={head}:{port}" if head else f"{key}={port}"
    config.write_text("\n".join(lines) + "\n")
    return True


def _launch(info: ServerInfo, wait: bool, timeout: float) -> ServerInfo:
    """One start of TorchServe for ``info``; everything it launched is stopped if it fails."""
    info.key_file.unlink(missing_ok=True)  # a stale file from a killed server holds dead keys
    offset = _console_size(info)
    code, printed = _launcher(info, "--start", "--ts-config", str(info.config), "--ncs",
                              "--model-store", str(info.model_store))
    if code != 0:  # the launcher refuses before it starts the JVM (another server, bad args)
        raise ServeError(f"torchserve --start failed ({code}): {printed}")
    pid = read_pid(info.workdir)
    launched = LaunchedProcesses(pid) if pid is not None else None
    try:
        info.pid = pid
        if wait:
            info.models = wait_until_ready(info, timeout,
                                           on_poll=launched.note_children if launched else None)
        elif pid is None:
            raise ServeError(f"TorchServe exited during start-up\n{_log_tail(info)}")
        return info
    except BaseException as exc:
        if launched:
            launched.stop()
        info.key_file.unlink(missing_ok=True)
        info.pid = None
        if BIND_FAILURE in _console_since(info, offset):
            raise PortTaken(f"a port of {info.config} is in use: {exc}") from exc
        raise


def start_server(config: str | Path = "config.properties", model_store: str | Path | None = None,
                 wait: bool = True, timeout: float = 120) -> ServerInfo:
    """Start TorchServe with ``config`` (token authorization on, no config snapshots).

    Args:
        config: the config.properties; TorchServe runs in its folder.
        model_store: overrides the config's ``model_store``.
        wait: block until every endpoint listens and every archive in the store has a READY
            worker.
        timeout: seconds to wait for that.

    Returns:
        The server's addresses, token file and ready workers per model.

    Raises:
        ServeError: already running for this folder, failed to launch, or not ready in time;
            whatever the start launched has been stopped by then. ``PortTaken`` when a port of
            a config not generated on free ports here is in use.
    """
    info = server_info(config, model_store)
    if info.pid is not None:
        raise ServeError(f"TorchServe already runs for {info.workdir} (pid {info.pid}); "
                         "`flannel serve stop` first")
    if not info.model_store.is_dir():
        raise ServeError(f"model store {info.model_store} does not exist: run `flannel archive` first")
    from flannel.handlers.trust import admit_server
    admit_server(info)  # trusted archives only, no registration by URL: before anything starts
    attempt = 1
    while True:
        try:
            return _launch(info, wait, timeout)
        except PortTaken as exc:
            if attempt >= BIND_ATTEMPTS or not _reassign_ports(info.config):
                raise
            log.warning("%s: starting again on new free ports", str(exc).splitlines()[0])
        attempt += 1
        info = server_info(config, model_store)


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
        keyed = token_authorization_on(info.config)
        info.models = model_readiness(info, read_tokens(info.key_file)["management"] if keyed else "")
    except (OSError, requests.RequestException, ValueError, KeyError):
        info.models = {}
    return info
