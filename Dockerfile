# syntax=docker/dockerfile:1
#
# tf-serving-guard images. Two targets:
#   runtime        (default) the sidecar: the guard's core install only, no TensorFlow.
#   local-backend  the same plus the [tensorflow] extra, for `guard backend` / `guard demo`
#                  in compose or development. Never use it as the sidecar.
#
#   docker build -t tf-serving-guard .
#   docker build --target local-backend -t tf-serving-guard:local-backend .
#
# Configuration: mount a file at /etc/guard/guard.yaml (GUARD_CONFIG points there; the
# image ships a passthrough default) and/or set GUARD_LISTEN, GUARD_UPSTREAM,
# GUARD_REST_LISTEN, GUARD_REST_UPSTREAM, GUARD_METRICS_LISTEN. Not built in this project's CI (no Docker engine there): see
# docs/deploy.md.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---------------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
# A C compiler for the native modules: guard.dataplane._rank, the clean path of a rule
# (guard/dataplane/lanes.py), and guard.dataplane._walk, the response layout read in place
# (guard/dataplane/wire.py). It stays in this stage: the runtime image gets the built
# modules, not the toolchain. Unpinned on purpose: the stage is thrown away,
# and Debian's point releases remove pinned versions from the archive.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/guard
COPY pyproject.toml setup.py README.md ./
COPY guard/ guard/
# Exactly the sidecar's install: the package with no extras. The modules are
# optional in setup.py (an install without a compiler still works), so check
# here that the image has them. pip compiles the bytecode here: the runtime
# user cannot write it, so without it every start compiled numpy's, grpc's,
# aiohttp's and the guard's sources again (measured: 2.0-2.4 s to SERVING
# instead of 0.5 s, 1.9 s more CPU, 2.8 MB more idle RSS).
RUN /opt/guard/bin/pip install . \
    && /opt/guard/bin/python -c "import guard.cli, sys; assert 'tensorflow' not in sys.modules" \
    && /opt/guard/bin/python -c "import guard.dataplane._rank, guard.dataplane._walk"

# --------------------------------------------------------------- build with TensorFlow
FROM build AS build-tensorflow
RUN /opt/guard/bin/pip install ".[tensorflow]"

# ---------------------------------------------------------------------- local backend
FROM ${PYTHON_IMAGE} AS local-backend
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin guard
COPY --from=build-tensorflow /opt/guard /opt/guard
ENV PATH=/opt/guard/bin:$PATH \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8510 8511
ENTRYPOINT ["guard", "backend"]
CMD ["--listen", "0.0.0.0:8510", "--rest-listen", "0.0.0.0:8511"]

# --------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin guard
COPY --from=build /opt/guard /opt/guard
COPY deploy/docker/guard.yaml /etc/guard/guard.yaml
ENV PATH=/opt/guard/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GUARD_CONFIG=/etc/guard/guard.yaml
USER 10001:10001
# 8500: gRPC (TF Serving's API + grpc.health.v1); 8501: TF Serving's REST API;
# 9102: Prometheus /metrics.
EXPOSE 8500 8501 9102
ENTRYPOINT ["guard", "serve"]
