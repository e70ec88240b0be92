"""Compiled PyTorch backends (AOTInductor): bf16 with channels_last where the CPU has native bf16,
fp32 anywhere; each gated on the validation split and served without the training code."""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
import yaml

from flannel import hardware
from flannel.artifacts import AOTI_BF16, AOTI_FP32, read_manifest, verify_manifest
from flannel.export.compiled import CompiledError, export_compiled
from flannel.export.parity import run_parity
from flannel.handlers.archive import ArchiveError, ArchiveSettings, build_archive
from flannel.backends import BackendError, backend_spec, check_entry_host, make_session
from flannel.handlers.serving import load_served_model

pytestmark = pytest.mark.slow
AVX2_ONLY = frozenset({"avx", "avx2", "fma"})
NO_BF16 = hardware.bf16_problem()


@pytest.fixture(scope="module")
def compiled_fp32(exported_tiny_run, tmp_path_factory):
    """A copy of the exported tiny run with a torch-fp32 package of max batch 4."""
    import shutil
    run = shutil.copytree(exported_tiny_run, tmp_path_factory.mktemp("aoti") / "run")
    gate = export_compiled(run, "fp32", max_batch=4)
    return run, gate


def _val_batch(run, n=6):
    from flannel.data.records import read_manifest as read_split
    from flannel.preprocess import PreprocessSpec, load_tensor

    export = run / "export"
    manifest = read_manifest(export)
    spec = PreprocessSpec.load(export / "input_spec.json")
    rows = read_split(manifest["split_manifest"], split="val")
    return np.stack([load_tensor(r.path, spec).numpy() for r in rows][:n])


def test_fp32_package_passes_its_gate_and_is_recorded(compiled_fp32):
    run, gate = compiled_fp32
    manifest = verify_manifest(run / "export")
    entry = manifest["artifacts"][AOTI_FP32]
    assert entry["backend"] == "torch-fp32" and entry["runtime"] == "aotinductor"
    assert entry["precision"] == "fp32" and entry["tolerance_profile"] == "fp32"
    assert entry["gate"] == gate and gate["passed"] and gate["argmax_agreement"] == 1.0
    assert gate["max_abs_diff"] <= 1e-4 and gate["images"] == 6 and gate["split"] == "val"
    assert entry["max_batch"] == 4 and entry["torch_version"] and entry["requires_cpu_flags"] == []
    isa, flags = hardware.compiled_isa()
    assert (entry["vec_isa"], entry["isa_cpu_flags"]) == (isa, flags)
    assert not hardware.missing_cpu_flags(entry["isa_cpu_flags"])  # compiled for this CPU
    report = json.loads((run / "export" / "aoti_fp32_gate.json").read_text())
    assert report["gate"] == gate and report["compile_seconds"] > 0


def test_served_package_matches_onnx_runtime_and_slices_big_batches(compiled_fp32):
    run, _ = compiled_fp32
    export = run / "export"
    served = load_served_model(export, {"backend": "torch-fp32", "intra_op_threads": 1})
    assert served.backend.name == "torch-fp32" and served.backend.max_batch == 4
    x = _val_batch(run)  # 6 images: one call of 4, then one of 2
    got = served.backend.run(x)["probabilities"]
    want = make_session(export / "model.onnx", 1).run(["probabilities"], {"image": x})[0]
    assert got.shape == (6, 3)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_the_package_loads_with_torch_alone(compiled_fp32):
    """The handler needs torch, not the training code: a fresh interpreter that cannot import
    flannel.train or torchvision still loads and runs the package."""
    run, _ = compiled_fp32
    package = run / "export" / read_manifest(run / "export")["artifacts"][AOTI_FP32]["path"]
    code = ("import sys; sys.modules['torchvision'] = None; sys.modules['flannel.train'] = None\n"
            "import torch\n"
            f"runner = torch._inductor.aoti_load_package({str(package)!r})\n"
            "out = runner(torch.rand(3, 1, 73, 73))\n"
            "print(tuple(out[1].shape), float(out[1].sum()))")
    side = json.loads((run / "export" / "input_spec.json").read_text())["resize"]
    done = subprocess.run([sys.executable, "-c", code.replace("73", str(side))],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    shape, total = done.stdout.split(")")[0] + ")", float(done.stdout.split()[-1])
    assert shape == "(3, 3)" and abs(total - 3.0) < 1e-4


def test_bf16_is_refused_on_a_cpu_without_native_bf16(exported_run_dir, monkeypatch):
    with pytest.raises(CompiledError, match="no native bf16 .*13-18x slower") as err:
        export_compiled(exported_run_dir, "bf16", flags=AVX2_ONLY)
    assert "\n" not in str(err.value)
    assert not (exported_run_dir / "export" / "model.bf16.pt2").exists()
    # the CLI says it in one line, exit status 2
    monkeypatch.setattr(hardware, "cpu_flags", lambda: AVX2_ONLY)
    from flannel.cli import main
    assert main(["export", "compiled", str(exported_run_dir)]) == 2
    # and the archive refuses the backend on such a host, naming why
    run_parity(exported_run_dir)
    with pytest.raises(ArchiveError, match="torch-bf16: this CPU .* has no native bf16"):
        build_archive(exported_run_dir, exported_run_dir / "store",
                      settings=ArchiveSettings(backend="torch-bf16"))


AVX512_PACKAGE = {"vec_isa": "avx512", "built_on_cpu": "Intel(R) Xeon(R) Processor",
                  "isa_cpu_flags": ["avx512bw", "avx512dq", "avx512f", "avx512vl", "fma"]}


def test_a_package_compiled_for_instructions_this_cpu_lacks_is_refused_in_one_line():
    spec = backend_spec("torch-fp32")
    with pytest.raises(BackendError) as info:
        check_entry_host(spec, {**AVX512_PACKAGE, "torch_version": torch.__version__},
                         flags=AVX2_ONLY)
    message = str(info.value)
    assert "\n" not in message and "compiled for avx512 on Intel(R) Xeon(R) Processor" in message
    lacking = message.split(" lacks ")[1].split(" and would")[0]
    assert lacking == "avx512bw, avx512dq, avx512f, avx512vl"  # fma it has
    check_entry_host(spec, {**AVX512_PACKAGE, "torch_version": torch.__version__},
                     flags=AVX2_ONLY | {"avx512bw", "avx512dq", "avx512f", "avx512vl"})


def test_an_avx512_package_is_refused_at_archive_time_and_at_load_on_an_avx2_host(
        compiled_fp32, tmp_path, monkeypatch):
    """The package this host compiled, on a host whose CPU is faked to AVX2 only: the archive
    and the served load both refuse it by name, before any kernel runs."""
    run, _ = compiled_fp32
    export = run / "export"
    required = verify_manifest(export)["artifacts"][AOTI_FP32]["isa_cpu_flags"]
    if not hardware.missing_cpu_flags(required, AVX2_ONLY):
        pytest.skip(f"this host compiles for {required}, which an AVX2 CPU has")
    run_parity(run)  # the archive's other precondition, so that only the CPU can refuse it
    monkeypatch.setattr(hardware, "cpu_flags", lambda: AVX2_ONLY)
    refusal = "refusing to archive .* for torch-fp32: the package was compiled for avx512.* lacks "
    with pytest.raises(ArchiveError, match=refusal + ".*avx512f"):
        build_archive(run, tmp_path / "store", settings=ArchiveSettings(backend="torch-fp32"))
    with pytest.raises(BackendError, match="would stop on an illegal instruction"):
        load_served_model(export, {"backend": "torch-fp32", "intra_op_threads": 1})


def test_a_package_from_another_torch_is_refused_in_one_line():
    spec = backend_spec("torch-fp32")
    with pytest.raises(BackendError, match="compiled with torch 0.0.1, this host has"):
        check_entry_host(spec, {"torch_version": "0.0.1"})


@pytest.mark.skipif(NO_BF16 is not None, reason=f"bf16 backend: {NO_BF16}")
def test_bf16_package_is_gated_archived_and_served(exported_run_dir, tmp_path):
    gate = export_compiled(exported_run_dir, "bf16", max_batch=8)
    entry = verify_manifest(exported_run_dir / "export")["artifacts"][AOTI_BF16]
    assert entry["precision"] == "bf16" and entry["tolerance_profile"] == "bf16"
    assert entry["channels_last"] is True and "amx_bf16" in entry["requires_cpu_flags"]
    assert gate["min_argmax_agreement"] == 0.99 and gate["atol"] == 0.1
    assert gate["passed"] == (gate["argmax_agreement"] >= 0.99 and gate["max_abs_diff"] <= 0.1)
    assert gate["passed"], gate["failures"]
    run_parity(exported_run_dir)
    mar = build_archive(exported_run_dir, tmp_path / "store",
                        settings=ArchiveSettings(backend="torch-bf16"))
    with zipfile.ZipFile(mar) as zf:
        assert yaml.safe_load(zf.read("model-config.yaml"))["handler"]["backend"] == "torch-bf16"
        assert "model.bf16.pt2" in zf.namelist() and "model.onnx" not in zf.namelist()
    served = load_served_model(exported_run_dir / "export", {"backend": "torch-bf16",
                                                             "intra_op_threads": 1})
    x = _val_batch(exported_run_dir)
    got = served.backend.run(x)["probabilities"]
    want = make_session(exported_run_dir / "export" / "model.onnx", 1).run(
        ["probabilities"], {"image": x})[0]
    assert np.abs(got - want).max() <= 0.1 and got.dtype == np.float32
