# The served model as a container: the locked dependencies, Java 17, the archives in model_store/
# and two TorchServe configs derived from the repository's (`flannel serve container-config`):
# config.properties (standalone: inference on the container's interfaces, token authorization
# on) and config.proxied.properties (the Kubernetes pod's: every endpoint on loopback behind the
# pod's authenticating proxy; see deploy/kubernetes.yaml). Build it after `make demo` (or
# `flannel archive`) has written model_store/*.mar on a machine of the kind that will serve
# (see the README), tagged with the project's version:
#
#   docker build -t flannel-cxr:0.1.0 .
#   docker run --rm --read-only --tmpfs /tmp --tmpfs /var/lib/flannel:uid=10001,gid=10001 \
#       --cap-drop ALL --security-opt no-new-privileges \
#       -p 127.0.0.1:8080:8080 -p 127.0.0.1:7070:7070 flannel-cxr:0.1.0
#   docker exec <container> cat /var/lib/flannel/key_file.json      # the inference key
#
# Everything under /srv/flannel belongs to root and is read-only to the server's account
# (uid 10001); TorchServe runs in /var/lib/flannel, where it writes key_file.json and logs/.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE}

RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /srv/flannel
# The README's set-up command installs requirements.lock into .venv, then the project.
COPY pyproject.toml requirements.lock Makefile README.md ./
COPY flannel/ flannel/
COPY train/ train/
COPY export/ export/
COPY handlers/ handlers/
COPY benchmarks/ benchmarks/
RUN make setup

COPY config.properties config.host.properties
RUN .venv/bin/flannel serve container-config config.properties --config config.host.properties \
        --model-store /srv/flannel/model_store \
    && .venv/bin/flannel serve container-config config.proxied.properties --behind-proxy \
        --config config.host.properties --model-store /srv/flannel/model_store
# The archives, and the trust list `flannel archive` wrote beside model_store/: the workers load
# only archives listed there (flannel.handlers.trust).
COPY model_store/ model_store/
COPY trusted_archives.json ./
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /var/lib/flannel \
        --shell /usr/sbin/nologin flannel \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/flannel \
    && chmod -R a+rX,go-w /srv/flannel

# What `flannel serve start` gives TorchServe's launcher (ts_process._launcher_env), for a
# TorchServe started here without it.
ENV HOME=/var/lib/flannel PYTHONDONTWRITEBYTECODE=1 \
    FLANNEL_TRUST_LIST=/srv/flannel/trusted_archives.json
WORKDIR /var/lib/flannel
USER 10001:10001

# Inference over HTTP and gRPC; management and metrics stay on the container's loopback.
EXPOSE 8080 7070
# TorchServe refuses /ping without the inference key; the probe reads it from key_file.json.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["/srv/flannel/.venv/bin/flannel", "serve", "probe", "--config", "/srv/flannel/config.properties", "--workdir", "/var/lib/flannel"]
CMD ["/srv/flannel/.venv/bin/torchserve", "--start", "--foreground", "--ncs", "--ts-config", "/srv/flannel/config.properties"]
