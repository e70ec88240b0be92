"""TorchServe's config.properties: reading it, the server it describes, and rewritten copies.

    from flannel.handlers.ts_config import server_info
    print(server_info("config.properties").describe())

TorchServe runs in the folder holding the config (relative ``model_store`` resolves there, and
TorchServe writes ``key_file.json`` into its working folder). Logs go to ``<that folder>/logs``;
the launcher's pid file, the worker sockets and unpacked archives go to ``logs/run``, so two
configs in two folders run two independent servers. ``loopback_config`` writes a private copy on
free loopback ports (tests, benchmarks); ``container_config`` the copy a container serves with.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from flannel.handlers.ports import free_ports


KEY_FILE = "key_file.json"
LOG_DIR = "logs"
# Under logs/: TMPDIR of the launcher (its .model_server.pid) and java.io.tmpdir (worker sockets,
# unpacked archives). Unix socket paths must stay under ~100 characters, so keep it short.
RUN_DIR = "run"
PID_FILE = ".model_server.pid"
# Seconds one management API call may take before a caller treats the server as not ready.
HTTP_TIMEOUT_S = 5.0


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
    runtime: str = "torchserve"  # or "triton" (flannel.handlers.triton_process)

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
        key_file=workdir / KEY_FILE, log_dir=workdir / LOG_DIR, pid=read_pid(workdir))




def token_authorization_on(config: str | Path) -> bool:
    """Whether a TorchServe started from ``config`` checks keys (TorchServe's default: yes)."""
    value = read_properties(config).get("disable_token_authorization", "false")
    return value.strip().lower() != "true"


def run_dir(workdir: Path) -> Path:
    return workdir / LOG_DIR / RUN_DIR


def read_pid(workdir: Path) -> int | None:
    """Pid of a live TorchServe started for this folder, or None: no pid file, or its process
    has exited or is not TorchServe (a stale file whose pid another program now has)."""
    import time

    import psutil

    # The JVM's main class, the argument TorchServe's own launcher looks for (ts.model_server).
    main_class = "org.pytorch.serve.ModelServer"
    pid_file = run_dir(workdir) / PID_FILE
    try:
        proc = psutil.Process(int(pid_file.read_text().split()[0]))
        # A process that has just exec'd can show an empty command line for a moment.
        for _ in range(20):
            cmdline = proc.cmdline()
            if cmdline or proc.status() == psutil.STATUS_ZOMBIE:
                break
            time.sleep(0.05)
        return proc.pid if main_class in cmdline else None
    except (OSError, ValueError, IndexError, psutil.Error):
        return None



ADDRESS_KEYS = {"inference_address": "http", "management_address": "http",
                "metrics_address": "http", "grpc_inference_port": "port",
                "grpc_management_port": "port"}


def moved_address(address: str, host: str, port: int | None = None) -> str:
    """A TorchServe ``scheme://host:port`` address on another host (and port, if given): the
    scheme, ``https`` included, and any path stay as written."""
    parts = urlsplit(address if "//" in address else f"http://{address}")
    port = parts.port if port is None else port
    netloc = f"[{host}]" if ":" in host else host
    return urlunsplit(parts._replace(netloc=f"{netloc}:{port}" if port else netloc))


def loopback_config(dest: str | Path, store: str | Path,
                    template: str | Path = "config.properties", **overrides: str) -> Path:
    """A copy of ``template`` at ``dest`` with every endpoint on a free loopback port, the model
    store ``store`` and any other ``key=value`` overrides: a private server beside the usual one
    (tests, benchmarks)."""
    ports = dict(zip(ADDRESS_KEYS, free_ports(len(ADDRESS_KEYS))))
    lines = []
    for line in Path(template).read_text().splitlines():
        key, _, value = (part.strip() for part in line.partition("="))
        if key in ports:
            kind = ADDRESS_KEYS[key]
            line = (f"{key}={moved_address(value, '127.0.0.1', ports[key])}" if kind == "http"
                    else f"{key}={ports[key]}")
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
# Behind the pod's authenticating proxy (deploy/kubernetes.yaml, flannel.handlers.proxy), the
# proxy owns the published ports 8080 and 7070, so TorchServe's inference moves to these ports,
# and every endpoint to the pod's loopback, which only the pod's own containers reach.
BEHIND_PROXY_PORTS = {"inference_address": 8180, "grpc_inference_port": 7170}
HTTP_ADDRESSES = ("inference_address", "management_address", "metrics_address")
GRPC_HOSTS = ("grpc_inference_address", "grpc_management_address")


def _behind_proxy_line(key: str, value: str) -> str | None:
    """The behind-the-proxy value of one config line, or None to keep it."""
    if key in HTTP_ADDRESSES:
        return moved_address(value, "127.0.0.1", BEHIND_PROXY_PORTS.get(key))
    if key in GRPC_HOSTS:
        return "127.0.0.1"
    if key in BEHIND_PROXY_PORTS:
        return str(BEHIND_PROXY_PORTS[key])
    if key == "disable_token_authorization":
        return "true"
    return None


def container_config(template: str | Path, dest: str | Path, *, behind_proxy: bool = False,
                     model_store: str | None = None) -> Path:
    """``template`` rewritten for a container.

    Standalone (the default): the inference addresses (HTTP and gRPC) on all of the container's
    interfaces, so that the runtime's port mapping reaches them; every other line, token
    authorization and the closed model API included, unchanged. ``behind_proxy``: every endpoint
    on loopback, inference on ``BEHIND_PROXY_PORTS``, and TorchServe's own token authorization
    off, because the proxy in front checks one key shared by every replica (TorchServe 0.12
    generates its keys at start and cannot be given them). Schemes (``https``) stay as written.

    Args:
        model_store: an absolute model store for a server whose working folder (where TorchServe
            writes its key file and logs) is not the folder holding the config.
    """
    note = ("every endpoint on loopback behind the pod's authenticating proxy, TorchServe's own "
            "token authorization off" if behind_proxy else
            "inference on the container's interfaces, management and metrics on its loopback")
    lines = [f"# Written by `flannel serve container-config` from {Path(template).name}: {note}."]
    seen = set()
    for line in Path(template).read_text().splitlines():
        key, _, value = (part.strip() for part in line.partition("="))
        seen.add(key)
        moved = _behind_proxy_line(key, value) if behind_proxy else None
        if moved is not None:
            line = f"{key}={moved}"
        elif not behind_proxy and CONTAINER_PUBLIC.get(key) == "http":
            line = f"{key}={moved_address(value, '0.0.0.0')}"
        elif not behind_proxy and CONTAINER_PUBLIC.get(key) == "host":
            line = f"{key}=0.0.0.0"
        elif key == "model_store" and model_store:
            line = f"model_store={model_store}"
        lines.append(line)
    if behind_proxy and "disable_token_authorization" not in seen:
        lines.append("disable_token_authorization=true")
    if model_store and "model_store" not in seen:
        lines.append(f"model_store={model_store}")
    Path(dest).write_text("\n".join(lines) + "\n")
    return Path(dest)
