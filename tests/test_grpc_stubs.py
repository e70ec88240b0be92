"""gRPC stubs are generated from the installed TorchServe wheel's protos, cached and importable.

    .venv/bin/pytest tests/test_grpc_stubs.py -q
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from flannel.handlers import grpc_stubs


def test_generates_imports_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv(grpc_stubs.CACHE_ENV, str(tmp_path))
    out = grpc_stubs.ensure_stubs()
    assert out.parent.name == grpc_stubs.torchserve_version() and out.is_relative_to(tmp_path)
    assert {p.name for p in out.glob("*.py")} == {f"{m}.py" for m in grpc_stubs.MODULES}
    stamp = {p: p.stat().st_mtime_ns for p in out.glob("*.py")}
    assert grpc_stubs.ensure_stubs() == out
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.py")} == stamp  # second call reuses
    mods = grpc_stubs.load_stubs()
    assert hasattr(mods["inference_pb2_grpc"], "InferenceAPIsServiceStub")
    assert hasattr(mods["management_pb2_grpc"], "ManagementAPIsServiceStub")
    assert hasattr(mods["open_inference_grpc_pb2_grpc"], "GRPCInferenceServiceStub")
    request = mods["inference_pb2"].PredictionsRequest(model_name="m", input={"data": b"\x89PNG"})
    parsed = mods["inference_pb2"].PredictionsRequest.FromString(request.SerializeToString())
    assert parsed.model_name == "m" and parsed.input["data"] == b"\x89PNG"


def test_protos_come_from_the_wheel_not_the_repo():
    assert grpc_stubs.torchserve_jar().name == "model-server.jar"
    repo = Path(__file__).resolve().parents[1]
    # Tracked or untracked-but-not-ignored: neither protos nor generated code live in the repo.
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                             "*.proto", "*_pb2.py", "*_pb2_grpc.py"], cwd=repo,
                            capture_output=True, text=True, check=True).stdout
    assert listed == ""
