# kvcluster node image.
#
#   docker build -t kvcluster .                       # from PyPI, on python:3.11-slim
#
# Without a registry or PyPI inside the build (this project's CI), build the
# base from Debian packages and the wheels on the host, then build offline:
#
#   scripts/build-image.sh --local-base               # does all of the below
#   scripts/build-base-image.sh                       # -> kvcluster-base:bookworm
#   pip wheel -c constraints.txt -w build/docker-wheels .
#   docker build --build-arg BASE_IMAGE=kvcluster-base:bookworm -t kvcluster .
#
# When build/docker-wheels holds wheels, they are the only package source
# (pip --no-index); otherwise pip installs from the index with the pinned
# constraints. Works with the classic builder and BuildKit (no heredocs, no
# RUN --mount; few steps, as each is a container commit in the classic
# builder), and on either base: `python3 -m venv` finds python3 in
# /usr/local/bin (python:*-slim) or /usr/bin (Debian).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
# Lets `docker image prune --filter label=org.kvcluster.stage=build` remove
# this stage's leftovers (the classic builder keeps them as untagged images).
LABEL org.kvcluster.stage=build
# .dockerignore limits the context to the sources, README, constraints,
# docker/ and the optional wheelhouse build/docker-wheels/.
COPY . /src
RUN set -e; cd /src; \
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1; \
    python3 -m venv /opt/kvcluster; \
    if ls build/docker-wheels/*.whl >/dev/null 2>&1; then \
      echo "installing from the wheelhouse build/docker-wheels (no index)"; \
      /opt/kvcluster/bin/pip install --no-index --find-links build/docker-wheels \
        -c constraints.txt kvcluster; \
    else \
      echo "installing from the package index"; \
      /opt/kvcluster/bin/pip install -c constraints.txt .; \
    fi; \
    cp docker/healthcheck.py /opt/kvcluster/healthcheck.py; \
    /opt/kvcluster/bin/kvcluster-node --help >/dev/null

FROM ${BASE_IMAGE}
# The same path as in the build stage, so the venv's scripts keep working.
COPY --from=build /opt/kvcluster /opt/kvcluster
RUN useradd --user-group --uid 10001 --home-dir /var/lib/kvcluster --no-create-home \
      --shell /usr/sbin/nologin kvcluster \
 && mkdir -p /var/lib/kvcluster \
 && chown kvcluster:kvcluster /var/lib/kvcluster
# A single container is a one-node cluster advertising 127.0.0.1:7101:
#   docker run -d -p 127.0.0.1:7101:7101 -v kvdata:/var/lib/kvcluster kvcluster
# For a cluster set KVCLUSTER_NODE_ID, KVCLUSTER_ADVERTISE (an address the
# other nodes reach) and KVCLUSTER_SEEDS (see docker-compose.yml). Every
# setting of `kvcluster-node --help` can be given as KVCLUSTER_<NAME>.
ENV PATH=/opt/kvcluster/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    KVCLUSTER_LISTEN=0.0.0.0:7101 \
    KVCLUSTER_ADVERTISE=127.0.0.1:7101 \
    KVCLUSTER_DATA_DIR=/var/lib/kvcluster
LABEL org.opencontainers.image.title="kvcluster" \
      org.opencontainers.image.description="Replicated key-value database node (Dynamo / Riak KV lineage)"
USER kvcluster
VOLUME ["/var/lib/kvcluster"]
# 7101: gRPC (KV, Admin, health, reflection); 8101: Prometheus metrics;
# 9101: node-to-node messages (TCP, listen port + peer_port_offset).
EXPOSE 7101 8101 9101
# The standard gRPC health check: SERVING once the node has an agreed ring.
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/opt/kvcluster/bin/python", "/opt/kvcluster/healthcheck.py"]
ENTRYPOINT ["kvcluster-node"]
