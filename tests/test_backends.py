"""The backend table: one entry per backend carries its loader, exporter, gate profile and host
checks, and everything else (demo, archive, serving) reads it."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from flannel import backends
from flannel.artifacts import FP32, ONNX_FP32
from flannel.backends import BACKENDS, BackendError, BackendSpec, check_entry_host, worth_building
from flannel.backends.tensorrt import engine_problem

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
AMX = AVX2 | {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}


def test_every_entry_names_a_loader_an_artifact_and_a_gate_profile():
    for spec in BACKENDS.values():
        assert callable(spec.loader) and spec.artifact and spec.tolerance.name
        assert (spec.exporter is None) == (spec.name == "ort-fp32")  # the reference graph
    assert BACKENDS["ort-int8"].tolerance.name == "int8"
    assert BACKENDS["torch-bf16"].tolerance.name == "bf16"


def test_an_avx2_cpu_builds_int8_and_says_why_each_other_backend_is_left_out():
    build, skipped = worth_building(AVX2)
    names = [s.name for s in build]
    assert "ort-int8" in names and "torch-bf16" not in names and "torch-fp32" not in names
    why = {line.split(" not built: ")[0]: line for line in skipped}
    assert "no native bf16" in why["torch-bf16"] and "lost to ort-fp32" in why["torch-fp32"]
    assert all("\n" not in line for line in skipped)


def test_an_amx_cpu_builds_int8_and_compiled_bf16():
    names = [s.name for s in worth_building(AMX)[0]]
    assert names[:2] == ["ort-int8", "torch-bf16"]


def test_a_new_backend_is_one_entry(monkeypatch, tmp_path):
    """Registered once, it is exported by the demo's loop, loaded by name, and host-checked."""
    module = types.ModuleType("flannel_test_backend")
    calls = []

    def export(run_dir, **kwargs):
        calls.append((run_dir, kwargs))
        return {"passed": True}

    class Doubling:
        name = "doubling"

        def run(self, batch):
            return {"probabilities": batch * 2}

    module.export = export
    monkeypatch.setitem(sys.modules, "flannel_test_backend", module)
    spec = BackendSpec("doubling", ONNX_FP32, "fp32", "test", FP32,
                       loader=lambda *a: Doubling(), export_command="doubling",
                       exporter="flannel_test_backend:export", export_kwargs={"level": 2},
                       entry_problem=lambda spec, entry, flags, device_id:
                       None if entry.get("ok") else "the artifact was built elsewhere")
    monkeypatch.setitem(BACKENDS, "doubling", spec)
    assert "doubling" in [s.name for s in worth_building(AVX2)[0]]
    assert backends.backend_spec("doubling").export(tmp_path) == {"passed": True}
    assert calls == [(tmp_path, {"level": 2})]
    manifest = {"artifacts": {ONNX_FP32: {"ok": True}}}
    engine = backends.load_backend(spec, tmp_path, manifest, None, 1,
                                   output_names=["probabilities"], read=lambda key: b"")
    assert engine.run(np.ones(2))["probabilities"].tolist() == [2, 2]
    with pytest.raises(BackendError, match="backend doubling: the artifact was built elsewhere"):
        check_entry_host(spec, {})


def test_an_engine_is_checked_against_the_gpu_it_will_run_on(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: {0: (9, 0), 1: (8, 6)}[i])
    entry = {"compute_capability": "9.0", "gpu": "NVIDIA H200", "tensorrt_version": "11"}
    assert engine_problem("tensorrt-fp16", entry, trt_version="11", device_id=0) is None
    problem = engine_problem("tensorrt-fp16", entry, trt_version="11", device_id=1)
    assert "built for compute capability 9.0" in problem and "GPU 1 here is 8.6" in problem


def test_an_int8_graph_gated_with_vnni_is_refused_where_its_sums_can_saturate():
    spec = BACKENDS["ort-int8"]
    eight_bit = {"built_on_cpu": "Intel(R) Xeon(R) Processor",
                 "quantization": {"reduce_range": False}}
    check_entry_host(spec, eight_bit, flags=AMX)
    with pytest.raises(BackendError) as err:
        check_entry_host(spec, eight_bit, flags=AVX2)
    assert "8-bit weights" in str(err.value) and "flannel export int8" in str(err.value)
    assert "\n" not in str(err.value)
    check_entry_host(spec, {"quantization": {"reduce_range": True}}, flags=AVX2)  # 7-bit
