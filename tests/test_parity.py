"""The parity gate: passes on a faithful export, and fails, with the right typed error, on a
perturbed graph (values), a permuted head (decisions), a renamed output (names) and a modified
artifact (manifest).

    pytest tests/test_parity.py -q
"""
from __future__ import annotations

import collections
import dataclasses
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from flannel.cli import main
from flannel.data.records import read_manifest as read_split_manifest
from flannel.data.records import write_manifest as write_split_manifest
from flannel.artifacts import (FP32, LEARNER, ManifestError, artifact_entry, read_manifest,
                               verify_manifest, write_manifest)
from flannel.export.parity import (PREPROCESS_CHECK, DecisionMismatch, OutputNameMismatch,
                                   ParityCheck, ParityError, ParityReport, ShapeMismatch,
                                   ValueMismatch, compare_output, judge, run_parity,
                                   stratified_sample)

# A tolerance no output diff reaches, so that only the decision stage can fail.
HUGE_ATOL = 1e3


def edit_onnx(run_dir, edit) -> None:
    """Apply ``edit(model)`` to ``model.onnx`` and re-sign it in the manifest, as a buggy exporter
    that still writes a consistent manifest would."""
    export_dir = run_dir / "export"
    path = export_dir / "model.onnx"
    model = onnx.load(str(path))
    edit(model)
    onnx.save_model(model, str(path))
    manifest = read_manifest(export_dir)
    manifest["artifacts"]["onnx_fp32"] = artifact_entry(export_dir, path)
    resign(export_dir, manifest)


def resign(export_dir, manifest: dict) -> None:
    """Write ``manifest`` back (``write_manifest`` fills in format and date again)."""
    kept = {k: v for k, v in manifest.items() if k not in ("format", "created")}
    write_manifest(export_dir, kept)


def edit_initializer(model: onnx.ModelProto, name: str, change) -> None:
    tensor = next(t for t in model.graph.initializer if t.name == name)
    tensor.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(tensor)), name))


def perturb_first_conv(model: onnx.ModelProto) -> None:
    rng = np.random.default_rng(0)
    edit_initializer(model, "model.conv1.weight",
                     lambda w: (w + rng.normal(0, 0.05, w.shape)).astype(np.float32))


def test_parity_passes_on_real_val_images(exported_run_dir):
    report = run_parity(exported_run_dir)
    print(f"max abs diff {report.max_abs_diff:.3g} (atol {FP32.atol:g})")
    assert report.passed and report.failed_stage is None
    assert report.max_abs_diff < FP32.atol
    graph_checks = [c for c in report.checks if c.artifact != PREPROCESS_CHECK]
    assert {(c.artifact, c.batch_size, c.output) for c in graph_checks} == {
        (a, b, o) for a in ("onnx_fp32", "onnx_fp32_ort_optimized") for b in (1, 3, 8)
        for o in ("logits", "probabilities", "ood_score")}
    assert all(c.within_tolerance for c in graph_checks)
    classes = [c for c in graph_checks if c.output != "ood_score"]
    assert all(c.argmax_agreement == 1.0 for c in classes)
    assert all(c.onnx_shape == c.torch_shape == [c.batch_size, 3] for c in classes)
    scores = [c for c in graph_checks if c.output == "ood_score"]
    assert all(c.onnx_shape == c.torch_shape == [c.batch_size] for c in scores)
    # The graph's own crop and normalisation give exactly the tensor training evaluated on.
    (pre,) = [c for c in report.checks if c.artifact == PREPROCESS_CHECK]
    assert pre.output == "resnet18" and pre.torch_shape == [6, 3, 64, 64]
    assert pre.within_tolerance and pre.max_abs_diff == 0.0
    assert report.val_labels == {"COVID-19": 2, "Normal": 2, "Pneumonia": 2}
    # The tiny run has 6 val images: batch 8 repeats some of them, and says so.
    config = json.loads((exported_run_dir / "config.json").read_text())
    val = sorted(r.path for r in read_split_manifest(config["manifest"], split="val"))
    assert sorted(report.val_images) == val and len(val) == 6
    assert report.cycled_batch_sizes == [8]
    assert {c.batch_size for c in report.checks if c.cycled} == {8}


def test_passing_report_is_written_and_linked_from_the_manifest(exported_run_dir):
    report = run_parity(exported_run_dir)
    export_dir = exported_run_dir / "export"
    saved = json.loads((export_dir / "parity.json").read_text())
    assert saved["passed"] is True and saved["failed_stage"] is None
    assert saved["max_abs_diff"] == report.max_abs_diff
    assert len(saved["checks"]) == 19  # 2 artifacts x 3 batches x 3 outputs + preprocessing
    manifest = verify_manifest(export_dir)  # the update keeps every artifact hash valid
    assert manifest["parity"] == {"passed": True, "report": "parity.json",
                                  "max_abs_diff": report.max_abs_diff, "failed_stage": None}


def test_perturbed_graph_fails_with_value_mismatch(exported_run_dir):
    edit_onnx(exported_run_dir, perturb_first_conv)
    with pytest.raises(ValueMismatch, match=r"onnx_fp32 batch 1 output 'logits': max abs diff"):
        run_parity(exported_run_dir)
    export_dir = exported_run_dir / "export"
    saved = json.loads((export_dir / "parity.json").read_text())
    assert saved["passed"] is False and saved["failed_stage"] == "values"
    assert saved["max_abs_diff"] > FP32.atol
    assert read_manifest(export_dir)["parity"]["passed"] is False


def test_cli_parity_exits_nonzero_without_a_traceback(exported_run_dir, capsys):
    edit_onnx(exported_run_dir, perturb_first_conv)
    assert main(["export", "parity", str(exported_run_dir)]) == 1
    out, err = capsys.readouterr()
    assert "parity FAILED (ValueMismatch, stage values)" in err
    assert "Traceback" not in out + err
    assert "max abs" in out  # the table is still printed, showing the diffs that failed


def test_permuted_head_fails_with_decision_mismatch(exported_run_dir):
    # Rolling the class rows of the head moves every image's top class to another class, while
    # a huge atol lets the value stage pass: only the decision stage can catch it.
    def roll_head(model):
        for name in ("model.fc.weight", "model.fc.bias"):
            edit_initializer(model, name, lambda w: np.roll(w, 1, axis=0))
    edit_onnx(exported_run_dir, roll_head)
    with pytest.raises(DecisionMismatch, match=r"batch 1 output 'probabilities': argmax "
                                               r"agreement 0.0%") as caught:
        run_parity(exported_run_dir, atol=HUGE_ATOL)
    first = next(c for c in caught.value.report.checks if c.artifact == "onnx_fp32"
                 and c.output == "probabilities")
    assert (first.artifact, first.output, first.argmax_agreement) == (
        "onnx_fp32", "probabilities", 0.0)


def test_renamed_output_fails_with_output_name_mismatch(exported_run_dir):
    def rename(model):
        model.graph.output[1].name = "probs"
        for node in model.graph.node:
            node.output[:] = ["probs" if o == "probabilities" else o for o in node.output]
    edit_onnx(exported_run_dir, rename)
    with pytest.raises(OutputNameMismatch, match=r"outputs \('logits', 'probs', 'ood_score'\)"):
        run_parity(exported_run_dir)
    saved = json.loads((exported_run_dir / "export" / "parity.json").read_text())
    assert saved["failed_stage"] == "names"


def test_unsigned_change_is_refused_before_any_comparison(exported_run_dir):
    path = exported_run_dir / "export" / "model.onnx"
    model = onnx.load(str(path))
    perturb_first_conv(model)
    onnx.save_model(model, str(path))  # manifest not updated: sha256 no longer matches
    with pytest.raises(ManifestError, match="onnx_fp32"):
        run_parity(exported_run_dir)
    saved = json.loads((exported_run_dir / "export" / "parity.json").read_text())
    assert saved["failed_stage"] == "manifest" and saved["checks"] == []


def test_retrained_checkpoint_needs_a_new_export(exported_run_dir):
    with (exported_run_dir / "best.pt").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ParityError, match="re-run `flannel export onnx`"):
        run_parity(exported_run_dir)


def test_export_spec_must_equal_the_checkpoint_spec(exported_run_dir):
    export_dir = exported_run_dir / "export"
    manifest = read_manifest(export_dir)
    manifest["input"]["spec"].update(resize=64, crop=64)  # e.g. a server resizing to the crop
    resign(export_dir, manifest)
    with pytest.raises(ParityError, match="input spec of the export"):
        run_parity(exported_run_dir)


def test_no_val_images_is_an_error(exported_run_dir, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("path,label,finding,source,patient_id,patient_known,split\n")
    config_path = exported_run_dir / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "manifest": str(empty)}))
    with pytest.raises(ParityError, match="no 'val' rows"):
        run_parity(exported_run_dir)


def test_unreadable_val_image_is_a_parity_error(exported_run_dir, tmp_path):
    config = json.loads((exported_run_dir / "config.json").read_text())
    rows = read_split_manifest(config["manifest"])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    first_val = next(i for i, r in enumerate(rows) if r.split == "val")
    rows[first_val] = dataclasses.replace(rows[first_val], path=str(broken))
    config["manifest"] = str(write_split_manifest(rows, tmp_path / "manifest.csv"))
    (exported_run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ParityError, match="validation image cannot be read"):
        run_parity(exported_run_dir)


def test_compare_output_exact_numbers():
    ref = np.array([[1.0, 2.0], [4.0, 3.0]], dtype=np.float32)
    got = np.array([[1.0, 2.5], [4.0, 5.0]], dtype=np.float32)
    check = compare_output(ParityCheck("onnx_fp32", 2, "logits", [2, 2], [2, 2]), ref, got,
                           atol=0.1, rtol=0.0)
    assert check.max_abs_diff == 2.0
    assert check.max_rel_diff == pytest.approx(2.0 / 3.0)
    assert check.within_tolerance is False
    assert check.argmax_agreement == 0.5  # row 2 flips from class 0 to class 1


def test_judge_checks_shapes_before_values():
    report = ParityReport(run_dir="r", model_name="a", atol=1e-4, rtol=0.0, batch_sizes=[3],
                          val_images=[])
    report.checks = [
        ParityCheck("onnx_fp32", 3, "logits", [3, 3], [3, 3], 1.0, 1.0, False, 1.0),
        ParityCheck("onnx_fp32", 3, "probabilities", [3, 3], [1, 3]),
    ]
    with pytest.raises(ShapeMismatch, match=r"batch 3 output 'probabilities'.*\[1, 3\]"):
        judge(report, LEARNER)


@pytest.mark.slow
def test_cli_all_exports_then_passes(tiny_run_dir, capsys):
    assert main(["export", "all", str(tiny_run_dir)]) == 0
    out = capsys.readouterr().out
    assert "exported learner resnet18 (resnet18) with the dynamo exporter" in out
    assert "artifact batch output" in out and "parity PASSED" in out
    assert read_manifest(tiny_run_dir / "export")["parity"]["passed"] is True


def test_the_parity_sample_takes_every_class_in_turn_and_is_seeded():
    Row = collections.namedtuple("Row", "path label")
    rows = [Row(f"{label}{i}", label) for label in ("a", "b", "c") for i in range(10)]
    picked = stratified_sample(rows, 7)
    assert collections.Counter(r.label for r in picked) == {"a": 3, "b": 2, "c": 2}
    assert [r.path for r in picked] == [r.path for r in stratified_sample(rows, 7)]
    assert len(stratified_sample(rows[:2], 7)) == 2  # fewer rows than asked: all of them
