"""ONNX export of a run folder: one valid self-contained file, spec names, dynamic batch, manifest.

    pytest tests/test_export_onnx.py -q
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from flannel.artifacts import (FP32, LEARNER, PARITY_BATCH_SIZES, ManifestError, read_manifest,
                               sha256_file, verify_manifest)
from flannel.checkpoint import load_checkpoint
from flannel.export import onnx_export
from flannel.export.answer_policy import PolicyConfig
from flannel.export.onnx_export import ExportError, check_onnx_file, export_onnx
from flannel.export.parity import run_parity
from flannel.export.sources import load_fitted, load_source
from flannel.graphs import learner_graph
from flannel.pins import reference_tensor, tensor_digest
from flannel.preprocess import PreprocessSpec, input_spec_for
from flannel.registry import ARCHITECTURES, get_arch

EXPECTED_FILES = {"model.onnx", "model.optimized.onnx", "input_spec.json", "index_to_name.json",
                  "reference_input.npy", "model.eager.pt", "manifest.json", "answer_policy.json",
                  "answer_report.md", "reliability.png", "ood_scores.png"}
# The tiny run's learner crops 64 from a 73-pixel square: the served input is 1 x 73 x 73.
SIDE = 73


def test_export_writes_one_valid_self_contained_onnx(exported_tiny_run):
    export_dir = exported_tiny_run / "export"
    assert {p.name for p in export_dir.iterdir()} - {"parity.json"} == EXPECTED_FILES
    model = check_onnx_file(export_dir / "model.onnx", LEARNER)  # full checker, no external data
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["logits", "probabilities", "ood_score"]
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")  # symbolic batch
    assert [d.dim_value for d in dims[1:]] == [1, SIDE, SIDE]  # the common served input
    for out in model.graph.output:
        out_dims = out.type.tensor_type.shape.dim
        want = [] if out.name == "ood_score" else [3]  # one score per image; 3 class columns
        assert out_dims[0].dim_param and [d.dim_value for d in out_dims[1:]] == want


def test_manifest_describes_the_run(exported_tiny_run):
    export_dir = exported_tiny_run / "export"
    manifest = verify_manifest(export_dir)
    ckpt = load_checkpoint(exported_tiny_run / "best.pt")
    assert manifest["model_name"] == "resnet18" and manifest["kind"] == "learner"
    assert manifest["class_names"] == ["COVID-19", "Normal", "Pneumonia"]
    assert manifest["graph"] == {"input_names": ["image"],
                                 "output_names": ["logits", "probabilities", "ood_score"],
                                 "decision_output": "probabilities", "input_dtype": "float32",
                                 "input_shape": ["batch", 1, SIDE, SIDE], "input_range": [0.0, 1.0]}
    served = input_spec_for([ckpt.preprocess])
    assert manifest["input"]["spec"] == served.to_dict()
    assert PreprocessSpec.load(export_dir / "input_spec.json") == served
    assert (manifest["precision"], manifest["runtime"], manifest["tolerance_profile"]) == (
        "fp32", "onnxruntime", "fp32")
    (member,) = manifest["members"]
    assert member["arch"] == member["name"] == "resnet18"
    assert member["checkpoint_sha256"] == sha256_file(exported_tiny_run / "best.pt")
    assert member["preprocess"] == ckpt.preprocess.to_dict()
    assert manifest["onnx"] == {"opset": 18, "exporter": "dynamo"}
    assert {"torch", "torchvision", "onnx", "onnxruntime", "onnxscript"} <= set(manifest["versions"])
    assert manifest["versions"]["onnxruntime"] == __import__("onnxruntime").__version__
    assert manifest["checkpoint_sha256"] == sha256_file(exported_tiny_run / "best.pt")
    assert set(manifest["artifacts"]) == {"onnx_fp32", "onnx_fp32_ort_optimized", "input_spec",
                                          "index_to_name", "reference_input", "eager_fp32",
                                          "answer_policy"}
    for entry in manifest["artifacts"].values():
        path = export_dir / entry["path"]
        assert entry["sha256"] == sha256_file(path)
        assert entry["bytes"] == path.stat().st_size
    assert manifest["artifacts"]["onnx_fp32"]["tolerance_profile"] == "fp32"
    assert json.loads((export_dir / "index_to_name.json").read_text()) == {
        "0": "COVID-19", "1": "Normal", "2": "Pneumonia"}
    pins = manifest["pins"]
    assert pins["flannel_version"] == __import__("flannel").__version__
    reference = np.load(export_dir / "reference_input.npy")
    assert reference.shape == (1, SIDE, SIDE) == tuple(pins["reference_tensor_shape"])
    assert pins["reference_tensor_sha256"] == tensor_digest(reference) == tensor_digest(
        reference_tensor(served))


@pytest.mark.parametrize("artifact", ["model.onnx", "model.optimized.onnx"])
def test_onnx_runs_at_batch_sizes_other_than_the_traced_one(exported_tiny_run, artifact):
    session = ort.InferenceSession(str(exported_tiny_run / "export" / artifact),
                                   providers=["CPUExecutionProvider"])
    # The checkpoint's network with what export fitted (temperature, OOD statistics).
    source = load_source(exported_tiny_run)
    load_fitted(source, exported_tiny_run / "export", read_manifest(exported_tiny_run / "export"))
    model = source.module
    assert float(model.calibration.scale[0]) != 1.0 and float(model.ood_scale) != 1.0
    generator = torch.Generator().manual_seed(1)
    for batch in PARITY_BATCH_SIZES:
        x = torch.rand(batch, 1, SIDE, SIDE, generator=generator)
        logits, probs, ood = session.run(["logits", "probabilities", "ood_score"],
                                         {"image": x.numpy()})
        assert logits.shape == probs.shape == (batch, 3) and ood.shape == (batch,)
        np.testing.assert_allclose(probs.sum(axis=1), np.ones(batch), atol=1e-6)
        with torch.no_grad():
            ref_logits, ref_probs, ref_ood = model(x)
        np.testing.assert_allclose(logits, ref_logits.numpy(), atol=FP32.atol, rtol=0)
        np.testing.assert_allclose(probs, ref_probs.numpy(), atol=FP32.atol, rtol=0)
        np.testing.assert_allclose(ood, ref_ood.numpy(), atol=FP32.atol, rtol=FP32.rtol)


def test_verify_manifest_rejects_a_modified_artifact(exported_run_dir):
    export_dir = exported_run_dir / "export"
    verify_manifest(export_dir)
    with (export_dir / "model.onnx").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ManifestError, match="'onnx_fp32'.*modified artifact"):
        verify_manifest(export_dir)


def test_verify_manifest_rejects_a_missing_artifact(exported_run_dir):
    (exported_run_dir / "export" / "index_to_name.json").unlink()
    with pytest.raises(ManifestError, match="'index_to_name' is missing"):
        verify_manifest(exported_run_dir / "export")


@pytest.mark.slow
def test_reexport_overwrites_only_export_artifacts(exported_run_dir):
    export_dir = exported_run_dir / "export"
    (export_dir / "parity.json").write_text('{"passed": true}')
    (export_dir / "notes.txt").write_text("kept")
    run_files = {p.name: p.read_bytes() for p in exported_run_dir.iterdir() if p.is_file()}
    onnx_sha = sha256_file(export_dir / "model.onnx")
    export_onnx(exported_run_dir)
    assert {p.name: p.read_bytes() for p in exported_run_dir.iterdir() if p.is_file()} == run_files
    assert (export_dir / "notes.txt").read_text() == "kept"
    # The old parity report vouched for the previous graph; the new manifest has no verdict yet.
    assert not (export_dir / "parity.json").exists()
    assert "parity" not in read_manifest(export_dir)
    # Same checkpoint, same exporter: byte-identical graph.
    assert sha256_file(export_dir / "model.onnx") == onnx_sha


@pytest.mark.slow
def test_dynamo_failure_falls_back_to_torchscript(tiny_run_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator for this test")
    monkeypatch.setattr(onnx_export, "_export_dynamo", broken)
    export_dir = export_onnx(tiny_run_dir)
    info = read_manifest(export_dir)["onnx"]
    assert info["exporter"] == "torchscript"
    assert info["dynamo_error"] == "RuntimeError: unsupported operator for this test"
    check_onnx_file(export_dir / "model.onnx", LEARNER)
    assert run_parity(tiny_run_dir).passed


def test_check_onnx_file_rejects_external_data_and_wrong_names(exported_tiny_run, tmp_path):
    model = onnx.load(str(exported_tiny_run / "export" / "model.onnx"))
    split = tmp_path / "split.onnx"
    onnx.save_model(model, str(split), save_as_external_data=True, location="split.onnx.data",
                    size_threshold=1024)
    with pytest.raises(ExportError, match="external data"):
        check_onnx_file(split, LEARNER)
    model = onnx.load(str(exported_tiny_run / "export" / "model.onnx"))
    model.graph.input[0].name = "pixels"
    for node in model.graph.node:
        node.input[:] = ["pixels" if name == "image" else name for name in node.input]
    renamed = tmp_path / "renamed.onnx"
    onnx.save_model(model, str(renamed))
    with pytest.raises(ExportError, match=r"inputs \('pixels',\)"):
        check_onnx_file(renamed, LEARNER)


def test_export_refuses_old_opsets_and_missing_checkpoints(tiny_run_dir):
    with pytest.raises(ValueError, match="opset 17"):
        export_onnx(tiny_run_dir, opset=17)
    with pytest.raises(FileNotFoundError, match="last.pt"):
        export_onnx(tiny_run_dir, checkpoint="last.pt")
    assert not (tiny_run_dir / "export").exists()


def _not_in_the_paper_preset() -> list[str]:
    from flannel.train.ensemble import PRESETS

    return sorted(set(ARCHITECTURES) - set(PRESETS["paper"]))


@pytest.mark.slow
@pytest.mark.parametrize("arch", _not_in_the_paper_preset())
def test_every_registry_architecture_exports_and_passes_parity(tiny_run_factory, arch):
    """The guard: a new registry entry that does not export, or drifts, fails here. The paper
    preset's five are exported, each as a member, and held to parity by
    ``test_ensemble.py::test_paper_preset_builds_exports_and_passes_parity_at_a_tiny_size``."""
    run_dir = tiny_run_factory(arch, crop=max(64, get_arch(arch).min_size))
    # The answer policy is fitted (its OOD statistics read this architecture's features); the
    # generated OOD sets' figures are tested once, on the resnet18 run.
    export_dir = export_onnx(run_dir, policy=PolicyConfig(ood_sets=False))
    assert read_manifest(export_dir)["onnx"]["exporter"] == "dynamo"
    assert read_manifest(export_dir)["answer_policy"]["temperature"] > 0
    report = run_parity(run_dir)
    print(f"{arch}: max abs diff {report.max_abs_diff:.3g}")
    assert report.passed
    probabilities = [c for c in report.checks if c.output == "probabilities"]
    assert probabilities and all(c.argmax_agreement == 1.0 for c in probabilities)
    assert max(c.max_abs_diff for c in probabilities) <= FP32.atol
