# syntax=docker/dockerfile:1
# Troupe's two images, one target each (`make images` builds both):
#   docker build --build-arg TROUPE_VERSION="$(cat VERSION)" --target operator -t troupe/operator:"$(cat VERSION)" .
#   docker build --build-arg TROUPE_VERSION="$(cat VERSION)" --target runtime  -t troupe/runtime:"$(cat VERSION)" .
# Every dependency is a wheel built once, from the exact pins of requirements.txt, in a
# stage of its own; the final stages install those wheels from a bind mount, so neither
# the wheels nor any build tool ends up in an image. Both run as the unprivileged user
# 10001, the user the chart's restricted pod security context names. The packages take
# their version from VERSION (each package's VERSION links to it); the label takes it
# from the build argument.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# Required: `make images` passes VERSION; the pinned installs below fail without it.
ARG TROUPE_VERSION

FROM ${PYTHON_IMAGE} AS wheels
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements.txt ./
RUN pip wheel --wheel-dir /wheels --requirement requirements.txt
COPY VERSION ./
COPY agent-runtime/ agent-runtime/
COPY operator/ operator/
RUN pip wheel --no-deps --wheel-dir /wheels ./agent-runtime ./operator

FROM ${PYTHON_IMAGE} AS base
ARG TROUPE_VERSION
LABEL org.opencontainers.image.title="Troupe" \
      org.opencontainers.image.description="AI agent teams on Kubernetes and NATS JetStream" \
      org.opencontainers.image.version="${TROUPE_VERSION}"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin troupe

FROM base AS runtime
ARG TROUPE_VERSION
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels "troupe-runtime==${TROUPE_VERSION}"
USER 10001:10001
ENTRYPOINT ["python", "-m", "troupe_runtime.agent"]

FROM base AS operator
ARG TROUPE_VERSION
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels "troupe-operator==${TROUPE_VERSION}"
USER 10001:10001
ENTRYPOINT ["python", "-m", "troupe_operator"]
