# syntax=docker/dockerfile:1.7
# router-worker image: a builder stage resolves wheels into a virtualenv, the runtime stage
# copies only that virtualenv, so compilers and pip caches never reach production.
#
#   docker build -t router-worker .                         # keyword/cpu engine, no torch
#   docker build --build-arg EXTRAS=ml -t router-worker:ml .  # + CPU torch, MiniLM, distiller
#   docker build --build-arg EXTRAS=gpu -t router-worker:gpu . # + vLLM (CUDA wheels from PyPI)

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder

# Comma-separated optional-dependency groups from pyproject.toml (ml, gpu, plot); empty = core.
ARG EXTRAS=""
# torch is pinned here, together with its CPU wheel index, so that the `ml` image never pulls
# the multi-GB CUDA build; the `gpu` image leaves torch to vLLM, which needs the CUDA build.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# build-essential only for sdists without a wheel for this platform; it stays in this stage,
# so tracking Debian's security updates matters more than pinning its version.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Build tooling only (not in the runtime image); current releases are what we want here.
# hadolint ignore=DL3013
RUN pip install --upgrade pip setuptools wheel

WORKDIR /src
# Dependency metadata first so the heavy layers below are cached across source edits.
COPY pyproject.toml setup.py README.md* ./
COPY router_worker/ router_worker/

# The CPU index is only offered when vLLM is not wanted: "+cpu" local versions sort above the
# PyPI (CUDA) build, so with it vLLM would get a torch without CUDA.
# Versions come from pyproject.toml's ranges (and the torch pin above).
# hadolint ignore=DL3013
RUN set -eu; \
    case ",${EXTRAS}," in \
      *,gpu,*) ;; \
      *,ml,*) pip install --extra-index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" ;; \
    esac; \
    if [ -n "${EXTRAS}" ]; then target=".[${EXTRAS}]"; else target="."; fi; \
    pip install "${target}"; \
    router-worker --help >/dev/null

FROM ${PYTHON_IMAGE} AS runtime

ARG EXTRAS=""
ARG UID=10001
LABEL org.opencontainers.image.title="router-worker" \
      org.opencontainers.image.description="Kafka-native LLM request router" \
      io.router-worker.extras="${EXTRAS}"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ROUTER_LOG_FORMAT=json \
    ROUTER_WEB_PORT=6066

RUN groupadd --system --gid ${UID} router \
 && useradd --system --uid ${UID} --gid router --home-dir /app --shell /usr/sbin/nologin router

COPY --from=builder /opt/venv /opt/venv

# The working directory is writable by the worker: Faust keeps its table data in
# ./<app id>-data and the CPU engine looks for ./models and ./artifacts (mount them).
WORKDIR /app
COPY --chown=router:router topics/ /app/topics/
# `topics apply` reads the definitions from here (ROUTER_TOPICS_DIR).
ENV ROUTER_TOPICS_DIR=/app/topics
RUN mkdir -p /app/models /app/artifacts /app/router-worker-outcome-data \
 && chown -R router:router /app

USER ${UID}:${UID}
EXPOSE 6066

# Liveness only: readiness (/readyz) depends on Kafka assignment and is the orchestrator's call.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('ROUTER_WEB_PORT', '6066'), timeout=2)"]

ENTRYPOINT ["router-worker"]
CMD ["worker", "--web-port", "6066"]
