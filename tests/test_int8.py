"""int8: quantised from the plain fp32 graph, calibrated on the training split, gated on the
validation split; a failed gate is recorded and the archive refuses the artifact."""
from __future__ import annotations

import json
import logging
import zipfile

import yaml

import numpy as np
import onnx
import pytest

from flannel.artifacts import ONNX_INT8, read_manifest, verify_manifest
from flannel.export import int8
from flannel.export.int8 import Int8Config, excluded_nodes, exclude_parts, export_int8
from flannel.export.parity import run_parity
from flannel.handlers.archive import ArchiveError, ArchiveSettings, build_archive
from flannel.backends import make_session
from flannel.handlers.serving import answer_batch, load_served_model
from flannel.preprocess import load_tensor
from run_fixtures import add_tiny_external_evaluation

pytestmark = pytest.mark.slow
SMALL = Int8Config(calibration_images=6, batch_size=3)


@pytest.fixture(scope="module")
def trained_export(tmp_path_factory):
    """A resnet18 trained a little on the toy spots, so its answers differ between images (a
    random network gives every image the same class, and no gate could see a broken int8)."""
    from flannel.export.onnx_export import export_onnx
    from flannel.train.config import TrainConfig
    from flannel.train.loop import train_learner
    from toy_data import make_toy_dataset

    root = tmp_path_factory.mktemp("int8")
    manifest = make_toy_dataset(root / "data", per_class={"train": 16, "val": 6, "test": 2})
    result = train_learner(TrainConfig(manifest=str(manifest), out=str(root / "run"), epochs=8,
                                       batch_size=16, input_size=64, seed=0, threads=2,
                                       precision="fp32"))
    assert result.report["val"]["accuracy"] > 0.5
    export_onnx(result.run_dir)
    add_tiny_external_evaluation(result.run_dir)
    return result.run_dir


@pytest.fixture
def trained_run(trained_export, tmp_path):
    import shutil
    return shutil.copytree(trained_export, tmp_path / "run")


def test_int8_is_built_from_the_plain_graph_and_recorded_with_its_gate(exported_run_dir):
    result = export_int8(exported_run_dir, SMALL)
    export = exported_run_dir / "export"
    manifest = verify_manifest(export)  # the new artifact's sha256 is in the manifest
    entry = manifest["artifacts"][ONNX_INT8]
    assert entry["precision"] == "int8" and entry["tolerance_profile"] == "int8"
    assert entry["backend"] == "ort-int8"
    assert entry["gate"] == result and entry["quantization"]["calibration"] == "minmax"
    assert result["images"] == 6 and 0.0 <= result["argmax_agreement"] <= 1.0
    assert result["passed"] == (result["argmax_agreement"] >= 0.99
                                and result["macro_f1_drop"] <= 0.01)
    report = json.loads((export / "onnx_int8_gate.json").read_text())
    assert report["calibration_split"] == "train" and report["gate"]["split"] == "val"
    assert report["gate"]["atol"] is None and report["gate"]["max_abs_diff"] >= 0  # recorded only
    model = onnx.load(str(export / entry["path"]))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ
    assert report["recipe"]["quantize_linear_nodes"] > 10


def test_a_broken_calibration_fails_the_gate_and_the_archive_refuses_it(trained_run,
                                                                        monkeypatch, tmp_path):
    # Calibrating on images 1000 times too bright stretches every activation range so far that
    # the real images' activations all round to the zero point: int8 answers one class.
    real = int8.calibration_batches
    monkeypatch.setattr(int8, "calibration_batches",
                        lambda *a, **k: [b * 1000.0 for b in real(*a, **k)])
    result = export_int8(trained_run, Int8Config(calibration_images=6, batch_size=3,
                                                 max_fp32_ops=0))  # no search: one graph
    assert result["passed"] is False and result["argmax_agreement"] < 0.99
    assert read_manifest(trained_run / "export")["artifacts"][ONNX_INT8]["gate"]["passed"] is False
    run_parity(trained_run)
    with pytest.raises(ArchiveError, match="onnx_int8 has not passed its int8 gate"):
        build_archive(trained_run, tmp_path / "store", settings=ArchiveSettings(backend="ort-int8"))
    assert not list((tmp_path / "store").glob("*.mar"))
    # the default (auto) passes over the failed int8 artifact and serves fp32
    mar = build_archive(trained_run, tmp_path / "store")
    with zipfile.ZipFile(mar) as zf:
        assert yaml.safe_load(zf.read("model-config.yaml"))["handler"]["backend"] == "ort-fp32"


def test_the_int8_backend_serves_the_int8_artifact(exported_run_dir):
    export_int8(exported_run_dir, SMALL)
    export = exported_run_dir / "export"
    served = load_served_model(export, {"backend": "ort-int8", "intra_op_threads": 1})
    assert served.backend.name == "ort-int8"
    manifest = read_manifest(export)
    from flannel.data.records import read_manifest as read_split
    paths = [r.path for r in read_split(manifest["split_manifest"], split="val")][:3]
    from pathlib import Path
    answers = answer_batch(served, [Path(p).read_bytes() for p in paths])
    got = np.array([[a.body["probabilities"][c] for c in served.class_names] for a in answers])
    session = make_session(export / manifest["artifacts"][ONNX_INT8]["path"], 1)
    x = np.stack([load_tensor(p, served.spec).numpy() for p in paths])
    want = session.run(["probabilities"], {"image": x})[0]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.allclose(got.sum(1), 1, atol=1e-5)


def test_exclusion_policies_name_fusion_depthwise_and_head_nodes(tiny_ensemble):
    model = onnx.load(str(tiny_ensemble / "export" / "model.onnx"))
    ops = {n.name: n.op_type for n in model.graph.node}
    fusion = set(excluded_nodes(model, "fusion"))
    depthwise = set(excluded_nodes(model, "depthwise"))  # mobilenet_v3_small's
    heads = set(excluded_nodes(model, "heads"))
    assert "Gemm" in {ops[n] for n in fusion} and "Softmax" in {ops[n] for n in fusion}
    assert depthwise and {ops[n] for n in depthwise} == {"Conv"}
    # resnet18's fc and mobilenet_v3_small's two classifier layers (squeezenet classifies by Conv)
    assert len(heads) == 3 and {ops[n] for n in heads} <= {"Gemm", "MatMul"}
    assert not depthwise & fusion and not heads & fusion
    assert set(excluded_nodes(model, "fusion+depthwise")) == fusion | depthwise
    assert excluded_nodes(model, "none") == []
    assert exclude_parts("fusion+depthwise") == {"fusion", "depthwise"}
    with pytest.raises(ValueError, match="parts \\['attention'\\]"):
        exclude_parts("fusion+attention")


def test_backend_benchmark_measures_every_backend_side_by_side(trained_run):
    from flannel.benchmarks.model import bench_model, format_summary

    export_int8(trained_run, SMALL)
    result = bench_model([trained_run], (1, 2), warmup=1, repeats=1, threads=1,
                         preprocess_repeats=1)
    for batch in (1, 2):
        backends = [r["backend"] for r in result["rows"] if r["batch"] == batch]
        assert {"eager fp32", "ort-fp32", "ort-int8"} <= set(backends) and backends[0] == "eager fp32"
    assert all(r["ms_per_image"] > 0 and r["images_per_s"] > 0 for r in result["rows"])
    assert all(r["vs_eager_fp32"] == 1.0 for r in result["rows"] if r["backend"] == "eager fp32")
    assert result["machine"]["cpu"] and result["machine"]["threads"] == 1
    table = format_summary(result)
    assert result["machine"]["cpu"] in table and table.count("| ort-int8 |") == 2


def test_auto_backend_times_every_passing_backend_and_picks_the_fastest(exported_run_dir,
                                                                       tmp_path, caplog):
    from flannel.handlers.archive import fastest_passing_backend, passing_backends

    assert export_int8(exported_run_dir, SMALL)["passed"]
    run_parity(exported_run_dir)
    export = exported_run_dir / "export"
    assert passing_backends(export, read_manifest(export)) == ["ort-fp32", "ort-int8"]
    fp32 = read_manifest(export)["artifacts"]["onnx_fp32"]
    assert fp32["backend"] == "ort-fp32"
    assert fp32["gate"]["name"] == "parity" and fp32["gate"]["passed"] is True
    with caplog.at_level(logging.INFO, logger="flannel.handlers.archive"):
        mar = build_archive(exported_run_dir, tmp_path / "store")
    line = next(r.getMessage() for r in caplog.records if "backend auto" in r.getMessage())
    chosen = line.split("backend auto: ")[1].split(" ")[0]
    assert "ort-fp32" in line and "ort-int8" in line and chosen in ("ort-fp32", "ort-int8")
    with zipfile.ZipFile(mar) as zf:
        config = yaml.safe_load(zf.read("model-config.yaml"))
        archived = json.loads(zf.read("manifest.json"))
    assert config["handler"]["backend"] == chosen
    assert set(archived["artifacts"]) == {"onnx_int8" if chosen == "ort-int8" else "onnx_fp32",
                                          "input_spec", "index_to_name", "reference_input",
                                          "eager_fp32", "answer_policy", "model_card",
                                          "model_card_markdown"}
    assert fastest_passing_backend(export, read_manifest(export), 2) in ("ort-fp32", "ort-int8")


def test_a_sensitive_operator_is_measured_and_kept_fp32_until_the_gate_passes(trained_run,
                                                                              monkeypatch,
                                                                              tmp_path):
    # The classifier's input rounded at a scale 1000 times too coarse: every feature becomes the
    # zero point, so the fully quantised graph answers one class and fails its gate. The search
    # must find that Gemm by its measured SQNR, keep it fp32 and pass.
    import onnxruntime.quantization as q

    model = onnx.load(str(trained_run / "export" / "model.onnx"))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    real = q.quantize_static

    def coarse(*args, **kwargs):
        kwargs["extra_options"] = {**kwargs["extra_options"], "TensorQuantOverrides": {
            gemm.input[0]: [{"scale": np.array(1000.0, np.float32),
                             "zero_point": np.array(0, np.uint8)}]}}
        return real(*args, **kwargs)

    monkeypatch.setattr(q, "quantize_static", coarse)
    result = export_int8(trained_run, SMALL)
    assert result["passed"]
    entry = read_manifest(trained_run / "export")["artifacts"][ONNX_INT8]
    steps = entry["quantization"]["search"]
    assert steps[0]["kept_fp32"] == 0 and not steps[0]["passed"]
    assert steps[-1]["passed"] and steps[-1]["kept_fp32"] >= 1
    measured = [k for k in entry["quantization"]["kept_fp32"] if k["reason"].startswith("measured")]
    assert measured[0]["node"] == gemm.name and measured[0]["op_type"] == "Gemm"
    assert measured[0]["input_sqnr_db"] < 1.0 and "rank 1 of" in measured[0]["reason"]
    assert len(measured) == steps[-1]["kept_fp32"]
    int8_model = onnx.load(str(trained_run / "export" / entry["path"]))
    kept = next(n for n in int8_model.graph.node if n.name == gemm.name)
    producers = {o: n.op_type for n in int8_model.graph.node for o in n.output}
    assert kept.input[0] == gemm.input[0]  # its own fp32 input, not a dequantised copy
    assert producers.get(kept.input[0]) != "DequantizeLinear"
    run_parity(trained_run)
    mar = build_archive(trained_run, tmp_path / "store", settings=ArchiveSettings(backend="ort-int8"))
    assert mar.is_file()


def test_an_ensembles_learners_are_found_and_ranked_by_their_share_of_the_fused_change(
        tiny_ensemble, tmp_path):
    from flannel.artifacts import read_manifest as read_export
    from flannel.export.int8 import member_groups, preprocess_graph, quantize
    from flannel.export.int8_search import member_shares

    export = tiny_ensemble / "export"
    manifest = read_export(export)
    pre = tmp_path / "pre.onnx"
    model = preprocess_graph(export / "model.onnx", pre)
    candidates = {n.name for n in model.graph.node if n.op_type in int8.QUANTIZED_OPS}
    groups = member_groups(model, manifest, candidates)
    assert list(groups) == [m["name"] for m in manifest["members"]] and len(groups) == 3
    assert all(nodes and set(nodes) <= candidates for nodes, _ in groups.values())
    assert sum(len(nodes) for nodes, _ in groups.values()) <= len(candidates)
    x = np.random.default_rng(0).random((4, 1, manifest["input"]["spec"]["resize"],
                                         manifest["input"]["spec"]["resize"]), dtype=np.float32)
    q = tmp_path / "q.onnx"
    quantize(pre, q, "image", [x], Int8Config(), [], reduce_range=False)
    shares = member_shares(pre, q, "image", [x], groups, "learner_weights", threads=1)
    assert sorted(s.member for s in shares) == sorted(groups)
    assert all(s.share >= 0 for s in shares) and shares[0].share >= shares[-1].share
    shares_self = member_shares(pre, pre, "image", [x], groups, "learner_weights", threads=1)
    assert all(s.share == 0 for s in shares_self)  # fp32 against itself changes nothing
