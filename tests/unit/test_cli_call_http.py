"""``troupe call`` over real HTTP against a stand-in of the gateway's plain endpoint (the
agreed paths, headers and answers): what it sends, what it prints, how it exits."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from troupe_cli.main import amain

TOKEN = "s3cret-token"


class StandInGateway:
    """Answers by the input's ``do``: done, fail, wait (202), or hang (never answers)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def call(self, request: Request) -> Response:
        body = json.loads(await request.body())
        self.seen.append(
            {
                "path": request.url.path,
                "timeout": request.query_params.get("timeout"),
                "authorization": request.headers.get("authorization"),
                "api_key": request.headers.get("x-api-key"),
                "task": request.headers.get("idempotency-key"),
                "body": body,
            }
        )
        if request.headers.get("authorization") != f"Bearer {TOKEN}" and not request.headers.get(
            "x-api-key"
        ):
            return JSONResponse({"reason": "no valid credentials"}, 401)
        if request.path_params["name"] == "secret":
            return JSONResponse({"reason": "may not invoke agents/secret"}, 403)
        if request.path_params["name"] == "nobody":
            return JSONResponse({"reason": "no such agent"}, 404)
        task = {"taskId": request.headers.get("idempotency-key"), "contextId": "c"}
        do = body.get("do") if isinstance(body, dict) else None
        if do == "fail":
            return JSONResponse({**task, "state": "failed", "error": "TooLong", "reason": "x"})
        if do == "wait":
            return JSONResponse({**task, "state": "working"}, 202, {"Location": "/v1/t"})
        if do == "hang":
            await asyncio.Event().wait()
        return JSONResponse({**task, "state": "completed", "output": body})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[str, StandInGateway]]:
    stand_in = StandInGateway()
    path = "/v1/namespaces/{ns}/{group}/{name}:call"
    app = Starlette(routes=[Route(path, stand_in.call, methods=["POST"])])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while not server.started:
        assert loop.time() < deadline, "uvicorn did not start"
        assert not serving.done(), "uvicorn ended"
        await asyncio.sleep(0.02)
    yield f"http://127.0.0.1:{port}", stand_in
    server.should_exit = True
    server.force_exit = True
    await serving


async def troupe(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = await amain(["-n", "team", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_a_completed_call_prints_the_output_and_exits_0(
    gateway: tuple[str, StandInGateway], capsys: pytest.CaptureFixture[str]
) -> None:
    url, stand_in = gateway
    args = ["call", "agent", "echo", "--data", '{"a": 1}', "--gateway", url, "--token", TOKEN]
    code, out, _ = await troupe(capsys, *args, "--id", "t1", "--timeout", "5")
    assert code == 0
    assert json.loads(out) == {"a": 1}
    (seen,) = stand_in.seen
    assert seen["path"] == "/v1/namespaces/team/agents/echo:call"
    assert seen["timeout"] == "5"
    assert seen["authorization"] == f"Bearer {TOKEN}"
    assert seen["task"] == "t1"
    code, out, _ = await troupe(capsys, *args, "-o", "json")
    assert code == 0
    assert json.loads(out)["state"] == "completed"
    assert stand_in.seen[1]["task"]  # a new task id when none is given


async def test_a_failed_call_exits_1_with_the_error(
    gateway: tuple[str, StandInGateway],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, stand_in = gateway
    monkeypatch.setenv("TROUPE_GATEWAY_URL", url)
    monkeypatch.setenv("TROUPE_API_KEY", "key-1")
    code, out, _ = await troupe(capsys, "call", "workflow", "ingest", "--data", '{"do": "fail"}')
    assert code == 1
    assert "workflow ingest failed" in out
    assert "TooLong (x)" in out
    assert stand_in.seen[0]["path"] == "/v1/namespaces/team/workflows/ingest:call"
    assert stand_in.seen[0]["api_key"] == "key-1"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["echo", "--token", "wrong"], "refused the credentials (no valid credentials)"),
        (["echo", "--token", ""], "refused the credentials (no valid credentials)"),
        (["secret", "--token", TOKEN], "troupe-invoker"),
        (["nobody", "--token", TOKEN], "no such agent"),
    ],
)
async def test_a_refused_call_exits_2_and_says_why(
    gateway: tuple[str, StandInGateway],
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    words: str,
) -> None:
    url, _ = gateway
    code, out, err = await troupe(capsys, "call", "agent", *args, "--gateway", url)
    assert code == 2
    assert words in err
    assert TOKEN not in out + err


async def test_a_call_still_working_exits_3_with_its_task_id(
    gateway: tuple[str, StandInGateway], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = gateway
    args = ["call", "agent", "echo", "--data", '{"do": "wait"}', "--gateway", url]
    code, out, _ = await troupe(capsys, *args, "--token", TOKEN, "--id", "t9")
    assert code == 3
    assert "troupe call agent echo --id t9" in out
    assert "GET /v1/t" in out


async def test_a_gateway_that_never_answers_is_a_clear_error(
    gateway: tuple[str, StandInGateway],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, _ = gateway
    monkeypatch.setattr("troupe_cli.gateway.HTTP_MARGIN_SECONDS", 0.2)
    args = ["call", "agent", "echo", "--data", '{"do": "hang"}', "--gateway", url]
    code, _, err = await troupe(capsys, *args, "--token", TOKEN, "--id", "t7", "--timeout", "0.3")
    assert code == 1
    assert "did not answer" in err
    assert "--id t7" in err
