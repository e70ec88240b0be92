"""`flannel export triton`: the model repository a full Triton install serves.

    .venv/bin/pytest tests/test_triton_export.py -q

No full Triton (with its ONNX Runtime and TensorRT backends) runs on these hosts, so the
repository is checked as far as it can be without one: its layout, every ``config.pbtxt``
against a structural reader of protobuf text format, the graph model's names and shapes against
a real ONNX Runtime session of the copied file, the copied bytes against the manifest, the
archive folder against the repository's trust list as the Python model checks it, and the
TensorRT model only where a gated engine exists. The last test runs the graph models on a real
``tritonserver``, only where one is installed beside an NVIDIA GPU.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from flannel.handlers.triton_process import triton_problem
from flannel.artifacts import (TENSORRT_FP16, TENSORRT_FP32, artifact_entry, read_manifest,
                               sha256_file, write_manifest)
from flannel.cli import main as flannel_main
from flannel.export.triton_export import (DEFAULT_MOUNT_PATH, GRAPH_SUFFIX, PLAN_SUFFIX,
                                          TensorSpec, TritonExportError,
                                          export_triton_repository, graph_model_config,
                                          tensorrt_plan)
from flannel.handlers.triton_model import ARCHIVE_PARAM, GRAPH_PARAM, TRUST_PARAM
from flannel.handlers.triton_repository import MODEL_PY
from flannel.handlers.trust import TRUST_LIST_NAME, TrustedArchive, TrustError

# --- protobuf text format, read structurally ------------------------------------------------

_TOKEN = re.compile(r'\s*(?:#[^\n]*\n\s*)*("(?:[^"\\]|\\.)*"|[{}\[\]:,]|[A-Za-z0-9_.+-]+)')


def parse_pbtxt(text: str) -> dict:
    """A ``config.pbtxt`` as nested dicts (each field a list of its values, as repeated fields
    allow); raises ValueError on anything protobuf's text format would refuse structurally:
    unbalanced braces, a field without a value, stray separators."""
    tokens, pos = [], 0
    text = text.rstrip() + "\n"
    while pos < len(text.rstrip()):
        match = _TOKEN.match(text, pos)
        if not match:
            raise ValueError(f"cannot read {text[pos:pos + 30]!r}")
        tokens.append(match[1])
        pos = match.end()
    message, rest = _message(tokens, 0, top=True)
    if rest != len(tokens):
        raise ValueError(f"unexpected {tokens[rest]!r}")
    return message


def _message(tokens: list[str], i: int, top: bool = False) -> tuple[dict, int]:
    fields: dict[str, list] = {}
    while i < len(tokens) and tokens[i] != "}":
        key = tokens[i]
        if not re.fullmatch(r"[A-Za-z_]\w*", key):
            raise ValueError(f"expected a field name, got {key!r}")
        i += 1
        if tokens[i] == ":":
            i += 1
        elif tokens[i] not in "{[":
            raise ValueError(f"{key}: expected ':' or a message")
        value, i = _value(tokens, i)
        fields.setdefault(key, []).extend(value if isinstance(value, list) else [value])
    if top == (i < len(tokens)):
        raise ValueError("unbalanced braces")
    return fields, i


def _value(tokens: list[str], i: int):
    if tokens[i] == "{":
        message, i = _message(tokens, i + 1)
        return message, i + 1
    if tokens[i] == "[":
        items, i = [], i + 1
        while tokens[i] != "]":
            item, i = _value(tokens, i)
            items.append(item)
            if tokens[i] == ",":
                i += 1
            elif tokens[i] != "]":
                raise ValueError(f"expected ',' or ']', got {tokens[i]!r}")
        return items, i + 1
    token = tokens[i]
    if token in "{}[]:,":
        raise ValueError(f"expected a value, got {token!r}")
    if token.startswith('"'):
        return json.loads(token), i + 1
    return (int(token) if re.fullmatch(r"-?\d+", token) else token), i + 1


def config_of(model_dir: Path) -> dict:
    return parse_pbtxt((model_dir / "config.pbtxt").read_text())


def parameters(config: dict) -> dict[str, str]:
    return {p["key"][0]: p["value"][0]["string_value"][0] for p in config["parameters"]}


def test_reader_refuses_what_text_format_refuses():
    assert parse_pbtxt('# c\nname: "a" dims: [ 1, 2 ] x { y: [ ] }') == {
        "name": ["a"], "dims": [1, 2], "x": [{"y": []}]}
    for bad in ('name: "a" x {', "x { }}", "dims: [ 1 2 ]", "name:", "x: { : 1 }"):
        with pytest.raises((ValueError, IndexError)):
            parse_pbtxt(bad)


# --- the repository of the tiny exported run ------------------------------------------------


@pytest.fixture(scope="module")
def checked_run(exported_tiny_run, tmp_path_factory) -> Path:
    """A private copy of the exported tiny run with parity passed."""
    from flannel.export.parity import run_parity

    run = shutil.copytree(exported_tiny_run, tmp_path_factory.mktemp("triton") / "run")
    run_parity(run)
    return run


@pytest.fixture(scope="module")
def repo(checked_run) -> Path:
    return export_triton_repository(checked_run)


@pytest.fixture(scope="module")
def name(checked_run) -> str:
    return read_manifest(checked_run / "export")["model_name"]


@pytest.mark.slow
def test_repository_layout(repo, checked_run, name):
    assert repo == checked_run / "export" / "triton_repository"
    top = {p.name for p in repo.iterdir()}
    assert top == {name, name + GRAPH_SUFFIX, TRUST_LIST_NAME, "README.md"}, top
    assert {p.name for p in (repo / (name + GRAPH_SUFFIX) / "1").iterdir()} == {"model.onnx"}
    assert {p.name for p in (repo / name / "1").iterdir()} == {"model.py", "archive"}
    assert (repo / name / "1" / "model.py").read_text() == MODEL_PY
    # Nothing half-written stays beside the repository.
    assert not [p for p in repo.parent.iterdir() if p.name.endswith(".partial")]
    readme = (repo / "README.md").read_text().splitlines()
    assert 10 <= len(readme) <= 20, len(readme)
    text = "\n".join(readme)
    assert f"--model-repository={DEFAULT_MOUNT_PATH}" in text
    assert "--model-control-mode=none" in text and "--http-restricted-api=" in text
    assert "no TensorRT plan" in text and "install this package" in text


@pytest.mark.slow
def test_graph_model_is_the_exports_onnx_and_agrees_with_it(repo, checked_run, name):
    import onnxruntime as ort

    manifest = read_manifest(checked_run / "export")
    model_dir = repo / (name + GRAPH_SUFFIX)
    onnx_file = model_dir / "1" / "model.onnx"
    assert sha256_file(onnx_file) == manifest["artifacts"]["onnx_fp32"]["sha256"]
    config = config_of(model_dir)
    assert config["name"] == [name + GRAPH_SUFFIX] and config["backend"] == ["onnxruntime"]
    assert config["max_batch_size"] == [32]
    assert config["instance_group"] == [{"kind": ["KIND_GPU"], "count": [1]}]
    batching = config["dynamic_batching"][0]
    assert set(batching["preferred_batch_size"]) <= set(range(1, 33))
    assert batching["max_queue_delay_microseconds"][0] >= 0

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    side = json.loads((checked_run / "export" / "input_spec.json").read_text())["resize"]
    (inp,) = config["input"]
    (sess_in,) = session.get_inputs()
    assert (inp["name"], inp["data_type"], inp["dims"]) == ([sess_in.name], ["TYPE_FP32"],
                                                           [1, side, side])
    assert sess_in.shape[1:] == [1, side, side] and isinstance(sess_in.shape[0], str)
    declared = {o["name"][0]: o for o in config["output"]}
    assert list(declared) == [o.name for o in session.get_outputs()]
    batch = np.random.default_rng(0).random((3, 1, side, side), dtype=np.float32)
    ran = dict(zip(declared, session.run(list(declared), {sess_in.name: batch})))
    for out in session.get_outputs():
        entry = declared[out.name]
        assert entry["data_type"] == ["TYPE_FP32"] and isinstance(out.shape[0], str)
        if out.shape[1:]:
            assert entry["dims"] == out.shape[1:] and "reshape" not in entry, out.name
        else:  # one score per image: [N] served as [N, 1]
            assert entry["dims"] == [1] and entry["reshape"] == [{"shape": []}], out.name
        model_shape = entry["reshape"][0]["shape"] if "reshape" in entry else entry["dims"]
        assert ran[out.name].shape == (3, *model_shape), out.name


@pytest.mark.slow
def test_python_model_loads_only_its_trusted_archive(repo, name):
    config = config_of(repo / name)
    assert config["backend"] == ["python"]
    params = parameters(config)
    assert params[TRUST_PARAM] == f"{DEFAULT_MOUNT_PATH}/{TRUST_LIST_NAME}"
    assert params[GRAPH_PARAM] == name + GRAPH_SUFFIX and params[ARCHIVE_PARAM] == "archive"
    graph_input = config_of(repo / (name + GRAPH_SUFFIX))["input"][0]
    pixels = next(i for i in config["input"] if i["name"] == ["pixels"])
    assert pixels["dims"] == graph_input["dims"]
    # The trust list as the server sees it: /mnt/models is where the repository is mounted.
    trust_list = repo / Path(params[TRUST_PARAM]).relative_to(DEFAULT_MOUNT_PATH)
    archive = TrustedArchive(repo / name / "1" / params[ARCHIVE_PARAM], trust_list)
    assert archive.name == f"{name}.mar"
    assert archive.manifest["artifacts"]["onnx_fp32"]["sha256"] == sha256_file(
        repo / (name + GRAPH_SUFFIX) / "1" / "model.onnx")
    (repo / name / "1" / "archive" / "stray.txt").write_text("not in the archive")
    try:
        with pytest.raises(TrustError, match="extra: stray.txt"):
            TrustedArchive(repo / name / "1" / "archive", trust_list)
    finally:
        (repo / name / "1" / "archive" / "stray.txt").unlink()


@pytest.mark.slow
def test_cli_reuses_an_archive_on_cpu_and_refuses_another_exports(checked_run, name, tmp_path,
                                                                  capsys):
    from flannel.handlers.archive import build_archive

    mar = build_archive(checked_run, tmp_path / "store", trust_list=tmp_path / "trust.json")
    out = tmp_path / "repo"
    argv = ["export", "triton", str(checked_run), "--out", str(out), "--archive", str(mar),
            "--device", "cpu", "--mount-path", "/models"]
    assert flannel_main(argv) == 0
    printed = capsys.readouterr().out
    assert re.search(rf"^{name}{GRAPH_SUFFIX}\s+onnxruntime\s+KIND_CPU\s+max batch\s+32", printed,
                     re.M), printed
    assert re.search(rf"^{name}\s+python\s+KIND_CPU", printed, re.M)
    assert "no TensorRT plan" in printed
    assert parameters(config_of(out / name))[TRUST_PARAM] == f"/models/{TRUST_LIST_NAME}"
    assert config_of(out / (name + GRAPH_SUFFIX))["instance_group"][0]["kind"] == ["KIND_CPU"]
    TrustedArchive(out / name / "1" / "archive", out / TRUST_LIST_NAME)
    before = sha256_file(out / TRUST_LIST_NAME)
    assert flannel_main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert sha256_file(out / TRUST_LIST_NAME) == before  # the first repository stays whole

    other = shutil.copytree(checked_run, tmp_path / "other")
    write_manifest(other / "export", read_manifest(other / "export"))  # a new export manifest
    with pytest.raises(TritonExportError, match="another export"):
        export_triton_repository(other, tmp_path / "repo2", archive=mar)
    assert not (tmp_path / "repo2").exists()
    with pytest.raises(TritonExportError, match="absolute"):
        export_triton_repository(checked_run, tmp_path / "repo3", mount_path="models")


@pytest.mark.slow
def test_gated_engine_becomes_a_tensorrt_plan(checked_run, name, tmp_path):
    """An engine cannot be built without a GPU: a stand-in file takes its place in the manifest,
    recorded as gated, to check what the repository does with it."""
    run = shutil.copytree(checked_run, tmp_path / "run")
    export = run / "export"
    engine = export / "model.fp16.engine"
    engine.write_bytes(np.random.default_rng(1).bytes(4096))
    manifest = read_manifest(export)
    manifest["artifacts"][TENSORRT_FP16] = artifact_entry(
        export, engine, max_batch=16, gpu="NVIDIA H200", compute_capability="9.0",
        tensorrt_version="11.4.0.106", gate={"passed": True, "name": "fp16"})
    write_manifest(export, manifest)
    repo = export_triton_repository(run, tmp_path / "repo")
    plan_dir = repo / (name + PLAN_SUFFIX)
    assert (plan_dir / "1" / "model.plan").read_bytes() == engine.read_bytes()
    config = config_of(plan_dir)
    graph = config_of(repo / (name + GRAPH_SUFFIX))
    assert config["platform"] == ["tensorrt_plan"] and "backend" not in config
    assert config["max_batch_size"] == [16]  # the engine's profile ends there
    assert config["instance_group"][0]["kind"] == ["KIND_GPU"]
    assert (config["input"], config["output"]) == (graph["input"], graph["output"])
    assert "11.4.0.106" in (plan_dir / "config.pbtxt").read_text()
    # The Python model still sends its batches (up to 32 images) to the ONNX graph.
    assert parameters(config_of(repo / name))[GRAPH_PARAM] == name + GRAPH_SUFFIX


def test_only_a_gated_engine_is_served():
    entry = {"path": "model.fp16.engine", "sha256": "0" * 64, "bytes": 1}
    gated = {**entry, "gate": {"passed": True}}
    for artifacts, want in (({}, None),
                            ({TENSORRT_FP16: {**entry, "gate": {"passed": False}}}, None),
                            ({TENSORRT_FP16: entry}, None),
                            ({TENSORRT_FP32: gated}, "tensorrt-fp32"),
                            ({TENSORRT_FP16: gated, TENSORRT_FP32: gated}, "tensorrt-fp16")):
        spec, line = tensorrt_plan({"artifacts": artifacts})
        assert (spec.name if spec else None) == want, artifacts
        assert line.startswith("no TensorRT plan") == (want is None)


def test_graph_config_declares_per_image_scores_with_a_reshape():
    text = graph_model_config(
        "m_graph", [TensorSpec("image", "TYPE_FP32", (1, 64, 64))],
        [TensorSpec("probabilities", "TYPE_FP32", (3,)), TensorSpec("ood_score", "TYPE_FP32", ())],
        max_batch_size=32, preferred_batch=8, instance_kind="KIND_GPU", backend="onnxruntime",
        notes=("a note",))
    config = parse_pbtxt(text)
    assert text.startswith("# a note\n")
    assert config["output"][1] == {"name": ["ood_score"], "data_type": ["TYPE_FP32"], "dims": [1],
                                   "reshape": [{"shape": []}]}
    assert config["dynamic_batching"][0]["preferred_batch_size"] == [8, 32]
    small = parse_pbtxt(graph_model_config("m", [], [], max_batch_size=4, preferred_batch=8,
                                           instance_kind="KIND_CPU", platform="tensorrt_plan"))
    assert small["dynamic_batching"][0]["preferred_batch_size"] == [4]


# --- a full Triton, where one exists --------------------------------------------------------

def _gpu_problem() -> str | None:
    if shutil.which("tritonserver") is None:
        return "no full Triton (`tritonserver` with the onnxruntime backend) on PATH"
    from flannel.hardware import cuda_problem

    return cuda_problem()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(_gpu_problem() is not None, reason=f"full Triton on a GPU: {_gpu_problem()}")
def test_full_triton_serves_the_graph_like_onnx_runtime(repo, name, tmp_path):
    """Only on a GPU host with a full Triton install: the graph model (and the plan, where one
    was gated) loads and answers like ONNX Runtime on the CPU, within the fp32 tolerance."""
    import onnxruntime as ort
    import requests

    from flannel.artifacts import FP16, FP32
    from flannel.handlers.ports import free_ports

    served = tmp_path / "repo"
    served.mkdir()
    for model in (name + GRAPH_SUFFIX, name + PLAN_SUFFIX):
        if (repo / model).is_dir():
            shutil.copytree(repo / model, served / model)
    http, grpc_port, metrics = free_ports(3)
    proc = subprocess.Popen(["tritonserver", f"--model-repository={served}",
                             "--model-control-mode=none", f"--http-port={http}",
                             f"--grpc-port={grpc_port}", f"--metrics-port={metrics}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        else:
            pytest.fail("Triton did not become ready in 180 s")
        config = config_of(served / (name + GRAPH_SUFFIX))
        dims = config["input"][0]["dims"]
        batch = np.random.default_rng(0).random((3, *dims), dtype=np.float32)
        session = ort.InferenceSession(str(served / (name + GRAPH_SUFFIX) / "1" / "model.onnx"))
        want = dict(zip([o.name for o in session.get_outputs()],
                        session.run(None, {config["input"][0]["name"][0]: batch})))
        for model in sorted(p.name for p in served.iterdir()):
            body = {"inputs": [{"name": config["input"][0]["name"][0], "datatype": "FP32",
                                "shape": list(batch.shape), "data": batch.ravel().tolist()}]}
            answer = requests.post(f"{url}/v2/models/{model}/infer", json=body, timeout=60)
            assert answer.status_code == 200, answer.text
            for out in answer.json()["outputs"]:
                got = np.array(out["data"], np.float32).reshape(out["shape"])
                ref = want[out["name"]].reshape(got.shape)
                tol = FP16.atol if model.endswith(PLAN_SUFFIX) else FP32.atol
                print(f"{model} {out['name']}: max |diff| {np.abs(got - ref).max():.2e}")
                np.testing.assert_allclose(got, ref, atol=tol, rtol=1e-2)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


# --- the bundled Triton: the Python model decodes files and sends tensors through BLS --------

# The graph model's stand-in on the bundled server (which has the Python backend only): the
# same ONNX file on ONNX Runtime, answering each request its rows in the shapes the onnxruntime
# backend gives callers (the declared dims: a per-image score as [N, 1]).
GRAPH_STAND_IN = '''"""ONNX Runtime behind Triton's Python backend, as the onnxruntime backend would run it."""
import json

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        folder = f"{args['model_repository']}/{args['model_version']}"
        self.session = ort.InferenceSession(f"{folder}/model.onnx",
                                            providers=["CPUExecutionProvider"])
        self.input = config["input"][0]["name"]
        self.outputs = [o["name"] for o in config["output"]]
        self.reshaped = {o["name"] for o in config["output"] if o.get("reshape")}

    def execute(self, requests):
        parts = [pb_utils.get_input_tensor_by_name(r, self.input).as_numpy() for r in requests]
        names = [o.name for o in self.session.get_outputs()]
        out = dict(zip(names, self.session.run(None, {self.input: np.concatenate(parts)})))
        responses, start = [], 0
        for part in parts:
            n = len(part)
            tensors = []
            for name in self.outputs:
                rows = out[name][start:start + n]
                if name in self.reshaped:
                    rows = rows.reshape(n, 1)
                tensors.append(pb_utils.Tensor(name, np.ascontiguousarray(rows)))
            responses.append(pb_utils.InferenceResponse(tensors))
            start += n
        return responses
'''



@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(triton_problem() is not None,
                    reason=f"bundled Triton: {triton_problem()}")
def test_bundled_triton_serves_files_through_the_python_model_and_bls(checked_run, name,
                                                                      tmp_path):
    """The repository on the bundled server, its graph model on a Python stand-in running the
    same ONNX file: files sent to the Python model over v2 REST and gRPC are decoded with the
    product's code and run through BLS on the graph model; the answers equal offline ONNX
    Runtime on the export, policy fields included."""
    import requests

    from flannel.handlers.client import Client
    from flannel.handlers.triton_process import start_triton, stop_triton
    from flannel.handlers.ts_config import loopback_config
    from test_serving_integration import REPO, Offline, png_file

    repo = tmp_path / "repo"
    export_triton_repository(checked_run, repo, device="cpu", mount_path=str(repo))
    graph = repo / (name + GRAPH_SUFFIX)
    config_text = (graph / "config.pbtxt").read_text()
    assert 'backend: "onnxruntime"' in config_text
    (graph / "config.pbtxt").write_text(config_text.replace('backend: "onnxruntime"',
                                                            'backend: "python"'))
    (graph / "1" / "model.py").write_text(GRAPH_STAND_IN)
    (tmp_path / "store").mkdir()
    config = loopback_config(tmp_path / "config.properties", tmp_path / "store",
                             REPO / "config.properties")
    pngs = [png_file(tmp_path / f"img{i}.png", seed=i) for i in range(6)]
    offline = Offline(checked_run / "export")
    info = start_triton(config, repository=repo, timeout=180)
    try:
        assert sorted(info.models) == sorted([name, name + GRAPH_SUFFIX])
        client = Client.from_config(config, model=name)
        for protocol in ("v2", "v2-grpc"):
            for path, result in zip(pngs, client.predict(pngs, protocol=protocol)):
                assert result.ok, result.summary()
                got = np.array(list(result.probabilities.values()))
                np.testing.assert_allclose(got, offline(path), atol=1e-5)
                fields = offline.fields(path)
                assert result.policy_field("decision") == fields["decision"]
                assert result.policy_field("ood_score") == pytest.approx(fields["ood_score"],
                                                                         rel=1e-4, abs=1e-6)
        metrics = requests.get(f"{info.metrics_url}/metrics", timeout=10).text
        # Every image went through the graph model (the Python model's dynamic batches arrive
        # as one BLS request each).
        images = re.search(rf'nv_inference_count\{{model="{name}{GRAPH_SUFFIX}",'
                           rf'version="1"\}} (\d+)', metrics)
        assert images and int(images[1]) == 2 * len(pngs), metrics[:2000]
    finally:
        stop_triton(config)
