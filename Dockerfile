# The served model as a container: the locked dependencies, Java 17, the archives in model_store/
# and the container's TorchServe config (the repository's, with inference on the container's
# interfaces: `flannel serve container-config`). Build it after `make demo` (or `flannel archive`) has
# written model_store/*.mar on a machine of the kind that will serve (see the README):
#
#   docker build -t flannel-cxr .
#   docker run --rm -p 127.0.0.1:8080:8080 -p 127.0.0.1:7070:7070 flannel-cxr
#   docker exec <container> cat /srv/flannel/key_file.json      # the inference key
FROM python:3.11-slim-bookworm

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
RUN .venv/bin/flannel serve container-config config.properties --config config.host.properties
COPY model_store/ model_store/
RUN useradd --uid 10001 --no-create-home flannel && chown -R flannel /srv/flannel
USER flannel

# Inference over HTTP and gRPC; management and metrics stay on the container's loopback.
EXPOSE 8080 7070
HEALTHCHECK --interval=30s --timeout=5s CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/ping', timeout=4)"
CMD [".venv/bin/torchserve", "--start", "--foreground", "--ncs", "--ts-config", "config.properties"]
