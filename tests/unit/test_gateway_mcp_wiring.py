"""The MCP front end (``troupe_gateway.mcp_server``) over real HTTP with the official ``mcp``
client, in both protocol eras (the 2025 handshake and the 2026-07-28 single exchange):
listing, calling, error results, refusals. Calls, directory and auth are stand-ins here, so
this pins the SDK wiring; ``tests/integration/test_gateway_mcp.py`` runs it end to end."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Any

import httpx
import httpx2
import pytest
import uvicorn
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import RequestParamsMeta
from starlette.applications import Starlette
from troupe_gateway import mcp_server
from troupe_gateway.auth import Caller, Refused, Resource
from troupe_gateway.calls import CallRefused, Calls, TaskView
from troupe_gateway.directory import Directory
from troupe_gateway.services import Services

from troupe_runtime.contract.gateway import DirectoryEntry, TargetKind, TaskRecord

OBJECT = {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}
ENTRIES = [
    DirectoryEntry(
        kind="Agent",
        namespace="team",
        name="echo",
        description="Echoes",
        input_schema=OBJECT,
        subject="troupe.team.agents.echo.inbox.0",
    ),
    DirectoryEntry(
        kind="Agent",
        namespace="team",
        name="shout",
        input_schema={"type": "string"},
        output_schema={"type": "string"},
        subject="troupe.team.agents.shout.inbox.0",
    ),
    DirectoryEntry(kind="Workflow", namespace="team", name="secret", subject="x.*"),
]
TOKEN = "good-token"
SHORT_WAIT: RequestParamsMeta = {"dev.troupe/timeout": 1}  # type: ignore[typeddict-unknown-key]


class StandInDirectory(Directory):
    async def entries(self, namespace: str) -> list[DirectoryEntry]:
        return [entry for entry in ENTRIES if entry.namespace == namespace]

    async def entry(self, namespace: str, kind: TargetKind, name: str) -> DirectoryEntry | None:
        found = [e for e in await self.entries(namespace) if (e.kind, e.name) == (kind, name)]
        return found[0] if found else None


class StandInCalls(Calls):
    """Echoes the input; ``{"text": "fail"}`` fails, ``{"text": "slow"}`` never ends."""

    def __init__(self) -> None:
        self.submitted: list[tuple[str, Any]] = []

    async def submit(
        self,
        entry: DirectoryEntry,
        data: Any,
        *,
        caller: str,
        task_id: str | None = None,
        context_id: str | None = None,
    ) -> TaskRecord:
        if entry.input_schema == OBJECT and not isinstance(data.get("text"), str):
            raise CallRefused(400, "'text' is a required property")
        self.submitted.append((entry.name, data))
        return self._made(entry, data)

    def _made(self, entry: DirectoryEntry, data: Any) -> TaskRecord:
        return TaskRecord(
            task_id=f"t{len(self.submitted)}",
            kind=entry.kind,
            name=entry.name,
            context_id="c",
            created_at=datetime.now(UTC),
            input=data,
        )

    async def wait(self, entry: DirectoryEntry, task_id: str, within: float) -> TaskView:
        data = self.submitted[-1][1]
        record = self._made(entry, data)
        if data == {"text": "fail"}:
            return TaskView(record=record, state="failed", error="TooLong", reason="handler-error")
        if data == {"text": "slow"}:
            return TaskView(record=record, state="working")
        return TaskView(record=record, state="completed", output=data)


class StandInAuthorizer:
    async def authenticate(self, headers: Mapping[str, str], namespace: str) -> Caller:
        if headers.get("authorization") != f"Bearer {TOKEN}":
            raise Refused(401, "no valid bearer token")
        return Caller(user="system:serviceaccount:team:caller")

    async def authorize(
        self, caller: Caller, namespace: str, resource: Resource, name: str
    ) -> None:
        if name == "secret":
            raise Refused(403, f"{caller.user} may not invoke {resource}/{name}")


class StandInServices(Services):
    async def admit(
        self, headers: Mapping[str, str], namespace: str, kind: TargetKind, name: str
    ) -> tuple[Caller, DirectoryEntry]:
        caller = await self.authorizer.authenticate(headers, namespace)
        await self.authorizer.authorize(caller, namespace, "agents", name)
        entry = await self.directory.entry(namespace, kind, name)
        if entry is None:
            raise CallRefused(404, f"no {kind} {name}")
        return caller, entry


def _leaves(error: BaseException) -> list[BaseException]:
    """The errors inside the SDK's task-group exception groups."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, StandInCalls]]:
    calls = StandInCalls()
    unused: Any = None  # NATS, Kubernetes and the settings: the front end reaches none
    services = StandInServices(
        nc=unused,
        js=unused,
        calls=calls,
        directory=StandInDirectory(),
        authorizer=StandInAuthorizer(),
        kube=unused,
        settings=unused,
    )
    app = Starlette(
        routes=mcp_server.routes(services), lifespan=lambda _: mcp_server.lifespan(services)
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning", lifespan="on"))
    serving = asyncio.create_task(server.serve())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while not server.started:
        assert loop.time() < deadline, "uvicorn did not start"
        assert not serving.done(), "uvicorn ended"
        await asyncio.sleep(0.02)
    yield f"http://127.0.0.1:{port}/mcp/team", calls
    server.should_exit = True
    await serving


def client(url: str, http: httpx2.AsyncClient, mode: str) -> Client:
    return Client(streamable_http_client(url, http_client=http), mode=mode, cache=None)


MODES = ["legacy", "2026-07-28"]


@pytest.mark.parametrize("mode", MODES)
async def test_tools_are_the_objects_rbac_lets_the_caller_invoke(
    served: tuple[str, StandInCalls], mode: str
) -> None:
    url, _ = served
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}) as http,
        client(url, http, mode) as mcp,
    ):
        tools = {tool.name: tool for tool in (await mcp.list_tools()).tools}
    assert sorted(tools) == ["agent_echo", "agent_shout"]
    assert tools["agent_echo"].input_schema == OBJECT
    assert tools["agent_echo"].description == "Echoes"
    assert tools["agent_shout"].input_schema["properties"] == {"input": {"type": "string"}}


@pytest.mark.parametrize("mode", MODES)
async def test_a_call_is_a_task_and_its_answer_the_result(
    served: tuple[str, StandInCalls], mode: str
) -> None:
    url, calls = served
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}) as http,
        client(url, http, mode) as mcp,
    ):
        echoed = await mcp.call_tool("agent_echo", {"text": "hi"})
        shouted = await mcp.call_tool("agent_shout", {"input": "hey"})
        failed = await mcp.call_tool("agent_echo", {"text": "fail"})
        refused = await mcp.call_tool("agent_echo", {"words": 1})
        going = await mcp.call_tool("agent_echo", {"text": "slow"}, meta=SHORT_WAIT)
    assert not echoed.is_error
    assert echoed.structured_content == {"text": "hi"}
    assert not shouted.is_error
    assert shouted.structured_content == {"output": "hey"}
    assert calls.submitted[:2] == [("echo", {"text": "hi"}), ("shout", "hey")]
    assert failed.is_error
    assert "TooLong (handler-error)" in failed.content[0].text  # type: ignore[union-attr]
    assert refused.is_error
    assert "'text' is a required property" in refused.content[0].text  # type: ignore[union-attr]
    assert going.is_error
    assert "still working after 1s" in going.content[0].text  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", MODES)
async def test_rbac_refuses_a_call_and_nothing_is_submitted(
    served: tuple[str, StandInCalls], mode: str
) -> None:
    url, calls = served
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}) as http,
        client(url, http, mode) as mcp,
    ):
        with pytest.raises(MCPError) as forbidden:
            await mcp.call_tool("workflow_secret", {})
        with pytest.raises(MCPError) as unknown:
            await mcp.call_tool("agent_nobody", {})
    assert forbidden.value.code == mcp_server.FORBIDDEN
    assert "may not invoke" in forbidden.value.message
    assert unknown.value.data == {"status": 404}
    assert calls.submitted == []


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}])
async def test_a_request_without_a_valid_token_is_401_before_the_sdk(
    served: tuple[str, StandInCalls], headers: dict[str, str]
) -> None:
    url, calls = served
    request = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    accept = {"Accept": "application/json, text/event-stream"}
    async with httpx.AsyncClient() as http:
        answer = await http.post(url, json=request, headers={**accept, **headers})
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"] == "Bearer"
    assert "no valid bearer token" in answer.json()["error"]["message"]
    async with httpx2.AsyncClient(headers=headers) as http:
        with pytest.raises(BaseException) as refused:  # noqa: PT011 - the SDK's own groups
            async with client(url, http, "legacy"):
                pass
    (leaf,) = _leaves(refused.value)
    assert isinstance(leaf, MCPError)
    assert leaf.message == "unauthorized: no valid bearer token"
    assert calls.submitted == []


async def test_a_namespace_that_is_no_dns_label_is_not_found(
    served: tuple[str, StandInCalls],
) -> None:
    url, _ = served
    async with httpx.AsyncClient() as http:
        answer = await http.post(url.replace("/team", "/Team_1"), json={})
    assert answer.status_code == 404
