"""A real TorchServe on loopback, started and stopped the hard ways: a port taken before it
binds, a worker that never finishes loading, and the key file's mode from the first moment.

    .venv/bin/pytest tests/test_server_lifecycle.py -q -s

One TorchServe at a time, each with an empty model store or one tiny archive, each stopped by
the test (tests/test_ts_process.py covers the same paths with a fake launcher).
"""
from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from flannel.handlers.keys import read_tokens
from flannel.handlers.ts_config import (ServeError, loopback_config, read_properties, run_dir,
                                        server_info)
from flannel.handlers.ts_process import endpoints, start_server, stop_server

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("java") is None,
                                 reason="TorchServe needs Java 17 and `java` is not on PATH")]

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120


def ours(workdir: Path) -> list[psutil.Process]:
    """Live processes of the TorchServe running for ``workdir``: the JVM (its -f config) and
    its workers (their sockets under its run folder)."""
    marks = (str(workdir / "config.properties"), str(run_dir(workdir)))
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.info["status"] != psutil.STATUS_ZOMBIE and any(m in cmdline for m in marks):
            found.append(proc)
    return found


class Sampler(threading.Thread):
    """Every ~millisecond during a start: the key file's mode, and the processes running for
    the server."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(daemon=True)
        self.workdir, self.key_file = workdir, workdir / "key_file.json"
        self.modes: set[int] = set()
        self.workers: set[int] = set()
        self.done = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.done.is_set():
            try:
                self.modes.add(stat.S_IMODE(os.stat(self.key_file).st_mode))
            except FileNotFoundError:
                pass
            n += 1
            if n % 200 == 0:
                self.workers |= {p.pid for p in ours(self.workdir)
                                 if "model_service_worker" in " ".join(p.cmdline())}
            time.sleep(0.001)

    def __enter__(self) -> "Sampler":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join()


@pytest.mark.parametrize("taken", ["inference_address", "grpc_management_port"])
def test_a_taken_port_is_replaced_and_the_key_file_is_0600_from_its_first_moment(tmp_path,
                                                                                taken):
    """Another process holds one port of a generated config (REST, bound first; or gRPC,
    bound after REST already answers): TorchServe exits, start_server gives the config new
    ports and starts it again. The key file, sampled every millisecond from the moment it
    exists, is never readable beyond its owner: TorchServe runs under umask 077."""
    (tmp_path / "store").mkdir()
    config = loopback_config(tmp_path / "config.properties", tmp_path / "store",
                             REPO / "config.properties")
    value = read_properties(config)[taken]
    port = int(value.rsplit(":", 1)[1] if ":" in value else value)
    holder = socket.socket()
    holder.bind(("127.0.0.1", port))
    holder.listen()
    try:
        with Sampler(tmp_path) as sampler:
            started = time.monotonic()
            info = start_server(config, timeout=START_TIMEOUT_S)
            took = time.monotonic() - started
        try:
            moved = read_properties(config)[taken]
            assert moved != value and str(port) not in moved
            assert info.pid is not None and all(
                socket.create_connection(address, timeout=5).close() is None
                for address in endpoints(info).values())
            assert sampler.modes == {0o600}, {oct(m) for m in sampler.modes}
            for log in ("ts_log.log", "model_log.log"):  # files the JVM creates and never chmods
                assert stat.S_IMODE((info.log_dir / log).stat().st_mode) & 0o077 == 0
            assert set(read_tokens(info.key_file)) == {"inference", "management", "api"}
            print(f"\nport {port} ({taken}) taken: started on new ports in {took:.1f} s; key "
                  f"file modes seen {sorted(oct(m) for m in sampler.modes)}")
        finally:
            assert stop_server(config) is True
    finally:
        holder.close()
    assert not ours(tmp_path)


def stuck_archive(store: Path, work: Path) -> Path:
    """A model archive whose handler never finishes loading (its import sleeps), listed in the
    trust list like one `flannel archive` wrote."""
    from flannel.handlers.trust import trust_archive

    handler = work / "stuck_handler.py"
    handler.write_text("import time\n\ntime.sleep(600)\n\n\ndef handle(data, context):\n"
                       "    return [None] * len(data or [])\n")
    subprocess.run([str(Path(sys.executable).with_name("torch-model-archiver")),
                    "--model-name", "stuck", "--version", "1.0", "--handler", str(handler),
                    "--export-path", str(store)], check=True)
    trust_archive(store / "stuck.mar")
    return store / "stuck.mar"


def test_a_start_whose_worker_never_loads_stops_the_jvm_and_the_worker(tmp_path):
    (tmp_path / "store").mkdir()
    stuck_archive(tmp_path / "store", tmp_path)
    config = loopback_config(tmp_path / "config.properties", tmp_path / "store",
                             REPO / "config.properties")
    with Sampler(tmp_path) as sampler:
        with pytest.raises(ServeError, match="not ready after 25 s"):
            start_server(config, timeout=25)
        left = ours(tmp_path)
    try:
        assert sampler.workers, "no worker was seen loading: nothing was tested"
        assert not left, [p.cmdline() for p in left]
        assert server_info(config).pid is None and not (tmp_path / "key_file.json").exists()
        print(f"\nstuck worker: start failed after 25 s; worker pids seen {sorted(sampler.workers)}, "
              f"none left")
    finally:
        for proc in left:
            proc.kill()
