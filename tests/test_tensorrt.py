"""TensorRT and the CUDA provider: everything up to the engine build runs on any host; the build,
its gate and serving run where an NVIDIA GPU is, and skip with the reason elsewhere."""
from __future__ import annotations

import types

import numpy as np
import onnx
import pytest

from flannel import hardware
from flannel.artifacts import LEARNER, ONNX_FP16, verify_manifest
from flannel.export.tensorrt import (TensorRtError, configure_builder, engine_config,
                                     export_fp16_graph, export_tensorrt, network_flags)
from flannel.backends import BACKENDS, BackendError

NO_GPU = hardware.cuda_problem()
NO_TENSORRT = BACKENDS["tensorrt-fp16"].host_problem()


def test_engine_profile_spans_batch_one_to_the_maximum():
    cfg = engine_config(LEARNER, 64, "fp16", max_batch=32)
    assert cfg.profile_shapes() == ((1, 1, 64, 64), (8, 1, 64, 64), (32, 1, 64, 64))
    assert cfg.input_name == "image" and cfg.workspace_bytes == 2 << 30
    small = engine_config(LEARNER, 64, "fp32", max_batch=4)
    assert small.profile_shapes()[1] == (4, 1, 64, 64)  # opt never above max
    assert small.to_dict()["profile"]["max"] == (4, 1, 64, 64)
    with pytest.raises(TensorRtError, match="--max-batch must be at least 1"):
        engine_config(LEARNER, 64, "fp16", max_batch=0)
    with pytest.raises(TensorRtError, match="precision 'int4'"):
        engine_config(LEARNER, 64, "int4")


class _Recorder:
    """Stands in for the tensorrt module's builder objects, recording what they are told."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def call(*args):
            self.calls.append((name, args))
            return self
        return call


def _fake_trt(with_tf32: bool, strongly_typed: int | None):
    flags = types.SimpleNamespace(**({"TF32": "TF32"} if with_tf32 else {}))
    creation = types.SimpleNamespace(**({} if strongly_typed is None
                                        else {"STRONGLY_TYPED": strongly_typed}))
    return types.SimpleNamespace(BuilderFlag=flags, NetworkDefinitionCreationFlag=creation,
                                 MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"))


def test_builder_gets_workspace_one_profile_and_no_tf32_for_fp32():
    builder = _Recorder()
    cfg = engine_config(LEARNER, 64, "fp32", max_batch=16)
    configure_builder(_fake_trt(True, None), builder, cfg)
    names = [c[0] for c in builder.calls]
    assert ("set_memory_pool_limit", ("WORKSPACE", 2 << 30)) in builder.calls
    assert ("clear_flag", ("TF32",)) in builder.calls
    assert ("set_shape", ("image", (1, 1, 64, 64), (8, 1, 64, 64), (16, 1, 64, 64))) \
        in builder.calls
    assert names.count("add_optimization_profile") == 1
    fp16 = _Recorder()
    configure_builder(_fake_trt(True, None), fp16, engine_config(LEARNER, 64, "fp16"))
    assert "clear_flag" not in [c[0] for c in fp16.calls]  # precision comes from the graph
    assert network_flags(_fake_trt(False, 1)) == 2 and network_flags(_fake_trt(False, None)) == 0


def test_engine_manifest_entry_records_profile_source_and_host():
    from flannel.export.tensorrt import TARGETS, engine_entry_fields
    from flannel.backends.tensorrt import check_engine_host

    cfg = engine_config(LEARNER, 64, "fp16", max_batch=16)
    host = {"gpu": "NVIDIA H200", "compute_capability": "9.0", "tensorrt_version": "11.4.0.106"}
    fields = engine_entry_fields(cfg, TARGETS["fp16"], host)
    assert fields["max_batch"] == 16 and fields["built_from"] == "onnx_fp16"
    assert fields["builder"]["profile"] == {"min": (1, 1, 64, 64), "opt": (8, 1, 64, 64),
                                            "max": (16, 1, 64, 64)}
    assert TARGETS["fp32"].source == "onnx_fp32"  # the plain graph, never the ORT-optimised copy
    check_engine_host("tensorrt-fp16", fields, capability=(9, 0), trt_version="11.4.0.106")
    with pytest.raises(TensorRtError, match="compute_capability"):
        engine_entry_fields(cfg, TARGETS["fp16"], {"gpu": "x", "tensorrt_version": "1"})


@pytest.mark.slow
def test_fp16_graph_is_built_and_gated_without_a_gpu(exported_run_dir):
    """The engine's fp16 source: learners' convolutions in fp16, fp32 in and out, gated on CPU."""
    gate = export_fp16_graph(exported_run_dir)
    export = exported_run_dir / "export"
    entry = verify_manifest(export)["artifacts"][ONNX_FP16]
    assert entry["precision"] == "fp16" and entry["tolerance_profile"] == "fp16"
    assert entry["gate"] == gate and gate["images"] == 6
    assert gate["passed"] == (gate["argmax_agreement"] >= 0.99 and gate["max_abs_diff"] <= 1e-2)
    assert gate["passed"], gate["failures"]
    model = onnx.load(str(export / entry["path"]))
    fp16 = onnx.TensorProto.FLOAT16
    weights = {i.name: i.data_type for i in model.graph.initializer}
    conv_weights = [n.input[1] for n in model.graph.node if n.op_type == "Conv"]
    assert conv_weights and all(weights.get(w) == fp16 for w in conv_weights if w in weights)
    io = [*model.graph.input, *model.graph.output]
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in io)


@pytest.mark.skipif(NO_GPU is None, reason="this host has a GPU: the no-GPU message is not shown")
def test_without_a_gpu_tensorrt_and_cuda_stop_with_one_line(exported_run_dir, capsys):
    before = sorted(p.name for p in (exported_run_dir / "export").iterdir())
    with pytest.raises(TensorRtError, match="tensorrt-fp16 not built: no NVIDIA GPU") as err:
        export_tensorrt(exported_run_dir)
    assert "\n" not in str(err.value)
    from flannel.cli import main
    assert main(["export", "tensorrt", str(exported_run_dir), "--precision", "fp32"]) == 2
    assert main(["export", "cuda", str(exported_run_dir)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "tensorrt-fp32 not built" in lines[0] and "ort-cuda" in lines[1]
    assert sorted(p.name for p in (exported_run_dir / "export").iterdir()) == before


def test_an_engine_runs_only_where_it_was_built():
    from flannel.backends.tensorrt import check_engine_host
    entry = {"compute_capability": "9.0", "gpu": "NVIDIA H200", "tensorrt_version": "11.4.0.106"}
    check_engine_host("tensorrt-fp16", entry, capability=(9, 0), trt_version="11.4.0.106")
    with pytest.raises(BackendError, match="built for compute capability 9.0 .*GPU 0 here is 8.6"):
        check_engine_host("tensorrt-fp16", entry, capability=(8, 6), trt_version="11.4.0.106")
    with pytest.raises(BackendError, match="built with TensorRT 11.4.0.106, this host has 10.1"):
        check_engine_host("tensorrt-fp16", entry, capability=(9, 0), trt_version="10.1")


def test_gpu_backends_are_archived_for_gpu_workers():
    from flannel.handlers.archive import ArchiveSettings
    assert ArchiveSettings(backend="tensorrt-fp16").model_config()["deviceType"] == "gpu"
    assert ArchiveSettings(backend="ort-cuda").model_config()["deviceType"] == "gpu"
    assert ArchiveSettings(backend="torch-bf16").model_config()["deviceType"] == "cpu"


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(NO_TENSORRT is not None, reason=f"TensorRT: {NO_TENSORRT}")
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_engine_is_built_gated_and_served_on_the_gpu(exported_run_dir, precision):
    from flannel.handlers.serving import load_served_model
    gate = export_tensorrt(exported_run_dir, precision, max_batch=8)
    assert gate["passed"], gate["failures"]
    entry = verify_manifest(exported_run_dir / "export")["artifacts"][f"tensorrt_{precision}"]
    assert entry["compute_capability"] and entry["builder"]["profile"]["max"][0] == 8
    served = load_served_model(exported_run_dir / "export", {"backend": f"tensorrt-{precision}"})
    side = served.spec.resize
    x = np.random.default_rng(0).random((11, 1, side, side), dtype=np.float32)  # 8 + 3
    probs = served.backend.run(x)["probabilities"]
    assert probs.shape == (11, 3) and np.allclose(probs.sum(1), 1, atol=1e-3)
    assert entry["backend"] == f"tensorrt-{precision}" and entry["gate"] == gate


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(BACKENDS["ort-cuda"].host_problem() is not None,
                    reason=f"ort-cuda: {BACKENDS['ort-cuda'].host_problem()}")
def test_cuda_provider_is_gated_on_the_gpu(exported_run_dir):
    from flannel.export.cuda import export_cuda
    gate = export_cuda(exported_run_dir)
    assert gate["passed"], gate["failures"]
    assert verify_manifest(exported_run_dir / "export")["artifacts"]["onnx_fp32_cuda"]["gpu"]
