"""`flannel evaluate`: a tiny random-weights checkpoint on folders in the hannover, openist and
muhammedtalo layouts; counts, classes without images, predictions equal to the served tensor path,
and clear errors. An ensemble folder on a synthetic set: the same report, its metrics those of the
fused module. The out-of-distribution pass of an export serving ``ood_score``, or why none ran."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fixtures_data import build_muhammedtalo, build_radiography
from flannel.artifacts import (EXPORT_DIRNAME, INPUT_SPEC, ONNX_FP32, artifact_entry, sha256_file,
                               write_manifest)
from flannel.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from flannel.cli import main
from flannel.data.readers import read_dataset
from flannel.data.synth import SynthConfig, synthesize
from flannel.export.sources import load_source
from flannel.graphs import FUSION_CHECKPOINT
from flannel.labels import get_scheme
from flannel.metrics import confusion_matrix
from flannel.preprocess import PreprocessSpec, input_spec_for, load_tensor
from flannel.registry import build_model
from flannel.train.external import (EXTERNAL_DIR, NO_OOD_EXPORT, OOD_OUTPUT, OOD_THRESHOLD,
                                    ExternalDataError, evaluate_external)
from run_fixtures import make_tiny_ensemble
from test_data_readers import build_hannover, build_openist

CROP = 64


def make_run(run_dir: Path, scheme: str = "3class", class_names: list[str] | None = None) -> Path:
    classes = class_names or list(get_scheme(scheme).classes)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("resnet18", len(classes))
    ckpt = Checkpoint(arch="resnet18", class_names=classes,
                      preprocess=PreprocessSpec.for_input_size(CROP),
                      state_dict=model.state_dict(), config={"scheme": scheme, "arch": "resnet18"})
    save_checkpoint(run_dir / "best.pt", ckpt)
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    root = tmp_path_factory.mktemp("external")
    build_hannover(root / "hannover")
    build_openist(root / "openist")
    build_muhammedtalo(root / "muhammedtalo")
    return root


def expected_confusion(run_dir: Path, dirs: list[Path], scheme: str = "3class") -> list[list[int]]:
    """The confusion matrix from the tensor path export and serving use, image by image."""
    from flannel.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run_dir / "best.pt")
    model = ckpt.build_model()
    ds = read_dataset(dirs, scheme)
    with torch.no_grad():
        predicted = [int(model(load_tensor(s.path, ckpt.preprocess)[None]).argmax())
                     for s in ds.samples]
    truth = [ckpt.class_names.index(label) for label in ds.labels]
    return confusion_matrix(truth, predicted, len(ckpt.class_names)).tolist()


def test_hannover_and_openist_report(run_dir, external):
    dirs = [external / "hannover", external / "openist"]
    r = evaluate_external(run_dir, dirs, name="hann-open")
    metrics = r["metrics"]
    support = {c: m["support"] for c, m in metrics["per_class"].items()}
    assert support == {"COVID-19": 3, "Normal": 3, "Pneumonia": 0} and r["images"] == 6
    assert r["counts_by_source"] == {"hannover": {"COVID-19": 3}, "openist": {"Normal": 3}}
    assert metrics["confusion"] == expected_confusion(run_dir, dirs)
    recalls = r["recall_summary"]
    assert recalls["not_externally_validated"] == ["Pneumonia"]
    assert set(recalls["recall"]) == {"COVID-19", "Normal"}
    per = metrics["per_class"]
    assert recalls["covid_normal_mean_recall"] == pytest.approx(
        (per["COVID-19"]["recall"] + per["Normal"]["recall"]) / 2)
    assert r["skipped"] == {"projection lateral": 1, "lung mask (@.png)": 2}
    assert len(r["problems"]) == 4  # 3 from hannover's data.csv, openist's Thumbs.db

    out = run_dir / EXTERNAL_DIR / "hann-open"
    assert Path(r["out_dir"]) == out
    md = (out / "report.md").read_text()
    assert "**Not externally validated: Pneumonia**" in md
    assert "Mean of COVID-19 and Normal recall" in md
    assert json.loads((out / "report.json").read_text())["metrics"]["confusion"] == metrics[
        "confusion"]
    with (out / "confusion.csv").open() as fh:
        table = list(csv.reader(fh))
    assert [sum(map(int, row[1:])) for row in table[1:]] == [3, 3, 0]
    assert (out / "confusion.png").stat().st_size > 0


def test_classes_map_across_layouts(run_dir, external):
    dirs = [external / "muhammedtalo", external / "hannover", external / "openist"]
    r = evaluate_external(run_dir, dirs, name="all")
    support = {c: m["support"] for c, m in r["metrics"]["per_class"].items()}
    assert support == {"COVID-19": 6, "Normal": 6, "Pneumonia": 3}
    assert r["recall_summary"]["not_externally_validated"] == []
    assert r["metrics"]["confusion"] == expected_confusion(run_dir, dirs)
    assert set(r["sources"].values()) == {"muhammedtalo", "hannover", "openist"}


def test_four_class_checkpoint_counts_excluded_findings(tmp_path, external):
    run = make_run(tmp_path / "run4", scheme="4class")
    r = evaluate_external(run, [external / "muhammedtalo"], name="mt")
    support = {c: m["support"] for c, m in r["metrics"]["per_class"].items()}
    assert support == {"COVID": 3, "Lung_Opacity": 0, "Normal": 3, "Viral Pneumonia": 0}
    assert r["excluded_findings"] == {"pneumonia": 3}  # cause unstated: not viral pneumonia
    assert r["recall_summary"]["not_externally_validated"] == ["Lung_Opacity", "Viral Pneumonia"]
    assert r["recall_summary"]["covid_normal_classes"] == ["COVID", "Normal"]
    assert "Findings outside the scheme, not evaluated: pneumonia 3" in (
        Path(r["out_dir"]) / "report.md").read_text()


def test_unmappable_folder_is_a_clear_error(run_dir, tmp_path, capsys):
    build_radiography(tmp_path / "rad")
    base = tmp_path / "rad" / "COVID-19_Radiography_Dataset"
    for cls in ("COVID", "Normal", "Viral Pneumonia"):  # keep only Lung_Opacity images
        for image in (base / cls / "images").iterdir():
            image.unlink()
    with pytest.raises(ExternalDataError, match=r"maps onto the checkpoint's classes \['COVID-19', "
                                                r"'Normal', 'Pneumonia'\].*lung_opacity 2"):
        evaluate_external(run_dir, [tmp_path / "rad"])
    assert main(["evaluate", str(run_dir), str(tmp_path / "rad")]) == 2
    assert "lung_opacity 2" in capsys.readouterr().err


def test_scheme_and_class_names_must_agree(tmp_path, external):
    run = make_run(tmp_path / "bad", scheme="4class",
                   class_names=["COVID-19", "Normal", "Pneumonia"])
    with pytest.raises(ExternalDataError, match="do not match its label scheme '4class'"):
        evaluate_external(run, [external / "openist"])


def test_undecodable_files_fail_before_predicting(run_dir, tmp_path):
    build_openist(tmp_path / "o")
    broken = tmp_path / "o" / "Datasets" / "Chest_x-ray" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff" + bytes(64))  # JPEG signature, no image
    with pytest.raises(ExternalDataError, match=r"1 file\(s\) cannot be decoded:\n  .*broken.jpg"):
        evaluate_external(run_dir, [tmp_path / "o"], name="broken")
    assert not (run_dir / EXTERNAL_DIR / "broken").exists()


def test_cli_prints_recall_and_unvalidated_classes(run_dir, external, capsys):
    assert main(["evaluate", str(run_dir), str(external / "hannover"), str(external / "openist"),
                 "--name", "cli"]) == 0
    out = capsys.readouterr().out
    assert "6 external images, scheme 3class" in out
    assert "not externally validated (no images): Pneumonia" in out
    assert "mean of COVID-19 and Normal recall" in out
    report = json.loads((run_dir / EXTERNAL_DIR / "cli" / "report.json").read_text())
    assert report["images"] == 6 and report["precision"] == "fp32"
    assert np.isclose(sum(report["recall_summary"]["recall"].values()) / 2,
                      report["recall_summary"]["covid_normal_mean_recall"])


# --- ensemble folders and the out-of-distribution pass ----------------------------------------


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory):
    """A fitted ensemble over three random-weights learners (not exported)."""
    return make_tiny_ensemble(tmp_path_factory.mktemp("ensemble"))


@pytest.fixture(scope="module")
def synth_external(tmp_path_factory):
    """A synthetic set from elsewhere: 10 images per class, every file format of the generator."""
    root = tmp_path_factory.mktemp("synth-external")
    synthesize(root / "synth", SynthConfig(n_per_class=10, size=64, seed=7))
    return root / "synth"


def fused_directly(ensemble: Path, dirs: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """The fused probabilities of the module itself on each file's served tensor, and labels."""
    source = load_source(ensemble)
    ds = read_dataset(dirs, "3class")
    x = torch.stack([load_tensor(s.path, source.input_spec) for s in ds.samples])
    with torch.no_grad():
        probs = source.module(x)[0].numpy()
    return probs, np.array([source.class_names.index(label) for label in ds.labels])


@pytest.mark.slow
def test_ensemble_folder_report_equals_the_fused_module(ensemble_dir, synth_external, tmp_path):
    r = evaluate_external(ensemble_dir, [synth_external], name="synth")
    probs, truth = fused_directly(ensemble_dir, [synth_external])
    metrics = r["metrics"]
    assert metrics["confusion"] == confusion_matrix(truth, probs.argmax(1), 3).tolist()
    assert metrics["loss"] == pytest.approx(-np.log(probs[np.arange(len(truth)), truth]).mean(),
                                            rel=1e-5)
    assert {c: m["support"] for c, m in metrics["per_class"].items()} == {
        "COVID-19": 10, "Normal": 10, "Pneumonia": 10}
    assert r["kind"] == "ensemble" and r["checkpoint"] == FUSION_CHECKPOINT
    assert r["members"] == ["resnet18", "mobilenet_v3_small", "squeezenet1_1"]  # by val F1
    assert r["checkpoint_sha256"] == sha256_file(ensemble_dir / FUSION_CHECKPOINT)
    assert r["ood"] is None and r["ood_reason"] == NO_OOD_EXPORT

    learner = evaluate_external(make_run(tmp_path / "run"), [synth_external], name="synth")
    assert set(r) == set(learner)
    for key in ("metrics", "recall_summary"):
        assert set(r[key]) == set(learner[key])
    out = ensemble_dir / EXTERNAL_DIR / "synth"
    assert Path(r["out_dir"]) == out
    assert json.loads((out / "report.json").read_text())["metrics"]["confusion"] == metrics[
        "confusion"]
    assert {p.name for p in out.iterdir()} == {p.name for p in Path(learner["out_dir"]).iterdir()}
    md = (out / "report.md").read_text()
    assert "Model: ensemble (" in md and f"not run ({NO_OOD_EXPORT})" in md


@pytest.mark.slow
def test_ensemble_folder_refuses_a_learner_checkpoint(ensemble_dir, synth_external):
    with pytest.raises(ExternalDataError, match="ensemble folder.*--checkpoint last.pt"):
        evaluate_external(ensemble_dir, [synth_external], checkpoint="last.pt")


# Hand-made stand-ins for an export: the exported graph of a learner does not serve ood_score yet.
# IR version 10 (onnx 1.16): the onnx package writes a newer one than the runtime reads.
ONNX_IR_VERSION = 10
def mean_brightness_graph(path: Path, outputs: tuple[str, ...], scale: float) -> Path:
    """An ONNX graph on the served input whose every output is ``scale`` x each image's mean."""
    mean = helper.make_node("ReduceMean", ["image", "axes"], ["mean"], keepdims=0)
    scaled = helper.make_node("Mul", ["mean", "scale"], ["scaled"])
    copies = [helper.make_node("Identity", ["scaled"], [name]) for name in outputs]
    graph = helper.make_graph(
        [mean, scaled, *copies], "mean_brightness",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, "side", "side"])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch"]) for name in outputs],
        [numpy_helper.from_array(np.array([1, 2, 3], dtype=np.int64), "axes"),
         numpy_helper.from_array(np.array(scale, dtype=np.float32), "scale")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                              ir_version=ONNX_IR_VERSION)
    onnx.save(model, path)
    return path


def write_export(run_dir: Path, outputs: tuple[str, ...], scale: float = 1.0,
                 checkpoint: str = "best.pt") -> Path:
    """``run_dir/export`` with a manifest naming ``outputs``, model.onnx and input_spec.json."""
    export_dir = run_dir / EXPORT_DIRNAME
    export_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = mean_brightness_graph(export_dir / "model.onnx", outputs, scale)
    spec_path = export_dir / "input_spec.json"
    input_spec_for([PreprocessSpec.for_input_size(CROP)]).save(spec_path)
    write_manifest(export_dir, {
        "kind": "learner", "graph": {"input_names": ["image"], "output_names": list(outputs)},
        "artifacts": {ONNX_FP32: artifact_entry(export_dir, onnx_path),
                      INPUT_SPEC: artifact_entry(export_dir, spec_path)},
        "checkpoint_sha256": sha256_file(run_dir / checkpoint)})
    return export_dir


def served_means(dirs: list[Path]) -> np.ndarray:
    spec = input_spec_for([PreprocessSpec.for_input_size(CROP)])
    return np.array([float(load_tensor(s.path, spec).double().mean())
                     for s in read_dataset(dirs, "3class").samples])


def test_ood_pass_rate_of_the_exported_graph(tmp_path, external):
    dirs = [external / "hannover", external / "openist"]
    means = np.sort(served_means(dirs))
    # Put the threshold in the widest gap between the images' mean brightness: the k darkest
    # score at most 1, and no score lies near enough to 1 for fp32 rounding to flip it.
    gaps = np.diff(means)
    passing = int(gaps.argmax()) + 1
    boundary = (means[passing - 1] + means[passing]) / 2
    assert gaps.max() > 1e-5
    run = make_run(tmp_path / "run")
    export_dir = write_export(run, ("logits", "probabilities", OOD_OUTPUT), scale=1 / boundary)
    r = evaluate_external(run, dirs, name="ood")
    ood = r["ood"]
    assert r["ood_reason"] is None
    assert ood["images"] == 6 and ood["pass_rate"] == pytest.approx(passing / 6)
    assert ood["threshold"] == OOD_THRESHOLD
    assert ood["median_score"] == pytest.approx(np.median(means) / boundary, rel=1e-5)
    assert ood["onnx_sha256"] == sha256_file(export_dir / "model.onnx")
    assert sum(s["images"] for s in ood["by_source"].values()) == 6
    assert set(ood["by_source"]) == {"hannover", "openist"}
    md = (Path(r["out_dir"]) / "report.md").read_text()
    assert f"**{passing / 6:.1%}** of 6 images pass (score <= 1)" in md
    assert json.loads((Path(r["out_dir"]) / "report.json").read_text())["ood"] == ood


def test_ood_is_null_with_the_reason_without_an_ood_output(tmp_path, external):
    run = make_run(tmp_path / "run")
    r = evaluate_external(run, [external / "openist"], name="none")
    assert r["ood"] is None and r["ood_reason"] == NO_OOD_EXPORT  # no export at all
    write_export(run, ("logits", "probabilities"))
    r = evaluate_external(run, [external / "openist"], name="no-output")
    assert r["ood"] is None and r["ood_reason"] == NO_OOD_EXPORT
    assert json.loads((Path(r["out_dir"]) / "report.json").read_text())["ood"] is None
    assert f"Out-of-distribution check: not run ({NO_OOD_EXPORT})." in (
        Path(r["out_dir"]) / "report.md").read_text()


def test_ood_refuses_an_export_of_another_checkpoint_or_modified_graph(tmp_path, external):
    run = make_run(tmp_path / "run")
    export_dir = write_export(run, ("logits", "probabilities", OOD_OUTPUT))
    last = load_checkpoint(run / "best.pt")
    last.epoch += 1  # another file than the exported best.pt
    save_checkpoint(run / "last.pt", last)
    r = evaluate_external(run, [external / "openist"], name="last", checkpoint="last.pt")
    assert r["ood"] is None and "is of another checkpoint" in r["ood_reason"]
    assert r["metrics"]["per_class"]["Normal"]["support"] == 3  # the metrics still stand

    onnx_path = export_dir / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\0")
    r = evaluate_external(run, [external / "openist"], name="modified")
    assert r["ood"] is None and "refusing to load a modified artifact" in r["ood_reason"]


def test_cli_prints_the_ood_pass_rate(tmp_path, external, capsys):
    run = make_run(tmp_path / "run")
    write_export(run, ("logits", "probabilities", OOD_OUTPUT), scale=0.0)
    assert main(["evaluate", str(run), str(external / "openist"), "--name", "cli"]) == 0
    assert "out-of-distribution pass rate 1.000 of 3 (score <= 1)" in capsys.readouterr().out


@pytest.mark.slow
def test_ood_of_an_ensemble_export_is_matched_to_its_fusion(ensemble_dir, synth_external):
    export_dir = write_export(ensemble_dir, ("probabilities", "learner_weights", OOD_OUTPUT),
                              scale=0.0, checkpoint=FUSION_CHECKPOINT)
    try:
        r = evaluate_external(ensemble_dir, [synth_external], name="synth-ood")
    finally:
        shutil.rmtree(export_dir)  # the module's other tests evaluate the folder unexported
    assert r["ood_reason"] is None
    assert r["ood"]["images"] == 30 and r["ood"]["pass_rate"] == 1.0
    assert r["ood"]["median_score"] == 0.0


# --- calibration of the served probabilities on the external set ------------------------------


@pytest.mark.slow
def test_external_report_gives_the_calibration_of_the_served_probabilities(run_dir, external):
    r = evaluate_external(run_dir, [external / "openist"], name="calibration")
    calibration = r["calibration"]
    assert calibration["scaling"] is None  # best.pt alone: no split manifest to fit a T on
    assert calibration["no_scaling"] == "the run records no split manifest"
    served = calibration["external"]["before"]
    assert "after" not in calibration["external"]
    assert served["images"] == 3
    assert served["accuracy"] == pytest.approx(r["metrics"]["accuracy"])
    assert all(np.isfinite(v) for v in served.values()) and 0 <= served["ece"] <= 1
    out = Path(r["out_dir"])
    assert json.loads((out / "report.json").read_text())["calibration"] == calibration
    assert (out / calibration["diagram"]).read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert "## Calibration on the external set" in md
    assert "No temperature scaling (the run records no split manifest)" in md


@pytest.mark.slow
def test_external_calibration_applies_the_temperature_fitted_on_the_runs_validation(tmp_path,
                                                                                    external):
    from flannel.calibration import fit_scaling, logits_of
    from flannel.data.records import read_manifest as read_split
    from flannel.data.torch_dataset import XrayDataset
    from flannel.train.evaluate import predict
    from run_fixtures import make_tiny_run

    run = make_tiny_run(tmp_path)
    r = evaluate_external(run, [external / "hannover", external / "openist"], name="calibrated")
    calibration = r["calibration"]
    manifest = json.loads((run / "config.json").read_text())["manifest"]
    assert calibration["fitted_on"] == {"split": "val", "images": 6, "manifest": manifest}
    # The run's own validation images, not the external ones the figures judge.
    ckpt = load_checkpoint(run / "best.pt")
    val = predict(ckpt.build_model(), XrayDataset(read_split(manifest, "val"), ckpt.class_names,
                                                  ckpt.preprocess))
    expected = fit_scaling(logits_of(val.probs), val.targets).temperature
    assert calibration["scaling"]["temperature"] == pytest.approx(expected, rel=1e-6)
    before, after = calibration["external"]["before"], calibration["external"]["after"]
    assert before["images"] == after["images"] == 6
    assert after["accuracy"] == before["accuracy"] == pytest.approx(r["metrics"]["accuracy"])
    assert all(np.isfinite(v) for f in (before, after) for v in f.values())
    md = (Path(r["out_dir"]) / "report.md").read_text()
    assert f"T = {expected:.3f}" in md and "ECE after" in md
    assert (Path(r["out_dir"]) / "reliability.png").stat().st_size > 0
