"""Container and Kubernetes recipes: no image is built here (no container daemon on these
machines), so the recipes are checked as far as they can be without one: the Dockerfile's set-up
is the README's, every file it copies exists, its config is the repository's with only the
inference addresses opened, and the ports agree between the config, the image and the manifests.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from flannel.handlers.ts_config import container_config, read_properties

REPO = Path(__file__).resolve().parents[1]


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, args = line.partition(" ")
            out.append((op.upper(), args.strip()))
    return out


def test_container_config_opens_only_inference(tmp_path):
    host = read_properties(REPO / "config.properties")
    box = read_properties(container_config(REPO / "config.properties", tmp_path / "c.properties"))
    assert box["inference_address"] == "http://0.0.0.0:8080"
    assert box["grpc_inference_address"] == "0.0.0.0"
    for key in ("management_address", "metrics_address", "grpc_management_address"):
        assert "127.0.0.1" in box[key], key
    changed = {k for k in host if host[k] != box.get(k)}
    assert changed == {"inference_address", "grpc_inference_address"}
    assert box["enable_model_api"] == "false" and "disable_token_authorization" not in box


def test_dockerfile_sets_up_like_the_readme_and_copies_what_exists():
    steps = dockerfile()
    runs = [args for op, args in steps if op == "RUN"]
    assert "make setup" in runs, runs
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme  # both run `make setup` first
    assert "setup: $(STAMP)" in (REPO / "Makefile").read_text()
    assert any("flannel serve container-config config.properties" in r for r in runs)
    for op, args in steps:
        if op == "COPY":
            *sources, _ = shlex.split(args)
            for src in sources:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"
    package_dirs = {"flannel", "train", "export", "handlers", "benchmarks"}
    copied = {shlex.split(a)[0].rstrip("/") for op, a in steps if op == "COPY"}
    assert package_dirs <= copied, package_dirs - copied
    cmd = next(args for op, args in steps if op == "CMD")
    assert "--foreground" in cmd and "config.properties" in cmd and "--ncs" in cmd
    assert any(op == "USER" and args != "root" for op, args in steps)


def test_ports_agree_between_config_image_and_manifests(tmp_path):
    box = read_properties(container_config(REPO / "config.properties", tmp_path / "c.properties"))
    served = {int(box["inference_address"].rsplit(":", 1)[1]), int(box["grpc_inference_port"])}
    exposed = {int(p) for op, args in dockerfile() if op == "EXPOSE" for p in args.split()}
    assert exposed == served
    docs = list(yaml.safe_load_all((REPO / "deploy" / "kubernetes.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Deployment", "Service", "NetworkPolicy"}
    (container,) = kinds["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert {p["containerPort"] for p in container["ports"]} == served
    assert container["readinessProbe"]["httpGet"] == {"path": "/ping", "port": 8080}
    assert {p["port"] for p in kinds["Service"]["spec"]["ports"]} == served
    kserve = yaml.safe_load((REPO / "deploy" / "kserve.yaml").read_text())
    (pred,) = kserve["spec"]["predictor"]["containers"]
    assert pred["image"] == container["image"]
    assert {p["containerPort"] for p in pred["ports"]} <= served
