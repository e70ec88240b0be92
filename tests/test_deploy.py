"""Container and Kubernetes recipes, rendered and checked.

    .venv/bin/pytest tests/test_deploy.py -q

No image is built or run here (no container daemon on these machines: `docker` is a client
only), so the recipes are checked as far as they can be without one: the Dockerfile's set-up is
the README's, every file it copies exists, its configs are the repository's with only the
documented lines changed; every YAML document of `deploy/` parses, every pod and container is
hardened, every probe names a route or command that exists, one Secret serves every replica,
no image is tagged `latest`, the NetworkPolicies restrict ingress and egress, and the proxy's
nginx.conf is exactly what `flannel serve proxy-config` writes. The parts of the pod that can run
without a container runtime then run for real, on loopback: one TorchServe started from the
pod's config (`container_config(behind_proxy=True)`) and, where nginx is installed, the pod's
nginx.conf in front of it: no key gets 401 over HTTP and UNAUTHENTICATED over gRPC, the Secret's
key gets the answer, the probe port and the probe command pass, and both fail once the server
is down. The Triton recipe (`deploy/kserve-triton.yaml`, the repository of `flannel export
triton` on KServe) is held to the same hardening, and its Triton arguments are checked: the
repository where the export says it is mounted, every API but health behind the Secret's key,
one GPU, health routes for the probes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from flannel.handlers.proxy import (SECRET_MAP_ENTRY, ProxyLayout, keys_map, new_key,
                                    nginx_config, proxy_secret)
from flannel.handlers.ts_config import (BEHIND_PROXY_PORTS, container_config, loopback_config,
                                        read_properties)

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
# Where the image keeps the code and configs (root's, read-only to the server) and where
# TorchServe runs (its key file and logs): the Dockerfile's two WORKDIRs.
IMAGE_ROOT = "/srv/flannel"
STATE_DIR = "/var/lib/flannel"
SECRET_NAME = "flannel-cxr-keys"
PROJECT_VERSION = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)[1]


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


def documents(name: str) -> list[dict]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) and "kind" in d for d in docs), name
    return docs


def by_kind(name: str) -> dict[str, dict]:
    docs = documents(name)
    kinds = {d["kind"]: d for d in docs}
    assert len(kinds) == len(docs), f"{name}: one document per kind"
    return kinds


def pod_specs() -> dict[str, dict]:
    """Every pod spec of the recipes: the Deployment's template and KServe's predictor."""
    return {"kubernetes.yaml": by_kind("kubernetes.yaml")["Deployment"]["spec"]["template"]["spec"],
            "kserve.yaml": by_kind("kserve.yaml")["InferenceService"]["spec"]["predictor"]}


# KServe serving the Triton repository of `flannel export triton`: one Triton container, no proxy.
TRITON_RECIPE = "kserve-triton.yaml"


def triton_predictor() -> tuple[dict, dict]:
    """(pod spec, Triton container) of the Triton recipe's predictor."""
    predictor = by_kind(TRITON_RECIPE)["InferenceService"]["spec"]["predictor"]
    return predictor, predictor["model"]


def hardened_pods() -> dict[str, tuple[dict, list[dict]]]:
    """Every pod spec of the recipes with its containers: ``pod_specs`` and the Triton one."""
    pods = {name: (spec, spec["containers"]) for name, spec in pod_specs().items()}
    spec, triton = triton_predictor()
    pods[TRITON_RECIPE] = (spec, [triton])
    return pods


def image_config(tmp_path: Path, behind_proxy: bool) -> Path:
    """The config the image writes (Dockerfile RUN), written here the same way."""
    name = "config.proxied.properties" if behind_proxy else "config.properties"
    return container_config(REPO / "config.properties", tmp_path / name, behind_proxy=behind_proxy,
                            model_store=f"{IMAGE_ROOT}/model_store")


def torchserve_and_proxy(spec: dict) -> tuple[dict, dict]:
    """(TorchServe container, proxy container) of a pod spec: the proxy runs nginx."""
    proxy = [c for c in spec["containers"] if c["command"][0] == "nginx"]
    server = [c for c in spec["containers"] if "torchserve" in c["command"][0]]
    assert len(proxy) == 1 and len(server) == 1 and len(spec["containers"]) == 2
    return server[0], proxy[0]


def flannel_parser() -> argparse.ArgumentParser:
    from flannel.handlers import serve_cli

    parser = argparse.ArgumentParser(prog="flannel serve")
    serve_cli.register(parser)
    return parser


# --- configs -------------------------------------------------------------------------------


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


def test_behind_proxy_config_puts_everything_on_loopback_without_own_keys(tmp_path):
    host = read_properties(REPO / "config.properties")
    pod = read_properties(image_config(tmp_path, behind_proxy=True))
    assert pod["inference_address"] == f"http://127.0.0.1:{BEHIND_PROXY_PORTS['inference_address']}"
    assert pod["grpc_inference_port"] == str(BEHIND_PROXY_PORTS["grpc_inference_port"])
    assert pod["management_address"] == "http://127.0.0.1:8081"
    assert pod["metrics_address"] == "http://127.0.0.1:8082"
    assert pod["grpc_inference_address"] == pod["grpc_management_address"] == "127.0.0.1"
    assert pod["disable_token_authorization"] == "true"
    assert pod["model_store"] == f"{IMAGE_ROOT}/model_store"
    changed = {k for k in pod if host.get(k) != pod[k]}
    assert changed == {"inference_address", "grpc_inference_port", "disable_token_authorization",
                       "model_store"}
    # The pod's containers share one network namespace: TorchServe's ports and nginx's differ.
    torchserve_ports = {int(pod[k].rsplit(":", 1)[1]) for k in
                        ("inference_address", "management_address", "metrics_address")}
    torchserve_ports |= {int(pod["grpc_inference_port"]), int(pod["grpc_management_port"])}
    layout = ProxyLayout()
    nginx_ports = {layout.http_port, layout.grpc_port, layout.probe_port}
    assert len(torchserve_ports) == 5 and len(nginx_ports) == 3
    assert not torchserve_ports & nginx_ports, torchserve_ports & nginx_ports


def test_https_addresses_keep_their_scheme(tmp_path):
    template = tmp_path / "tls.properties"
    template.write_text("inference_address=https://127.0.0.1:8443\n"
                        "management_address=https://127.0.0.1:8444\n"
                        "metrics_address=http://127.0.0.1:8082\n"
                        "grpc_inference_address=127.0.0.1\ngrpc_inference_port=7070\n"
                        "grpc_management_port=7071\nmodel_store=model_store\n")
    box = read_properties(container_config(template, tmp_path / "box.properties"))
    assert box["inference_address"] == "https://0.0.0.0:8443"
    assert box["management_address"] == "https://127.0.0.1:8444"
    pod = read_properties(container_config(template, tmp_path / "pod.properties", behind_proxy=True))
    assert pod["inference_address"] == "https://127.0.0.1:8180"
    assert pod["management_address"] == "https://127.0.0.1:8444"
    assert pod["metrics_address"] == "http://127.0.0.1:8082"
    private = read_properties(loopback_config(tmp_path / "lo.properties", tmp_path / "s", template))
    assert re.fullmatch(r"https://127\.0\.0\.1:\d+", private["inference_address"])
    assert re.fullmatch(r"https://127\.0\.0\.1:\d+", private["management_address"])
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", private["metrics_address"])
    assert private["inference_address"] != "https://127.0.0.1:8443"
    # The proxy follows an https TorchServe with an https upstream.
    conf = nginx_config(tmp_path / "pod.properties")
    assert "upstream torchserve { server 127.0.0.1:8180 " in conf
    assert "proxy_pass https://torchserve;" in conf and "proxy_pass https://127.0.0.1:8180/ping;" in conf


# --- Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_sets_up_like_the_readme_and_copies_what_exists():
    steps = dockerfile()
    runs = [args for op, args in steps if op == "RUN"]
    assert "make setup" in runs, runs
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme  # both run `make setup` first
    assert "setup: $(STAMP)" in (REPO / "Makefile").read_text()
    assert any("flannel serve container-config config.properties" in r for r in runs)
    assert any("flannel serve container-config config.proxied.properties --behind-proxy" in r
               for r in runs)
    from flannel.handlers.trust import TRUST_LIST_NAME

    # Build outputs of `flannel archive`: the archives and, beside their folder, the trust list.
    built = {"model_store/", TRUST_LIST_NAME}
    for op, args in steps:
        if op == "COPY":
            *sources, _ = shlex.split(args)
            for src in sources:
                assert src in built or (REPO / src).exists(), f"COPY {src}: not in the repository"
    assert f"COPY {TRUST_LIST_NAME} ./" in [f"{op} {a}" for op, a in steps]
    package_dirs = {"flannel", "train", "export", "handlers", "benchmarks"}
    copied = {shlex.split(a)[0].rstrip("/") for op, a in steps if op == "COPY"}
    assert package_dirs <= copied, package_dirs - copied
    cmd = shlex.split(next(args for op, args in steps if op == "CMD").replace(",", " ").strip("[]"))
    assert cmd[0] == f"{IMAGE_ROOT}/.venv/bin/torchserve"
    assert "--foreground" in cmd and "--ncs" in cmd
    assert cmd[cmd.index("--ts-config") + 1] == f"{IMAGE_ROOT}/config.properties"


def test_dockerfile_runs_as_a_numeric_user_that_cannot_change_the_code():
    steps = dockerfile()
    users = [args for op, args in steps if op == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), users
    uid = users[-1].split(":")[0]
    setup = " ".join(args for op, args in steps if op == "RUN")
    assert f"--uid {uid}" in setup
    assert "chown" not in setup, "the code and configs stay root's"
    assert "chmod -R a+rX,go-w /srv/flannel" in setup  # readable whatever umask built it
    assert f"install -d -o {uid} -g {uid} -m 0700 {STATE_DIR}" in setup
    workdirs = [args for op, args in steps if op == "WORKDIR"]
    assert workdirs[0] == IMAGE_ROOT and workdirs[-1] == STATE_DIR
    base = next(args for op, args in steps if op == "ARG" and args.startswith("PYTHON_IMAGE="))
    name, _, tag = base.split("=", 1)[1].rpartition(":")
    assert name == "python" and re.match(r"3\.11\.\d+-", tag), base


def test_dockerfile_environment_is_what_the_launcher_gives(tmp_path, monkeypatch):
    """The recipes start TorchServe's launcher themselves: the image's ENV must carry what
    `flannel serve start` adds to its environment, with the image's paths."""
    from flannel.handlers import trust, ts_process
    from flannel.handlers.ts_config import server_info

    env = dict(item.split("=", 1) for op, args in dockerfile() if op == "ENV"
               for item in shlex.split(args))
    monkeypatch.delenv(trust.TRUST_LIST_ENV, raising=False)
    (tmp_path / "store").mkdir()
    launcher = ts_process._launcher_env(server_info(loopback_config(
        tmp_path / "c.properties", tmp_path / "store", REPO / "config.properties")))
    added = {k: v for k, v in launcher.items() if os.environ.get(k) != v}
    # Folders of this server's own: the image's TorchServe writes under its working folder.
    per_server = {"TMPDIR", "TEMP", "LOG_LOCATION", "METRICS_LOCATION"}
    for key in set(added) - per_server:
        assert key in env, f"Dockerfile ENV lacks {key}"
        if key != trust.TRUST_LIST_ENV:
            assert env[key] == added[key], key
    assert env[trust.TRUST_LIST_ENV] == str(trust.trust_list_path(f"{IMAGE_ROOT}/model_store", {}))
    assert env["HOME"] == STATE_DIR
    for spec in pod_specs().values():
        for c in spec["containers"]:
            assert not {e["name"] for e in c.get("env", [])} & set(env), c["name"]


def test_dockerfile_healthcheck_is_the_probe_command_with_the_key():
    steps = dockerfile()
    (check,) = [args for op, args in steps if op == "HEALTHCHECK"]
    options, _, command = check.partition(" CMD ")
    assert "--timeout=5s" in options and "--start-period=" in options
    argv = yaml.safe_load(command)  # exec form: a JSON list
    assert argv[0] == f"{IMAGE_ROOT}/.venv/bin/flannel" and argv[1:3] == ["serve", "probe"]
    args = flannel_parser().parse_args(argv[2:])
    assert args.func.__name__ == "run_probe"
    assert args.config == f"{IMAGE_ROOT}/config.properties" and args.workdir == STATE_DIR


# --- Kubernetes and KServe -----------------------------------------------------------------


def test_every_pod_and_container_is_hardened():
    for name, (spec, containers) in hardened_pods().items():
        assert spec["automountServiceAccountToken"] is False, name
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0 and pod["runAsGroup"] > 0, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for c in containers:
            where = f"{name}: {c.get('name', 'model')}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["runAsNonRoot"] is True and sc["seccompProfile"] == {"type": "RuntimeDefault"}
            assert "privileged" not in sc and "runAsUser" not in sc, where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), where


def test_writable_paths_are_empty_dirs():
    for name, spec in pod_specs().items():
        empty = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        server, proxy = torchserve_and_proxy(spec)
        mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
        assert server["workingDir"] == STATE_DIR, name
        assert mounts[STATE_DIR] in empty and mounts["/tmp"] in empty, name
        assert {m["name"] for m in server["volumeMounts"]} <= empty, name  # nothing else mounted
        pmounts = {m["mountPath"]: m for m in proxy["volumeMounts"]}
        assert pmounts[ProxyLayout().temp_dir]["name"] in empty, name
        for path, mount in pmounts.items():
            if mount["name"] not in empty:
                assert mount["readOnly"] is True, f"{name}: {path}"
        assert all(v["emptyDir"].get("sizeLimit") for v in spec["volumes"] if "emptyDir" in v)


def test_images_are_versioned_never_latest():
    for name, spec in pod_specs().items():
        server, proxy = torchserve_and_proxy(spec)
        for c in spec["containers"]:
            image = c["image"]
            ref = image.split("@", 1)[0]
            repo, sep, tag = ref.rpartition(":")
            assert sep and "/" not in tag and tag != "latest", f"{name}: {image}"
            assert re.fullmatch(r"\d+\.\d+\.\d+(-[a-z0-9.]+)?", tag), f"{name}: {image}"
        # The server's image is tagged with the project's version, as the README builds it.
        assert server["image"].rsplit(":", 1)[1] == PROJECT_VERSION, name
        assert proxy["image"].split("/")[-1].startswith("nginx:"), name
    readme = (REPO / "README.md").read_text()
    assert f"flannel-cxr:{PROJECT_VERSION}" in readme and "@sha256:" in readme


def test_one_secret_serves_every_replica(tmp_path):
    layout = ProxyLayout()
    pod_config = read_properties(image_config(tmp_path, behind_proxy=True))
    for name, spec in pod_specs().items():
        server, proxy = torchserve_and_proxy(spec)
        # TorchServe runs the behind-the-proxy config: no keys of its own, nothing off loopback.
        ts = server["command"]
        assert ts[ts.index("--ts-config") + 1] == f"{IMAGE_ROOT}/config.proxied.properties", name
        assert pod_config["disable_token_authorization"] == "true"
        assert all("127.0.0.1" in pod_config[k] for k in (
            "inference_address", "management_address", "metrics_address",
            "grpc_inference_address", "grpc_management_address"))
        assert "ports" not in server, f"{name}: TorchServe publishes nothing; the proxy does"
        # The proxy reads its keys from the one Secret, mounted where nginx.conf includes them.
        secrets = [v for v in spec["volumes"] if "secret" in v]
        assert [v["secret"]["secretName"] for v in secrets] == [SECRET_NAME], name
        (volume,) = secrets
        assert volume["secret"]["items"] == [{"key": SECRET_MAP_ENTRY, "path": SECRET_MAP_ENTRY}]
        assert volume["secret"]["defaultMode"] == 0o440
        (mount,) = [m for m in proxy["volumeMounts"] if m["name"] == volume["name"]]
        assert f"{mount['mountPath']}/{SECRET_MAP_ENTRY}" == layout.keys_map, name
        assert not any(m["name"] == volume["name"] for m in server["volumeMounts"])
    secret = yaml.safe_load(proxy_secret(SECRET_NAME, [new_key()]))
    assert secret["metadata"]["name"] == SECRET_NAME and secret["kind"] == "Secret"
    assert f"--name {SECRET_NAME}" in (REPO / "README.md").read_text()
    deployment = by_kind("kubernetes.yaml")["Deployment"]
    assert deployment["spec"]["replicas"] >= 2


def test_proxy_config_maps_are_what_flannel_writes(tmp_path):
    expected = nginx_config(image_config(tmp_path, behind_proxy=True))
    for name in ("kubernetes.yaml", "kserve.yaml"):
        spec = pod_specs()[name]
        (cm_volume,) = [v for v in spec["volumes"] if "configMap" in v]
        config_map = by_kind(name)["ConfigMap"]
        assert config_map["metadata"]["name"] == cm_volume["configMap"]["name"]
        assert config_map["data"]["nginx.conf"] == expected, f"{name}: regenerate with " \
            "`flannel serve proxy-config` for config.proxied.properties"
        _, proxy = torchserve_and_proxy(spec)
        conf_dir = next(m["mountPath"] for m in proxy["volumeMounts"] if m["name"] == cm_volume["name"])
        assert proxy["command"] == ["nginx", "-e", "stderr", "-c", f"{conf_dir}/nginx.conf"], name


def test_proxy_caps_the_requests_that_reach_torchserve(tmp_path):
    """TorchServe 0.12 limits no connections itself; its frontend heap survives 16 concurrent
    maximum-size uploads (SECURITY.md, "Frontend memory"), so the proxy lets no more through."""
    conf = nginx_config(image_config(tmp_path, behind_proxy=True))
    caps = dict(re.findall(r"upstream (\w+) \{ server 127\.0\.0\.1:\d+ max_conns=(\d+); \}", conf))
    assert set(caps) == {"torchserve", "torchserve_grpc"}
    assert sum(map(int, caps.values())) <= 16 and min(map(int, caps.values())) >= 1
    assert "proxy_pass http://torchserve;" in conf and "grpc_pass grpc://torchserve_grpc;" in conf
    assert "proxy_request_buffering on;" in conf  # whole bodies only, before a slot is taken
    assert "16 concurrent maximum-size uploads are safe" in (REPO / "SECURITY.md").read_text()


def _container_port(container: dict, port) -> int:
    """A probe's port: a number as written (a probe may use a port the container does not
    declare, as KServe's one-port proxy does), a name looked up in the container's ports."""
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return found


def test_probes_name_routes_and_commands_that_exist(tmp_path):
    layout = ProxyLayout()
    conf = nginx_config(image_config(tmp_path, behind_proxy=True))
    probe_server = conf[conf.index(f"listen {layout.listen_host}:{layout.probe_port};"):]
    dockerfile_configs = {f"{IMAGE_ROOT}/{m}" for op, a in dockerfile() if op == "RUN"
                          for m in re.findall(r"container-config (\S+)", a)}
    seen = set()
    for name, spec in pod_specs().items():
        server, proxy = torchserve_and_proxy(spec)
        assert "readinessProbe" in proxy and "startupProbe" in server and "livenessProbe" in server
        for container in (server, proxy):
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(kind)
                if probe is None:
                    continue
                where = f"{name}: {container['name']} {kind}"
                assert probe.get("timeoutSeconds", 1) >= 5 or "tcpSocket" in probe, where
                if "exec" in probe:
                    argv = probe["exec"]["command"]
                    assert argv[0] == f"{IMAGE_ROOT}/.venv/bin/flannel" and argv[1:3] == ["serve", "probe"]
                    args = flannel_parser().parse_args(argv[2:])
                    assert args.func.__name__ == "run_probe" and args.config in dockerfile_configs
                    assert args.config.endswith("config.proxied.properties"), where
                    seen.add("exec")
                elif "httpGet" in probe:
                    assert container is proxy, where
                    port = _container_port(proxy, probe["httpGet"]["port"])
                    assert port == layout.probe_port, where
                    assert f"location = {probe['httpGet']['path']} {{" in probe_server, where
                    seen.add("http")
                else:
                    assert _container_port(container, probe["tcpSocket"]["port"]) in {
                        layout.http_port, layout.probe_port}, where
    assert seen == {"exec", "http"}


def test_network_policies_restrict_ingress_and_egress():
    for name in ("kubernetes.yaml", "kserve.yaml", TRITON_RECIPE):
        policy = by_kind(name)["NetworkPolicy"]["spec"]
        assert set(policy["policyTypes"]) == {"Ingress", "Egress"}, name
        assert policy["egress"] == [], f"{name}: the server needs no egress"
        (rule,) = policy["ingress"]
        assert rule["from"] and all("podSelector" in f for f in rule["from"]), name
        ports = {p["port"] for p in rule["ports"]}
        assert ProxyLayout().probe_port not in ports and ports <= {8080, 7070}, name
    deployment = by_kind("kubernetes.yaml")
    selector = deployment["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= deployment["Deployment"]["spec"]["template"]["metadata"]["labels"].items()


def test_ports_agree_between_config_image_and_manifests(tmp_path):
    box = read_properties(container_config(REPO / "config.properties", tmp_path / "c.properties"))
    served = {int(box["inference_address"].rsplit(":", 1)[1]), int(box["grpc_inference_port"])}
    exposed = {int(p) for op, args in dockerfile() if op == "EXPOSE" for p in args.split()}
    assert exposed == served
    layout = ProxyLayout()
    assert {layout.http_port, layout.grpc_port} == served
    kinds = by_kind("kubernetes.yaml")
    assert set(kinds) == {"Deployment", "Service", "NetworkPolicy", "ConfigMap"}
    _, proxy = torchserve_and_proxy(pod_specs()["kubernetes.yaml"])
    named = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert named == {"http": layout.http_port, "grpc": layout.grpc_port, "probe": layout.probe_port}
    service = kinds["Service"]["spec"]["ports"]
    assert {p["port"] for p in service} == served
    assert {named[p["targetPort"]] for p in service} == served  # never the probe port
    _, kproxy = torchserve_and_proxy(pod_specs()["kserve.yaml"])
    assert {p["containerPort"] for p in kproxy["ports"]} == {layout.http_port}
    assert kproxy["image"] == proxy["image"]
    assert torchserve_and_proxy(pod_specs()["kserve.yaml"])[0]["image"] == \
        torchserve_and_proxy(pod_specs()["kubernetes.yaml"])[0]["image"]
    kserve_containers = [c["name"] for c in pod_specs()["kserve.yaml"]["containers"]]
    assert kserve_containers[0] == "kserve-container"


def test_proxy_keys_are_checked_before_they_reach_nginx():
    key = new_key()
    assert re.fullmatch(r"[0-9a-f]{64}", key) and key != new_key()
    assert keys_map([key]) == f'"Bearer {key}" 1;\n'
    for bad in ("", 'abc"; default 1; #', key.upper(), key[:-1]):
        with pytest.raises(ValueError):
            keys_map([bad])
    with pytest.raises(ValueError):
        keys_map([])
    old = new_key()
    secret = yaml.safe_load(proxy_secret(SECRET_NAME, [key, old]))
    assert secret["stringData"]["inference-key"] == key
    assert secret["stringData"][SECRET_MAP_ENTRY] == keys_map([key, old])


# --- KServe with Triton: the repository of `flannel export triton` --------------------------


def triton_args(container: dict) -> dict[str, list[str]]:
    """Triton's ``--option=value`` arguments, each option's values in order."""
    args: dict[str, list[str]] = {}
    for arg in container["args"]:
        assert arg.startswith("--"), arg
        option, _, value = arg[2:].partition("=")
        args.setdefault(option, []).append(value)
    return args


def test_triton_recipe_serves_the_exported_repository():
    from flannel.export.triton_export import DEFAULT_MOUNT_PATH

    isvc = by_kind(TRITON_RECIPE)["InferenceService"]
    assert set(by_kind(TRITON_RECIPE)) == {"InferenceService", "NetworkPolicy"}
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    spec, triton = triton_predictor()
    assert "containers" not in spec, "one container: Triton checks the key itself"
    assert triton["modelFormat"] == {"name": "triton"} and triton["protocolVersion"] == "v2"
    # A claim is mounted as it is: no storage initializer downloads anything (no egress).
    assert triton["storageUri"].startswith("pvc://")
    assert triton["command"] == ["tritonserver"]
    args = triton_args(triton)
    # The repository is where `flannel export triton --mount-path` says the trust list is.
    assert args["model-repository"] == [DEFAULT_MOUNT_PATH]
    assert args["model-control-mode"] == ["none"] and "disable-auto-complete-config" in args
    assert args["allow-grpc"][-1] == "false", "KServe routes one port: HTTP"
    (port,) = triton["ports"]
    assert args["http-port"] == [str(port["containerPort"])]
    assert args["metrics-port"] != args["http-port"]
    exit_timeout = int(args["exit-timeout-secs"][-1])
    assert spec["terminationGracePeriodSeconds"] > exit_timeout
    # Versioned with the project like the TorchServe image, in the same registry, never latest.
    image = triton["image"]
    assert image.split("/")[0] == pod_specs()["kserve.yaml"]["containers"][0]["image"].split("/")[0]
    assert image.split("@")[0].rsplit(":", 1)[1] == PROJECT_VERSION, image


def test_triton_recipe_restricts_every_api_but_health_to_the_secrets_key():
    from flannel.handlers.proxy import SECRET_KEY_ENTRY
    from flannel.handlers.triton_process import KEY_HEADER, RESTRICTED_APIS

    _, triton = triton_predictor()
    args = triton_args(triton)
    (restricted,) = args["http-restricted-api"]
    apis, _, header = restricted.partition(":")
    assert set(apis.split(",")) == set(RESTRICTED_APIS) and "health" not in apis
    name, _, value = header.partition("=")
    assert name == KEY_HEADER
    variable = re.fullmatch(r"Bearer \$\((\w+)\)", value)
    assert variable, f"the key comes from the environment, not this file: {value!r}"
    (env,) = [e for e in triton["env"] if e["name"] == variable[1]]
    assert env["valueFrom"]["secretKeyRef"] == {"name": SECRET_NAME, "key": SECRET_KEY_ENTRY}
    secret = yaml.safe_load(proxy_secret(SECRET_NAME, [new_key()]))
    assert SECRET_KEY_ENTRY in secret["stringData"]  # the Secret the README creates has it
    assert not any(re.search(r"[0-9a-f]{64}", a) for a in triton["args"])
    assert "grpc-restricted-protocol" in args or args["allow-grpc"][-1] == "false"


def test_triton_recipe_asks_for_one_gpu_and_writes_only_to_empty_dirs():
    spec, triton = triton_predictor()
    for kind in ("requests", "limits"):
        assert str(triton["resources"][kind]["nvidia.com/gpu"]) == "1", kind
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in triton["volumeMounts"]}
    assert all("emptyDir" in volumes[n] and volumes[n]["emptyDir"].get("sizeLimit")
               for n in mounts.values()), mounts
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert triton["workingDir"] in mounts and "/tmp" in mounts
    env = {e["name"]: e.get("value") for e in triton["env"]}
    assert env["HOME"] == triton["workingDir"] and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert not [v for v in spec["volumes"] if "secret" in v], "the key arrives through env"


def test_triton_probes_use_the_health_routes_that_need_no_key():
    _, triton = triton_predictor()
    (port,) = triton["ports"]
    routes = {"startupProbe": "/v2/health/ready", "readinessProbe": "/v2/health/ready",
              "livenessProbe": "/v2/health/live"}
    for kind, path in routes.items():
        probe = triton[kind]
        assert probe["httpGet"] == {"path": path, "port": port["containerPort"]}, kind
        assert probe["timeoutSeconds"] >= 5, kind
    policy = by_kind(TRITON_RECIPE)["NetworkPolicy"]["spec"]
    isvc = by_kind(TRITON_RECIPE)["InferenceService"]
    assert policy["podSelector"]["matchLabels"] == {
        "serving.kserve.io/inferenceservice": isvc["metadata"]["name"]}
    assert {p["port"] for p in policy["ingress"][0]["ports"]} == {port["containerPort"]}


# --- the pod's parts on loopback: one TorchServe, nginx in front ---------------------------

MODEL = "resnet18"
START_TIMEOUT_S = 150


def _wait_accepting(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
    """TorchServe from the pod's config on free loopback ports, serving a tiny learner.
    Yields (config, root); always stops the server."""
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs Java 17 and `java` is not on PATH")
    from flannel.export.onnx_export import export_onnx
    from flannel.export.parity import run_parity
    from flannel.handlers.archive import ArchiveSettings, build_archive
    from flannel.handlers.ts_process import start_server, stop_server
    from run_fixtures import add_tiny_external_evaluation, make_tiny_run

    root = tmp_path_factory.mktemp("pod")
    run = make_tiny_run(root, arch=MODEL, crop=64)
    export_onnx(run)
    run_parity(run)
    add_tiny_external_evaluation(run)
    build_archive(run, root / "store", settings=ArchiveSettings(
        batch_size=1, max_batch_delay_ms=10, workers=1, backend="ort-fp32", explanations=False))
    pod_config = container_config(REPO / "config.properties", root / "pod.properties", behind_proxy=True)
    config = loopback_config(root / "config.proxied.properties", root / "store", pod_config)
    try:
        start_server(config, timeout=START_TIMEOUT_S)
        yield config, root
    finally:
        stop_server(config)


@pytest.fixture(scope="module")
def proxy(pod):
    """The pod's nginx.conf on free loopback ports in front of ``pod``, with a fresh key."""
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light; .ci/run does)")
    from flannel.handlers.ports import free_ports

    config, root = pod
    key = new_key()
    (root / "keys").mkdir()
    (root / "keys" / SECRET_MAP_ENTRY).write_text(keys_map([key]))
    (root / "nginx-tmp").mkdir()
    http, grpc_port, probe = free_ports(3)
    layout = ProxyLayout(http_port=http, grpc_port=grpc_port, probe_port=probe,
                         listen_host="127.0.0.1", keys_map=str(root / "keys" / SECRET_MAP_ENTRY),
                         temp_dir=str(root / "nginx-tmp"))
    conf = root / "nginx.conf"
    conf.write_text(nginx_config(config, layout))
    with (root / "nginx.log").open("wb") as log:
        proc = subprocess.Popen(["nginx", "-e", "stderr", "-c", str(conf)], stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        for port in (http, grpc_port, probe):
            _wait_accepting(port)
        yield layout, key
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _png(root: Path) -> Path:
    import numpy as np
    from PIL import Image

    path = root / "probe.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (72, 72), dtype=np.uint8)).save(path)
    return path


def _probe_argv(config: Path) -> list[str]:
    """The pods' exec probe command, with this checkout's flannel and the test's config."""
    (argv,) = {tuple(c[k]["exec"]["command"]) for c in pod_specs()["kubernetes.yaml"]["containers"]
               for k in ("startupProbe", "livenessProbe") if "exec" in c.get(k, {})}
    argv = [sys.executable, "-m", "flannel.cli", *argv[1:]]
    argv[argv.index("--config") + 1] = str(config)
    return argv


@pytest.mark.integration
@pytest.mark.slow
def test_probe_command_passes_on_the_running_pod_server(pod):
    config, _ = pod
    done = subprocess.run(_probe_argv(config), capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Healthy" in done.stdout
    # Without a key file (token authorization off) the server still reports its ready workers.
    from flannel.handlers.ts_process import server_status

    assert not (config.parent / "key_file.json").exists()
    assert server_status(config).models == {MODEL: 1}


@pytest.mark.integration
@pytest.mark.slow
def test_proxy_needs_the_key_and_answers_with_it(pod, proxy):
    config, root = pod
    layout, key = proxy
    url = f"http://127.0.0.1:{layout.http_port}"
    body = _png(root).read_bytes()
    for headers in ({}, {"Authorization": "Bearer " + new_key()}, {"Authorization": key}):
        answer = requests.post(f"{url}/predictions/{MODEL}", data=body, headers=headers, timeout=30)
        assert answer.status_code == 401, (headers, answer.text)
        assert requests.get(f"{url}/ping", headers=headers, timeout=10).status_code == 401
    answer = requests.post(f"{url}/predictions/{MODEL}", data=body,
                           headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["model"] == MODEL and result["prediction"] in result["probabilities"]
    assert abs(sum(result["probabilities"].values()) - 1.0) < 1e-4
    # The probe port answers /ping alone, without a key, and only to GET.
    probe = f"http://127.0.0.1:{layout.probe_port}"
    ping = requests.get(f"{probe}/ping", timeout=10)
    assert ping.status_code == 200 and ping.json()["status"] == "Healthy"
    assert requests.post(f"{probe}/predictions/{MODEL}", data=body, timeout=10).status_code == 404
    assert requests.post(f"{probe}/ping", timeout=10).status_code == 403


@pytest.mark.integration
@pytest.mark.slow
def test_proxy_checks_the_key_over_grpc(pod, proxy, tmp_path, monkeypatch):
    import grpc

    from flannel.handlers import grpc_stubs

    monkeypatch.setenv(grpc_stubs.CACHE_ENV, str(tmp_path / "grpc"))
    _, root = pod
    layout, key = proxy
    stubs = grpc_stubs.load_stubs()
    request = stubs["inference_pb2"].PredictionsRequest(
        model_name=MODEL, input={"data": _png(root).read_bytes()})
    with grpc.insecure_channel(f"127.0.0.1:{layout.grpc_port}") as channel:
        stub = stubs["inference_pb2_grpc"].InferenceAPIsServiceStub(channel)
        for metadata in ([], [("authorization", f"Bearer {new_key()}")]):
            with pytest.raises(grpc.RpcError) as refused:
                stub.Predictions(request, metadata=metadata, timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.Predictions(request, metadata=[("authorization", f"Bearer {key}")], timeout=60)
    result = json.loads(reply.prediction.decode())
    assert result["model"] == MODEL and result["prediction"] in result["probabilities"]


@pytest.mark.integration
@pytest.mark.slow
def test_probes_fail_once_the_server_is_down(pod, request):
    """Last in this module: stops the server."""
    from flannel.handlers.ts_process import stop_server

    config, _ = pod
    assert stop_server(config)
    done = subprocess.run(_probe_argv(config), capture_output=True, text=True, timeout=30)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "ping" in done.stdout
    if shutil.which("nginx") is not None:
        layout, _ = request.getfixturevalue("proxy")
        assert requests.get(f"http://127.0.0.1:{layout.probe_port}/ping", timeout=10).status_code == 502
