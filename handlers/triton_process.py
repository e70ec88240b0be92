"""Start, stop and inspect Triton Inference Server serving a model store's archives.

    flannel serve start --runtime triton --config config.properties
    flannel serve status && flannel serve stop

The server is the ``tritonserver`` that the PyPI package ``nvidia-pytriton`` bundles (Triton
2.51 with its Python backend; nothing of PyTriton's own Python API is used). It listens where the
config has TorchServe listen (inference and gRPC inference address, metrics address), on
loopback unless the config says otherwise, so clients and probes address either runtime alike;
one runtime runs per config at a time. Access: Triton's restricted-API feature demands the header
``authorization: Bearer <key>`` for every API but health (inference, metadata, model config,
repository, statistics, shared memory, trace, logging), over REST and gRPC; the key is drawn
afresh at each start and written, readable by its owner only, to ``logs/run/triton/key``.
Model control is off (``--model-control-mode=none``): the repository is fixed at start.
Triton's own REST port is a private loopback port; the config's inference address is an nginx
guard in front of it (``flannel.handlers.triton_guard``: Triton 2.51's REST frontend crashes on
JSON bodies near 4 MB, key or no key). gRPC and metrics are Triton's own.

Triton's Python-backend stub embeds a CPython found through ``python3`` on its PATH; it is given
a prepared environment (``stub_environment``): this interpreter's standard library (and its
shared ``libpython``), NumPy 1.26 (the stub's tensors are built for NumPy 1; under NumPy 2 it
corrupts every tensor), then this virtual environment's packages.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from flannel.handlers.ports import free_ports
from flannel.handlers.triton_guard import GuardUnavailable
from flannel.handlers.ts_config import (ServeError, ServerInfo, read_pid, run_dir,
                                        server_info)

log = logging.getLogger(__name__)

RUNTIME = "triton"
STATE_DIR = "triton"  # under logs/run: pid, state, key, repository, backends
STATE_FILE = "server.json"
KEY_NAME = "key"
LOG_NAME = "triton.log"
# The header every restricted API demands, and its value's form: the same header TorchServe's
# token authorization reads, so clients send the key alike.
KEY_HEADER = "authorization"
# Every API Triton can restrict but health (readiness probes need no key).
RESTRICTED_APIS = ("metadata", "inference", "shared-memory", "model-config", "model-repository",
                   "statistics", "trace", "logging")
# NumPy for the stub, installed by `make setup` (Makefile) beside the virtual environment.
STUB_SITE_ENV = "FLANNEL_TRITON_STUB_SITE"
STUB_SITE_NAME = "triton-stub-site"
# Seconds Triton waits at stop for in-flight requests and for clients' open connections (idle
# keep-alive ones included) before it exits anyway; a batch takes a second or two here.
EXIT_TIMEOUT_S = 15
STOP_TIMEOUT_S = EXIT_TIMEOUT_S + 15
POLL_S = 0.5
LAUNCH_UMASK = 0o077


@dataclass(frozen=True)
class BundledTriton:
    """Where the bundled server's files are."""

    root: Path  # pytriton/tritonserver

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        return self.root / "backends" / "python"

    def stub(self, version: tuple[int, int] = sys.version_info[:2]) -> Path:
        return self.root / "python_backend_stubs" / f"{version[0]}.{version[1]}" / \
            "triton_python_backend_stub"


def bundled_triton() -> BundledTriton:
    """The ``tritonserver`` of the installed ``nvidia-pytriton`` wheel.

    Raises:
        ServeError: the wheel is not installed, or lacks a stub for this Python.
    """
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServeError("Triton is not installed: `make setup` installs nvidia-pytriton "
                         "(requirements-triton.lock), which bundles tritonserver")
    found = BundledTriton(Path(list(spec.submodule_search_locations)[0]) / "tritonserver")
    for path in (found.binary, found.python_backend / "libtriton_python.so", found.stub()):
        if not path.is_file():
            raise ServeError(f"{path} is missing from the nvidia-pytriton install")
    return found


def triton_problem() -> str | None:
    """Why the bundled Triton cannot serve here (not installed, no stub for this Python, no
    NumPy for the stub, no nginx for its guard), or None."""
    from flannel.handlers.triton_guard import nginx_binary

    try:
        bundled_triton()
        stub_site()
        nginx_binary()
    except (ServeError, GuardUnavailable) as exc:
        return str(exc)
    return None


def stub_site() -> Path:
    """The folder holding NumPy 1.x for the stub (``STUB_SITE_ENV``, else beside the venv)."""
    path = Path(os.environ.get(STUB_SITE_ENV) or Path(sys.prefix) / STUB_SITE_NAME)
    if not (path / "numpy").is_dir():
        raise ServeError(f"{path} holds no NumPy for Triton's Python backend: run `make setup` "
                         f"(or pip install --target {path} -r requirements-triton-stub.lock)")
    return path


def stub_environment(triton: BundledTriton, dest: Path) -> dict[str, str]:
    """Prepare ``dest`` as Triton's backend folder and the stub's Python environment.

    ``dest/python`` holds the Python backend with the stub for this Python version; ``dest``
    itself is a virtual environment (``pyvenv.cfg``, ``bin/python3``) whose home is this
    interpreter's, so the stub's embedded CPython takes this standard library; its
    site-packages adds NumPy 1 and then this environment's packages.

    Returns:
        The variables to add to the server's environment.
    """
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise ServeError(f"{sys.executable} has no shared libpython: Triton's Python-backend stub "
                         "needs the libpython of the interpreter whose library it runs; use a "
                         "Python built with --enable-shared (Debian's python3 is)")
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    python = dest / "python"
    python.mkdir(parents=True, exist_ok=True)
    links = {"libtriton_python.so": triton.python_backend / "libtriton_python.so",
             "triton_python_backend_utils.py":
                 triton.python_backend / "triton_python_backend_utils.py",
             "triton_python_backend_stub": triton.stub()}
    base_python = Path(sys.base_prefix) / "bin" / f"python{version}"
    links_bin = {"python3": base_python}
    for folder, table in ((python, links), (dest / "bin", links_bin)):
        folder.mkdir(parents=True, exist_ok=True)
        for name, target in table.items():
            link = folder / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target)
    (dest / "pyvenv.cfg").write_text(f"home = {base_python.parent}\n"
                                     "include-system-site-packages = false\n"
                                     f"version = {sys.version.split()[0]}\n")
    site = dest / "lib" / f"python{version}" / "site-packages"
    site.mkdir(parents=True, exist_ok=True)
    venv_site = sysconfig.get_paths()["purelib"]
    (site / "flannel_stub.pth").write_text(
        f"import site; site.addsitedir({str(stub_site())!r}); site.addsitedir({venv_site!r})\n")
    libdir = sysconfig.get_config_var("LIBDIR")
    return {"PATH": f"{dest / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "LD_LIBRARY_PATH": os.pathsep.join(
                p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)}


@dataclass(frozen=True)
class TritonState:
    """What a start recorded: the process and where everything lives."""

    pid: int
    repository: Path
    key_file: Path
    log_file: Path
    models: tuple[str, ...]
    guard_pid: int | None = None  # the nginx master in front of Triton's REST port
    triton_http: str = ""  # Triton's own REST address, behind the guard


def state_dir(workdir: Path) -> Path:
    return run_dir(workdir) / STATE_DIR


def _host_port(address: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(address if "//" in address else f"//{address}")
    return parts.hostname or "127.0.0.1", int(parts.port or default_port)


def server_args(info: ServerInfo, triton: BundledTriton, repository: Path, backends: Path,
                key: str, http: tuple[str, int]) -> list[str]:
    """The ``tritonserver`` command line for a config's gRPC and metrics addresses, its REST
    port at ``http`` (behind the guard)."""
    grpc = _host_port(info.grpc_inference, 7070)
    metrics = _host_port(info.metrics_url, 8082)
    restricted = f"{','.join(RESTRICTED_APIS)}:{KEY_HEADER}=Bearer {key}"
    return [str(triton.binary), f"--model-repository={repository}",
            f"--backend-directory={backends}", "--model-control-mode=none",
            f"--http-address={http[0]}", f"--http-port={http[1]}",
            f"--grpc-address={grpc[0]}", f"--grpc-port={grpc[1]}",
            f"--metrics-address={metrics[0]}", f"--metrics-port={metrics[1]}",
            "--allow-metrics=true", "--allow-gpu-metrics=false", "--allow-cpu-metrics=true",
            f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}", "--strict-readiness=true",
            "--log-verbose=0", "--backend-config=python,shm-default-byte-size=67108864",
            "--backend-config=python,shm-growth-byte-size=67108864"]


def read_state(workdir: Path) -> TritonState | None:
    """The state of a live Triton started for this folder, else None."""
    import psutil

    path = state_dir(workdir) / STATE_FILE
    try:
        raw = json.loads(path.read_text())
        proc = psutil.Process(int(raw["pid"]))
        cmdline = proc.cmdline()
        if not cmdline or Path(cmdline[0]).name != "tritonserver" \
                or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return TritonState(int(raw["pid"]), Path(raw["repository"]), Path(raw["key_file"]),
                           Path(raw["log_file"]), tuple(raw["models"]), raw.get("guard_pid"),
                           raw.get("triton_http", ""))
    except (OSError, ValueError, KeyError, TypeError, psutil.Error):
        return None


def triton_info(config: str | Path = "config.properties") -> ServerInfo | None:
    """The ``ServerInfo`` of a Triton running for ``config`` (``runtime`` "triton", its key
    file and pid), or None when none is."""
    info = server_info(config)
    state = read_state(info.workdir)
    if state is None:
        return None
    from dataclasses import replace

    return replace(info, runtime=RUNTIME, key_file=state.key_file, pid=state.pid,
                   models={m: 1 for m in state.models})


def _ready(base: str, models: list[str], key: str) -> bool:
    import requests

    base = base.rstrip("/")
    try:
        if requests.get(f"{base}/v2/health/ready", timeout=2).status_code != 200:
            return False
        return all(requests.get(f"{base}/v2/models/{m}/ready", timeout=2,
                                headers={KEY_HEADER: f"Bearer {key}"}).status_code == 200
                   for m in models)
    except requests.RequestException:
        return False


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    kept = [line for line in text if not line.startswith(("+-", "| "))] or text
    return f"--- {path} ---\n" + "\n".join(kept[-lines:])


def start_triton(config: str | Path = "config.properties", model_store: str | Path | None = None,
                 *, timeout: float = 180.0, repository: str | Path | None = None,
                 export: str | Path | None = None, allow_unvalidated: bool = False) -> ServerInfo:
    """Admit the store (trust list, nothing else in it), lay it out as a Triton repository,
    start the bundled Triton and wait until every model is ready.

    ``export``: serve this run's export instead of the store: it is archived first, as
    ``flannel archive`` would (parity passed, the backend's gate, an external evaluation unless
    ``allow_unvalidated``), into a private store with its own trust list beside the server's
    state, and served from there.

    ``repository``: serve this model repository as it is instead (one ``flannel export triton``
    wrote, say): only models whose backend the bundled server has (Python) can load; its models
    check their archives against the trust list their configs name.

    Raises:
        ServeError: TorchServe or Triton already runs for this config, the store is refused,
            or Triton exits or is not ready in time (its log's tail in the message); a failed
            start leaves no process behind.
    """
    from flannel.handlers.trust import admit_server, server_env
    from flannel.handlers.triton_repository import serving_repository

    info = server_info(config, model_store)
    if read_pid(info.workdir) is not None:
        raise ServeError(f"TorchServe is running for {info.config}: `flannel serve stop` first")
    if read_state(info.workdir) is not None:
        raise ServeError(f"Triton is already running for {info.config}")
    triton = bundled_triton()
    folder = state_dir(info.workdir)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    trust_list = None
    if export is not None:
        info, trust_list = _private_store(info, Path(export), folder, allow_unvalidated)
    if repository is None:
        admit_server(info)
        repository = folder / "repository"
        models = serving_repository(info.model_store, repository, trust_list)
    else:
        repository = Path(repository).resolve()
        models = sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())
    if not models:
        raise ServeError(f"{info.model_store} holds no archive to serve")
    env = {**os.environ, **server_env(info.model_store),
           **stub_environment(triton, folder / "backends")}
    key = secrets.token_urlsafe(32)
    key_file = folder / KEY_NAME
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    log_file = folder / LOG_NAME
    (upstream_port,) = free_ports(1)
    upstream = ("127.0.0.1", upstream_port)
    args = server_args(info, triton, repository, folder / "backends", key, upstream)
    with log_file.open("ab") as out:
        proc = subprocess.Popen(args, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                umask=LAUNCH_UMASK)
    state = {"pid": proc.pid, "repository": str(repository), "key_file": str(key_file),
             "log_file": str(log_file), "models": models, "config": str(info.config),
             "triton_http": f"http://{upstream[0]}:{upstream[1]}"}
    (folder / STATE_FILE).write_text(json.dumps(state))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _kill_group(proc.pid)
            raise ServeError(f"Triton exited during start-up (code {proc.returncode})\n"
                             f"{_log_tail(log_file)}")
        if _ready(state["triton_http"], models, key):
            break
        time.sleep(POLL_S)
    else:
        _stop_pid(proc.pid)
        raise ServeError(f"Triton not ready after {timeout:.0f} s (models {models})\n"
                         f"{_log_tail(log_file)}")
    try:
        state["guard_pid"] = _start_guard(info, upstream, folder, deadline)
    except (ServeError, GuardUnavailable) as exc:
        _stop_pid(proc.pid)
        raise ServeError(str(exc)) from None
    (folder / STATE_FILE).write_text(json.dumps(state))
    log.info("Triton pid %d serves %s behind its guard (pid %d)", proc.pid, ", ".join(models),
             state["guard_pid"])
    return triton_info(info.config) or info


def _private_store(info: ServerInfo, export: Path, folder: Path,
                   allow_unvalidated: bool) -> tuple[ServerInfo, Path]:
    """Archive the run of ``export`` (a run folder or its ``export/``) into ``folder/store``
    with the trust list ``folder/trusted_archives.json``; the ``ServerInfo`` serving that store."""
    from dataclasses import replace

    from flannel.handlers.archive import ArchiveError, build_archive
    from flannel.handlers.trust import TRUST_LIST_NAME

    run_dir = export.parent if (export / "manifest.json").is_file() else export
    store, trust_list = folder / "store", folder / TRUST_LIST_NAME
    shutil.rmtree(store, ignore_errors=True)
    trust_list.unlink(missing_ok=True)
    try:
        build_archive(run_dir, store, trust_list=trust_list, allow_unvalidated=allow_unvalidated)
    except ArchiveError as exc:
        raise ServeError(f"cannot serve {export}: {exc}") from None
    return replace(info, model_store=store), trust_list


def _start_guard(info: ServerInfo, upstream: tuple[str, int], folder: Path,
                 deadline: float) -> int:
    """Start the guard on the config's inference address; its pid once it answers there."""
    from flannel.handlers.triton_guard import guard_config, nginx_binary

    binary = nginx_binary()
    guard = folder / "guard"
    guard.mkdir(exist_ok=True)
    conf = guard / "nginx.conf"
    conf.write_text(guard_config(_host_port(info.inference_url, 8080), upstream, guard))
    with (guard / "console.log").open("ab") as out:
        proc = subprocess.Popen([binary, "-e", str(guard / "guard.log"), "-p", str(guard),
                                 "-c", str(conf)], cwd=guard, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, umask=LAUNCH_UMASK)
    while time.monotonic() < deadline + 10:
        if proc.poll() is not None:
            raise ServeError(f"the guard (nginx) exited at start (code {proc.returncode})\n"
                             f"{_log_tail(guard / 'guard.log')}{_log_tail(guard / 'console.log')}")
        if _reachable(info.inference_url):
            return proc.pid
        time.sleep(0.1)
    _stop_pid(proc.pid)
    raise ServeError(f"the guard (nginx) did not answer on {info.inference_url}")


def _reachable(url: str) -> bool:
    import requests

    try:
        return requests.get(f"{url.rstrip('/')}/v2/health/live", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _stop_pid(pid: int) -> None:
    """SIGTERM (Triton finishes in-flight requests; nginx stops), then the process's whole
    session (Triton's stubs, nginx's worker) killed."""
    import psutil

    try:
        proc = psutil.Process(pid)
        proc.terminate()
        proc.wait(STOP_TIMEOUT_S)
    except psutil.TimeoutExpired:
        log.warning("pid %d did not stop in %d s; killing it", pid, STOP_TIMEOUT_S)
    except psutil.NoSuchProcess:
        pass
    _kill_group(pid)


def stop_triton(config: str | Path = "config.properties") -> bool:
    """Stop the Triton running for ``config``; False when none was."""
    info = server_info(config)
    state = read_state(info.workdir)
    if state is None:
        return False
    if state.guard_pid:
        _stop_pid(state.guard_pid)
    _stop_pid(state.pid)
    (state_dir(info.workdir) / STATE_FILE).unlink(missing_ok=True)
    state.key_file.unlink(missing_ok=True)
    return True


def describe(info: ServerInfo) -> str:
    """Multi-line summary for the CLI."""
    models = ", ".join(info.models) or "none"
    return (f"Triton pid {info.pid}\n  inference  {info.inference_url}  grpc {info.grpc_inference}"
            f"  (KServe v2)\n  metrics    {info.metrics_url}/metrics\n  models     {models}\n"
            f"  key        {info.key_file}  (header {KEY_HEADER}: Bearer <key>)\n"
            f"  logs       {state_dir(info.workdir) / LOG_NAME}\n"
            f"  guard      nginx in front of the REST port (flannel.handlers.triton_guard)")
