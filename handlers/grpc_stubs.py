"""Python gRPC stubs for TorchServe, generated at first use from the protos inside its wheel.

    python -m flannel.handlers.grpc_stubs      # generates (if needed) and prints the cache folder

TorchServe ships ``inference.proto`` and ``management.proto`` inside ``ts/frontend/model-server.jar``
(a zip). They are extracted from the installed wheel and compiled with ``grpc_tools.protoc`` into a
cache folder keyed by the TorchServe version, so the stubs always match the server and no proto
code lives in this repository. ``FLANNEL_GRPC_CACHE`` overrides the cache root.
"""
from __future__ import annotations

import importlib
import os
import sys
import tempfile
import zipfile
from pathlib import Path
from types import ModuleType

CACHE_ENV = "FLANNEL_GRPC_CACHE"
DEFAULT_CACHE_ROOT = Path.home() / ".cache" / "flannel" / "grpc"
# open_inference_grpc.proto is the Open Inference Protocol (KServe v2) service, served on the
# inference port when config.properties sets ts_open_inference_protocol=true.
PROTOS = ("inference.proto", "management.proto", "open_inference_grpc.proto")
# inference.proto imports google.rpc.Status; its proto ships in the jar too, and compiling it here
# avoids a dependency on googleapis-common-protos.
DEPENDENCY_PROTOS = ("google/rpc/status.proto",)
# The modules protoc writes for PROTOS (message classes and service stubs); google/rpc/status_pb2
# lands beside them and joins the ``google`` namespace package.
MODULES = ("inference_pb2", "inference_pb2_grpc", "management_pb2", "management_pb2_grpc",
           "open_inference_grpc_pb2", "open_inference_grpc_pb2_grpc")


class StubError(RuntimeError):
    """The protos cannot be found in the TorchServe wheel or protoc failed."""


def torchserve_jar() -> Path:
    """Path of ``model-server.jar`` in the installed torchserve package."""
    import ts

    jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
    if not jar.is_file():
        raise StubError(f"{jar} not found: is torchserve installed?")
    return jar


def torchserve_version() -> str:
    from ts.version import __version__

    return str(__version__)


def cache_dir() -> Path:
    """Folder holding the generated stubs for the installed TorchServe and protobuf versions.

    Generated code is checked against the protobuf runtime at import, so both versions key it,
    and so does the list of protos (a cache made for fewer protos is never reused).
    """
    import hashlib

    from google.protobuf import __version__ as protobuf_version

    root = Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_ROOT)
    protos = hashlib.sha256(" ".join(PROTOS + DEPENDENCY_PROTOS).encode()).hexdigest()[:8]
    return root / torchserve_version() / f"protobuf-{protobuf_version}-{protos}"


def _extract_protos(jar: Path, dest: Path) -> None:
    with zipfile.ZipFile(jar) as zf:
        names = set(zf.namelist())
        for proto in PROTOS:
            member = proto if proto in names else f"proto/{proto}"
            if member not in names:
                raise StubError(f"{proto} is not inside {jar}")
            (dest / proto).write_bytes(zf.read(member))
        for proto in DEPENDENCY_PROTOS:
            if proto not in names:
                raise StubError(f"{proto} is not inside {jar}")
            (dest / proto).parent.mkdir(parents=True, exist_ok=True)
            (dest / proto).write_bytes(zf.read(proto))


def _compile(proto_dir: Path, out_dir: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    # google/protobuf/*.proto (imported by status.proto and inference.proto) ship with grpc_tools.
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = ["grpc_tools.protoc", f"-I{proto_dir}", f"-I{well_known}",
            f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
            *(str(proto_dir / p) for p in PROTOS + DEPENDENCY_PROTOS)]
    if protoc.main(args) != 0:
        raise StubError(f"protoc failed on {PROTOS} (command: {' '.join(args)})")


def ensure_stubs() -> Path:
    """Generate the stubs into the cache folder unless they are already there.

    Returns:
        The cache folder (it is put on ``sys.path``).
    """
    out = cache_dir()
    wanted = [out / f"{m}.py" for m in MODULES] + [out / "google" / "rpc" / "status_pb2.py"]
    if not all(p.is_file() for p in wanted):
        out.parent.mkdir(parents=True, exist_ok=True)
        # Build in a sibling temp folder and rename, so a concurrent reader never sees half.
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            tmp = Path(tmp)
            (tmp / "protos").mkdir()
            (tmp / "stubs").mkdir()
            _extract_protos(torchserve_jar(), tmp / "protos")
            _compile(tmp / "protos", tmp / "stubs")
            try:
                (tmp / "stubs").rename(out)
            except OSError:
                if not out.is_dir():
                    raise
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    return out


def load_stubs() -> dict[str, ModuleType]:
    """Import the generated modules, generating them first if needed.

    Returns:
        {"inference_pb2": ..., "inference_pb2_grpc": ..., "management_pb2": ...,
        "management_pb2_grpc": ..., "open_inference_grpc_pb2": ...,
        "open_inference_grpc_pb2_grpc": ...}
    """
    ensure_stubs()
    return {name: importlib.import_module(name) for name in MODULES}


if __name__ == "__main__":
    print(ensure_stubs())
