"""Starting and stopping TorchServe, with a fake launcher: a failed start stops what it started,
a stale pid file is ignored, a taken port of a generated config gets new ports.

    .venv/bin/pytest tests/test_ts_process.py -q

The fake "JVM" is a Python process whose command line carries TorchServe's main class and which
forks a "worker"; the behaviour under test (what start_server does when the start fails) is
this project's. tests/test_server_lifecycle.py runs the same paths against a real TorchServe.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from flannel.handlers import ts_process
from flannel.handlers.ports import free_ports, handed_out
from flannel.handlers.ts_config import (PID_FILE, ServeError, loopback_config, read_pid,
                                        read_properties, run_dir, server_info)

REPO = Path(__file__).resolve().parents[1]
MAIN_CLASS = "org.pytorch.serve.ModelServer"
# The fake JVM: forks a fake worker, writes its pid, then lives `sys.argv[2]` seconds; with a
# third argument it prints what the JVM prints on a taken port before it exits, leaving its
# worker behind.
FAKE_JVM = """
import signal, subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
# Like the JVM, stop the worker on SIGTERM.
signal.signal(signal.SIGTERM, lambda *_: (worker.kill(), worker.wait(), sys.exit(0)))
open(sys.argv[1], "w").write(str(worker.pid))
if len(sys.argv) > 3:
    print("bind(..) failed: " + sys.argv[3], flush=True)
time.sleep(float(sys.argv[2]))
"""


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class FakeLauncher:
    """Stands in for ``ts_process._launcher``: ``--start`` runs FAKE_JVM and writes its pid
    where TorchServe's launcher writes the JVM's."""

    def __init__(self, tmp: Path, lives_s: float = 300.0, prints: str | None = None) -> None:
        self.tmp, self.lives_s, self.prints = tmp, lives_s, prints
        self.jvms: list[subprocess.Popen] = []
        self.worker_pids: list[int] = []
        self.configs: list[dict[str, str]] = []

    def __call__(self, info, *args):
        assert args[0] == "--start"
        self.configs.append(read_properties(info.config))
        worker_file = self.tmp / f"worker{len(self.jvms)}.pid"
        info.log_dir.mkdir(parents=True, exist_ok=True)
        with (info.log_dir / ts_process.CONSOLE_LOG).open("ab") as console:
            cmd = [sys.executable, "-c", FAKE_JVM, str(worker_file), str(self.lives_s)]
            jvm = subprocess.Popen(cmd + ([self.prints] if self.prints else []) + [MAIN_CLASS],
                                   stdout=console, stderr=subprocess.STDOUT)
        self.jvms.append(jvm)
        run_dir(info.workdir).mkdir(parents=True, exist_ok=True)
        (run_dir(info.workdir) / PID_FILE).write_text(str(jvm.pid))
        deadline = time.monotonic() + 30
        while not worker_file.is_file() or not worker_file.read_text():
            assert time.monotonic() < deadline, "the fake JVM did not start its worker"
            time.sleep(0.05)
        self.worker_pids.append(int(worker_file.read_text()))
        return 0, ""

    def cleanup(self) -> None:
        for pid in [*self.worker_pids, *(j.pid for j in self.jvms)]:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        for jvm in self.jvms:
            jvm.wait(timeout=10)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    made = []

    def make(**kw) -> FakeLauncher:
        launcher = FakeLauncher(tmp_path, **kw)
        monkeypatch.setattr(ts_process, "_launcher", launcher)
        monkeypatch.setattr(ts_process, "POLL_S", 0.05)
        made.append(launcher)
        return launcher

    yield make
    for launcher in made:
        launcher.cleanup()


def config_in(tmp_path: Path) -> Path:
    (tmp_path / "store").mkdir()
    return loopback_config(tmp_path / "config.properties", tmp_path / "store",
                           REPO / "config.properties")


@pytest.mark.slow
def test_a_start_that_times_out_stops_the_jvm_and_its_workers(tmp_path, fake):
    launcher = fake()
    config = config_in(tmp_path)
    with pytest.raises(ServeError, match="not ready after 1 s"):
        ts_process.start_server(config, timeout=1)
    (jvm,), (worker,) = launcher.jvms, launcher.worker_pids
    assert jvm.wait(timeout=20) is not None and gone(worker)
    assert read_pid(tmp_path) is None and server_info(config).pid is None


@pytest.mark.slow
def test_a_jvm_that_exits_during_start_has_its_orphaned_worker_stopped(tmp_path, fake):
    launcher = fake(lives_s=1.0)
    with pytest.raises(ServeError, match="exited during start-up"):
        ts_process.start_server(config_in(tmp_path), timeout=60)
    (worker,) = launcher.worker_pids
    assert gone(worker), "the worker outlived its JVM"


def test_a_stale_pid_file_of_another_program_is_ignored(tmp_path):
    pid_file = run_dir(tmp_path) / PID_FILE
    pid_file.parent.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    like_ts = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", MAIN_CLASS])
    try:
        pid_file.write_text(str(other.pid))  # a live process, but not TorchServe
        assert psutil.pid_exists(other.pid) and read_pid(tmp_path) is None
        pid_file.write_text(str(like_ts.pid))
        assert read_pid(tmp_path) == like_ts.pid
        like_ts.kill()
        like_ts.wait()
        assert read_pid(tmp_path) is None  # exited
        pid_file.write_text("not a pid")
        assert read_pid(tmp_path) is None
    finally:
        for proc in (other, like_ts):
            proc.kill()
            proc.wait()


def test_start_server_ignores_a_stale_pid_file_and_starts(tmp_path, fake, monkeypatch):
    launcher = fake()
    config = config_in(tmp_path)
    run_dir(tmp_path).mkdir(parents=True)
    (run_dir(tmp_path) / PID_FILE).write_text(str(os.getpid()))  # pytest: not TorchServe
    monkeypatch.setattr(ts_process, "wait_until_ready", lambda info, timeout, on_poll=None: {})
    info = ts_process.start_server(config)
    assert info.pid == launcher.jvms[0].pid


@pytest.mark.slow
def test_a_taken_port_of_a_generated_config_gets_new_ports(tmp_path, fake):
    launcher = fake(lives_s=0.5, prints=ts_process.BIND_FAILURE)
    config = config_in(tmp_path)
    with pytest.raises(ts_process.PortTaken, match="in use"):
        ts_process.start_server(config, timeout=30)
    # Every start saw other ports, each failure stopped what it had started.
    ports = [tuple(c[k] for k in ts_process.ADDRESS_KEYS) for c in launcher.configs]
    assert len(ports) == ts_process.BIND_ATTEMPTS == len(set(ports))
    assert all(gone(pid) for pid in launcher.worker_pids)


@pytest.mark.slow
def test_a_config_written_by_hand_is_never_rewritten(tmp_path, fake):
    launcher = fake(lives_s=0.5, prints=ts_process.BIND_FAILURE)
    (tmp_path / "store").mkdir()
    config = tmp_path / "config.properties"
    text = (REPO / "config.properties").read_text().replace("model_store=model_store",
                                                            f"model_store={tmp_path / 'store'}")
    config.write_text(text)
    with pytest.raises(ts_process.PortTaken):
        ts_process.start_server(config, timeout=30)
    assert len(launcher.configs) == 1 and config.read_text() == text


def test_free_ports_remembers_what_it_handed_out():
    ports = free_ports(3)
    assert len(set(ports)) == 3 and handed_out(ports)
    assert not handed_out([8080]) and not handed_out([])


def test_a_refused_launch_stops_nothing(tmp_path, monkeypatch):
    """The launcher refuses (another TorchServe started for this folder meanwhile): that
    server is not this start's to stop."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", MAIN_CLASS])

    def refusing(info, *args):
        run_dir(info.workdir).mkdir(parents=True, exist_ok=True)
        (run_dir(info.workdir) / PID_FILE).write_text(str(other.pid))
        return 1, "TorchServe is already running, please use torchserve --stop to stop TorchServe."

    monkeypatch.setattr(ts_process, "_launcher", refusing)
    try:
        with pytest.raises(ServeError, match="already running"):
            ts_process.start_server(config_in(tmp_path), timeout=5)
        assert other.poll() is None, "the other server was stopped"
    finally:
        other.kill()
        other.wait()
