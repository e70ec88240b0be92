"""The two locked dependency sets: the CPU set (requirements.lock) and the GPU set
(requirements-gpu.lock), which differ only in their ONNX runtime and TensorRT."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CPU_LOCK, GPU_LOCK = REPO / "requirements.lock", REPO / "requirements-gpu.lock"
# Packages that both sets must hold, at one version.
CORE = ("torch", "torchvision", "numpy", "onnx", "onnxscript", "torchserve", "pillow",
        "opencv-python-headless", "pytest")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """Package -> pinned version of a `uv pip compile` output."""
    pins = {}
    for line in path.read_text().splitlines():
        requirement = line.split("#", 1)[0].split(";", 1)[0].strip()
        if not requirement:
            continue
        name, pinned, version = requirement.partition("==")
        assert pinned, f"{path.name}: {requirement!r} is not pinned"
        pins[canonical(name.strip())] = version.strip()
    return pins


@pytest.fixture(scope="module")
def locks() -> tuple[dict[str, str], dict[str, str]]:
    return read_lock(CPU_LOCK), read_lock(GPU_LOCK)


def test_cpu_set_has_onnxruntime_and_no_gpu_package(locks):
    cpu, _ = locks
    assert "onnxruntime" in cpu
    assert not {n for n in cpu if n == "onnxruntime-gpu" or n.startswith("tensorrt")}


def test_gpu_set_has_onnxruntime_gpu_and_tensorrt_and_not_onnxruntime(locks):
    _, gpu = locks
    assert "onnxruntime-gpu" in gpu and "tensorrt" in gpu
    assert "onnxruntime" not in gpu


def test_both_sets_pin_every_shared_package_alike(locks):
    cpu, gpu = locks
    shared = cpu.keys() & gpu.keys()
    assert set(CORE) <= shared, set(CORE) - shared
    assert {n: (cpu[n], gpu[n]) for n in shared if cpu[n] != gpu[n]} == {}
    assert cpu.keys() - shared == {"onnxruntime"}
    assert gpu.keys() - shared == {"onnxruntime-gpu"} | {n for n in gpu if n.startswith("tensorrt")}


def test_the_locks_hold_pyprojects_pins_and_make_lock_writes_them(locks):
    cpu, gpu = locks
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert not any(canonical(d.split("==")[0]).startswith("onnxruntime")
                   for d in project["dependencies"])  # only the extras name a runtime
    for extra, lock in (("cpu", cpu), ("gpu", gpu)):
        for requirement in extras[extra]:
            name, _, version = requirement.partition("==")
            assert lock[canonical(name)] == version, (extra, name)
    makefile = (REPO / "Makefile").read_text().replace("\\\n\t\t", "")
    for path in (CPU_LOCK, GPU_LOCK):
        command = path.read_text().splitlines()[1].strip("# ").replace("uv pip", "$(BIN)/uv pip")
        assert command in makefile, f"{path.name} was not written by `make lock`: {command}"
