# Troupe images: `--target operator` and `--target runtime` (see `make images`,
# which arrives with issue 6). Dependencies are pinned by requirements.txt.

FROM python:3.11-slim AS build
WORKDIR /src
COPY requirements.txt ./
RUN pip wheel --no-cache-dir --wheel-dir /wheels -r requirements.txt
COPY agent-runtime/ agent-runtime/
COPY operator/ operator/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels ./agent-runtime ./operator

FROM python:3.11-slim AS base
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin troupe
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

FROM base AS runtime
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels troupe-runtime && rm -rf /wheels
USER 10001
ENTRYPOINT ["python", "-m", "troupe_runtime"]

FROM base AS operator
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels troupe-operator && rm -rf /wheels
USER 10001
ENTRYPOINT ["python", "-m", "troupe_operator"]
