"""Start, stop and inspect TorchServe for a config.properties (token authorization on).

    flannel serve start --config config.properties
    flannel serve status && flannel serve stop

TorchServe's own launcher (``python -m ts.model_server``) runs in the config's folder, with its
pid file and temporary files under ``logs/run`` (``flannel.handlers.ts_config``).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from flannel.handlers.keys import read_tokens
from flannel.handlers.management import model_readiness
from flannel.handlers.ts_config import (ServeError, ServerInfo, read_pid, run_dir,
                                        server_info)


# The launcher's and the JVM's console output (logs/*.log hold the same, better organised).
CONSOLE_LOG = "console.log"
# Seconds between readiness polls: a model load takes a few seconds here.
POLL_S = 0.5
# Seconds the JVM gets to stop its workers after SIGTERM (TorchServe's launcher waits 60).
STOP_TIMEOUT_S = 60


def _launcher_env(info: ServerInfo) -> dict[str, str]:
    tmp = run_dir(info.workdir)
    tmp.mkdir(parents=True, exist_ok=True)
    # TMPDIR: where the launcher keeps its pid file; TEMP: the JVM's java.io.tmpdir.
    # TS_DECODE_INPUT_REQUEST=false: the worker hands JSON and text bodies to the handler as
    # bytes, which parses them under its own limits (flannel.handlers.request_json); TorchServe's
    # own json.loads has none (depth, size, number length) and expands a hostile body many times.
    return {**os.environ, "TMPDIR": str(tmp), "TEMP": str(tmp),
            "LOG_LOCATION": str(info.log_dir), "METRICS_LOCATION": str(info.log_dir),
            "TS_DECODE_INPUT_REQUEST": "false"}


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
        if read_pid(info.workdir) is None:
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
    info.pid = read_pid(info.workdir)
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
