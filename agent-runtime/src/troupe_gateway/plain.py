"""Plain request/reply over HTTP: POST an input, get the output (what ``troupe call`` uses).

``POST /v1/namespaces/{ns}/{agents|workflows}/{name}:call`` with the input JSON as the body
waits up to ``?timeout`` seconds (default 30, at most 300): 200 once the task ended, 202 with
a ``Location`` to read it later when it had not; ``Idempotency-Key`` names the task, so a
retried POST is the same task; ``?contextId`` groups calls, as A2A's contextId does (an
Agent with ``spec.llm.session`` remembers the context's earlier calls; default: a context of
the task's own). ``GET …/tasks/{id}`` reads one.
"""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from troupe_gateway.calls import CallRefused, TaskView
from troupe_gateway.services import Services
from troupe_runtime.contract.gateway import TargetKind

MAX_BODY_BYTES = 1024 * 1024
DEFAULT_TIMEOUT_SECONDS = 30.0
MAX_TIMEOUT_SECONDS = 300.0
KINDS: dict[str, TargetKind] = {"agents": "Agent", "workflows": "Workflow"}


def timeout_of(value: str | None) -> float:
    """``?timeout``: seconds, 0 to 300; anything else is ``CallRefused(400)``."""
    if value is None:
        return DEFAULT_TIMEOUT_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_TIMEOUT_SECONDS:
        raise CallRefused(400, f"timeout is seconds from 0 to {MAX_TIMEOUT_SECONDS:g}")
    return seconds


def input_of(body: bytes) -> Any:
    """The body as the input: JSON, or nothing (null); ``CallRefused(400|413)`` otherwise."""
    if len(body) > MAX_BODY_BYTES:
        raise CallRefused(413, f"the body is over {MAX_BODY_BYTES} bytes")
    if not body.strip():
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise CallRefused(400, "the body is not JSON") from None


async def bounded_body(request: Request) -> bytes:
    """The body, read no further than ``MAX_BODY_BYTES`` + 1: a body without a length (or
    lying about it) is not buffered whole before it is refused."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise CallRefused(413, f"the body is over {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise CallRefused(413, f"the body is over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def view_json(view: TaskView) -> dict[str, Any]:
    return {
        "taskId": view.record.task_id,
        "contextId": view.record.context_id,
        "state": view.state,
        "output": view.output,
        "error": view.error,
        "reason": view.reason,
    }


def _target(request: Request) -> tuple[str, TargetKind, str]:
    kind = KINDS.get(request.path_params["group"])
    if kind is None:
        raise CallRefused(404, "the path names agents or workflows")
    return request.path_params["namespace"], kind, request.path_params["name"]


def routes(services: Services) -> list[BaseRoute]:
    async def call(request: Request) -> Response:
        namespace, kind, name = _target(request)
        within = timeout_of(request.query_params.get("timeout"))
        caller, entry = await services.admit(request.headers, namespace, kind, name)
        data = input_of(await bounded_body(request))
        record = await services.calls.submit(
            entry,
            data,
            caller=caller.user,
            task_id=request.headers.get("idempotency-key"),
            context_id=request.query_params.get("contextId"),
        )
        view = await services.calls.wait(entry, record.task_id, within)
        if view.terminal:
            return JSONResponse(view_json(view))
        location = f"/v1/namespaces/{namespace}/{request.path_params['group']}/{name}/tasks/"
        return JSONResponse(
            view_json(view), status_code=202, headers={"Location": location + record.task_id}
        )

    async def read(request: Request) -> Response:
        namespace, kind, name = _target(request)
        _, entry = await services.admit(request.headers, namespace, kind, name)
        view = await services.calls.get(entry, request.path_params["task"])
        if view is None:
            raise CallRefused(404, f"no task {request.path_params['task']!r} of {name}")
        return JSONResponse(view_json(view))

    base = "/v1/namespaces/{namespace}/{group}/{name}"
    return [
        Route(base + ":call", call, methods=["POST"]),
        Route(base + "/tasks/{task}", read, methods=["GET"]),
    ]
