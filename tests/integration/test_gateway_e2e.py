"""The gateway end to end, as it runs: ``python -m troupe_gateway`` against the real API
server (TokenReview, SubjectAccessReview on ``invoke``) and nats-server, in front of the
operator's Agents (real runtimes on the process node) and a Workflow over them, called by
clients nobody here wrote: the official ``a2a-sdk`` client on both bindings, the official
``mcp`` client, and ``troupe call``. Callers hold ServiceAccount tokens bound (or not) to
the chart's ``troupe-invoker`` ClusterRole. Refusals publish nothing; a gateway SIGKILLed
with calls in flight loses none of them and duplicates none."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import httpx2
import nats
import pytest
from a2a.client import Client, ClientConfig, create_client
from a2a.helpers.proto_helpers import get_data_parts, new_data_part
from a2a.types import a2a_pb2 as pb
from a2a.utils.constants import TransportProtocol
from mcp import Client as McpClient
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.integration.gateway_support import (
    SCHEMA,
    GatewayProcess,
    bind_invoker,
    create_api_key,
    grant_invoke_on,
    handled_agent,
    invoker_role_installed,
    running_gateway,
    service_account_token,
)
from tests.integration.operator_support import (
    OperatorProcess,
    apply,
    explained,
    wait_ready,
    workflow,
)
from troupe_devcluster.fixtures import ClusterEndpoints, create_namespace, wait_for
from troupe_devcluster.kube import core_v1
from troupe_devcluster.layout import free_port
from troupe_runtime.contract import naming

DEADLINE = 60.0
IN_FLIGHT = 3
"""Blocking calls to each of the gated Agent and Workflow when the gateway is killed."""


@dataclass(frozen=True)
class Deployed:
    cluster: ClusterEndpoints
    namespace: str
    gateway: GatewayProcess
    operator: OperatorProcess
    token: str
    """A token RBAC allows (``troupe-invoker`` bound in the namespace)."""
    stranger: str
    """A valid token RBAC allows nothing."""
    narrow: str
    """A token RBAC allows on the Agent ``echo`` only."""
    api_key: str
    """An API key Secret acting as the ``caller`` account."""
    held_gate: Path
    slow_gate: Path

    def a2a_base(self, kind: str, name: str) -> str:
        return f"{self.gateway.url}/a2a/{self.namespace}/{kind}/{name}"

    def mcp_url(self) -> str:
        return f"{self.gateway.url}/mcp/{self.namespace}"

    def handled(self, gate: Path) -> list[str]:
        handled = gate.with_name(gate.name + ".handled")
        return handled.read_text().split() if handled.exists() else []


@pytest.fixture(scope="module")
def deployed(
    cluster: ClusterEndpoints,
    api_client: Any,
    operator: OperatorProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployed]:
    """One namespace for the module: Agents ``echo``, ``held`` and ``slow`` (the last two
    gated), Workflows ``relay`` (over echo), ``hold`` (over held) and ``slowflow`` (over
    slow); a caller bound to ``troupe-invoker`` and one bound to nothing; the gateway."""
    directory = tmp_path_factory.mktemp("gateway-e2e")
    namespace = create_namespace(api_client)
    held_gate, slow_gate = directory / "held.gate", directory / "slow.gate"
    try:
        with explained(cluster, namespace, operator), invoker_role_installed(cluster):
            apply(cluster, namespace, handled_agent("echo", "echo"))
            apply(cluster, namespace, handled_agent("held", "gated", held_gate))
            apply(cluster, namespace, handled_agent("slow", "gated", slow_gate))
            apply(cluster, namespace, workflow("relay", [{"name": "one", "agentRef": "echo"}]))
            apply(cluster, namespace, workflow("hold", [{"name": "wait", "agentRef": "held"}]))
            apply(cluster, namespace, workflow("slowflow", [{"name": "go", "agentRef": "slow"}]))
            for name in ("echo", "held", "slow"):
                wait_ready(cluster, namespace, "agent", name)
            for name in ("relay", "hold", "slowflow"):
                wait_ready(cluster, namespace, "workflow", name)
            token = service_account_token(cluster, namespace, "caller")
            bind_invoker(cluster, namespace, "caller")
            stranger = service_account_token(cluster, namespace, "stranger")
            narrow = service_account_token(cluster, namespace, "narrow")
            grant_invoke_on(cluster, namespace, "narrow", "agents", "echo")
            api_key = f"key-{uuid.uuid4().hex}"
            create_api_key(cluster, namespace, "caller-key", api_key, "caller")
            # Push receivers in these tests listen on loopback: allowed here, as for an
            # in-cluster receiver.
            allow_private = {"TROUPE_GATEWAY_PUSH_PRIVATE_NETWORKS": "true"}
            with running_gateway(cluster, directory / "gateway.log", allow_private) as gateway:
                deployed = Deployed(
                    cluster,
                    namespace,
                    gateway,
                    operator,
                    token,
                    stranger,
                    narrow,
                    api_key,
                    held_gate,
                    slow_gate,
                )
                for kind, name in (
                    ("agents", "echo"),
                    ("agents", "slow"),
                    ("workflows", "relay"),
                    ("workflows", "hold"),
                    ("workflows", "slowflow"),
                ):
                    wait_for(
                        lambda kind=kind, name=name: (
                            _card_status(deployed, kind, name, token) == 200
                        ),
                        DEADLINE,
                        f"the card of {kind}/{name} (RBAC and the directory entry)",
                    )
                try:
                    yield deployed
                except BaseException:
                    print(f"--- gateway\n{gateway.log_tail(120)}")
                    raise
    finally:
        held_gate.touch()
        slow_gate.touch()
        core_v1(api_client).delete_namespace(namespace)


def _card_status(deployed: Deployed, kind: str, name: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = deployed.a2a_base(kind, name) + "/.well-known/agent-card.json"
    return httpx.get(url, headers=headers, timeout=10).status_code


@pytest.fixture
async def http(deployed: Deployed) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {deployed.token}"}
    async with httpx.AsyncClient(headers=headers, timeout=120) as client:
        yield client


def _message(content: str | dict[str, Any]) -> pb.Message:
    """A text part, or a data part for a dict."""
    part = pb.Part(text=content) if isinstance(content, str) else new_data_part(content)
    return pb.Message(message_id=f"m-{uuid.uuid4().hex}", role=pb.Role.ROLE_USER, parts=[part])


def _output(task: pb.Task) -> Any:
    """The data of the task's output artifact."""
    (artifact,) = task.artifacts
    return get_data_parts(list(artifact.parts))[0]


async def _client(
    base: str, http: httpx.AsyncClient, binding: str, *, streaming: bool = False
) -> Client:
    config = ClientConfig(
        streaming=streaming,
        httpx_client=http,
        supported_protocol_bindings=[binding],
        use_client_preference=True,
    )
    return await create_client(base, config)


async def _final_task(client: Client, request: pb.SendMessageRequest) -> pb.Task:
    answers = [answer async for answer in client.send_message(request)]
    assert answers, "no answer"
    assert answers[-1].HasField("task"), answers[-1]
    return answers[-1].task


BINDINGS = [TransportProtocol.JSONRPC.value, TransportProtocol.HTTP_JSON.value]


@pytest.mark.parametrize("binding", BINDINGS)
async def test_an_a2a_client_discovers_sends_gets_and_lists_anhandled_agent(
    deployed: Deployed, http: httpx.AsyncClient, binding: str
) -> None:
    base = deployed.a2a_base("agents", "echo")
    card = (await http.get(base + "/.well-known/agent-card.json")).json()
    assert card["name"] == "echo"
    assert {i["protocolBinding"] for i in card["supportedInterfaces"]} == set(BINDINGS)
    assert all(i["url"] == base for i in card["supportedInterfaces"])
    client = await _client(base, http, binding)
    # The REST binding puts a tenant into the path: it must be the namespace.
    tenant = deployed.namespace if binding == TransportProtocol.HTTP_JSON.value else ""

    sent = _message("hello")
    task = await _final_task(client, pb.SendMessageRequest(message=sent, tenant=tenant))

    assert task.status.state == pb.TaskState.TASK_STATE_COMPLETED
    assert task.id == sent.message_id
    assert _output(task) == {"echo": "hello", "by": "echo"}
    got = await client.get_task(pb.GetTaskRequest(id=sent.message_id, tenant=tenant))
    assert got.status.state == pb.TaskState.TASK_STATE_COMPLETED
    assert _output(got) == {"echo": "hello", "by": "echo"}
    listed = await client.list_tasks(pb.ListTasksRequest(tenant=tenant))
    assert sent.message_id in [t.id for t in listed.tasks]


@pytest.mark.parametrize("binding", BINDINGS)
async def test_an_a2a_client_streams_a_workflow_run(
    deployed: Deployed, http: httpx.AsyncClient, binding: str
) -> None:
    base = deployed.a2a_base("workflows", "relay")
    client = await _client(base, http, binding, streaming=True)
    sent = _message({"text": "streamed"})

    events = [event async for event in client.send_message(pb.SendMessageRequest(message=sent))]

    assert events, "the stream carried no event"
    assert events[0].HasField("task")
    got = await client.get_task(pb.GetTaskRequest(id=sent.message_id))
    assert got.status.state == pb.TaskState.TASK_STATE_COMPLETED
    assert _output(got) == {"echo": "streamed", "by": "echo"}


async def test_an_a2a_client_cancels_a_workflow_run(
    deployed: Deployed, http: httpx.AsyncClient
) -> None:
    client = await _client(
        deployed.a2a_base("workflows", "hold"), http, TransportProtocol.JSONRPC.value
    )
    sent = _message({"text": "never"})
    request = pb.SendMessageRequest(
        message=sent, configuration=pb.SendMessageConfiguration(return_immediately=True)
    )
    submitted = await _final_task(client, request)
    assert submitted.status.state in (
        pb.TaskState.TASK_STATE_SUBMITTED,
        pb.TaskState.TASK_STATE_WORKING,
    )
    before = len(deployed.handled(deployed.held_gate))
    wait_for(
        lambda: len(deployed.handled(deployed.held_gate)) > before,
        DEADLINE,
        "the run's step to reach the held Agent",
    )

    cancelled = await client.cancel_task(pb.CancelTaskRequest(id=sent.message_id))

    assert cancelled.id == sent.message_id

    async def state() -> int:
        return (await client.get_task(pb.GetTaskRequest(id=sent.message_id))).status.state

    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while (last := await state()) != pb.TaskState.TASK_STATE_CANCELED:
        assert loop.time() < deadline, f"the run did not end Cancelled (state {last})"
        await asyncio.sleep(0.2)
    with pytest.raises(Exception, match=r"(?i)cancel"):
        await client.cancel_task(pb.CancelTaskRequest(id=sent.message_id))


def _mcp(url: str, http: httpx2.AsyncClient) -> McpClient:
    return McpClient(streamable_http_client(url, http_client=http), mode="legacy", cache=None)


async def test_an_mcp_client_lists_and_calls_the_namespaces_targets(deployed: Deployed) -> None:
    headers = {"Authorization": f"Bearer {deployed.token}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=120) as http,
        _mcp(deployed.mcp_url(), http) as mcp,
    ):
        tools = {tool.name: tool for tool in (await mcp.list_tools()).tools}
        echoed = await mcp.call_tool("agent_echo", {"text": "tool"})
        relayed = await mcp.call_tool("workflow_relay", {"text": "flow"})

    assert {"agent_echo", "agent_held", "agent_slow"} <= set(tools)
    assert {"workflow_relay", "workflow_hold", "workflow_slowflow"} <= set(tools)
    assert tools["agent_echo"].input_schema == SCHEMA
    assert not echoed.is_error, echoed
    assert echoed.structured_content == {"echo": "tool", "by": "echo"}
    assert not relayed.is_error, relayed
    assert relayed.structured_content == {"echo": "flow", "by": "echo"}


def _troupe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "troupe_cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_troupe_call_returns_the_answer(deployed: Deployed) -> None:
    called = _troupe(
        "call",
        "agent",
        "echo",
        "-n",
        deployed.namespace,
        "--gateway",
        deployed.gateway.url,
        "--token",
        deployed.token,
        "--data",
        json.dumps({"text": "cli"}),
        "-o",
        "json",
    )

    assert called.returncode == 0, called.stdout + called.stderr
    answer = json.loads(called.stdout)
    assert answer["state"] == "completed"
    assert answer["output"] == {"echo": "cli", "by": "echo"}


async def _stream_messages(deployed: Deployed, stream: str) -> int:
    """Messages ever stored (the last sequence): an inbox keeps a message only until it is
    acknowledged."""
    connection = await nats.connect(deployed.cluster.nats_url)
    try:
        return int((await connection.jetstream().stream_info(stream)).state.last_seq)
    finally:
        await connection.close()


async def _inbox_messages(deployed: Deployed, agent: str) -> int:
    return await _stream_messages(deployed, naming.inbox_stream(deployed.namespace, agent))


async def _runs(deployed: Deployed, name: str) -> int:
    bucket = naming.workflow_runs_bucket(deployed.namespace, name)
    return await _stream_messages(deployed, naming.kv_stream(bucket))


@pytest.mark.parametrize(("who", "status"), [("nobody", 401), ("stranger", 403)])
async def test_a_caller_refused_gets_401_or_403_and_nothing_is_published(
    deployed: Deployed, who: str, status: int
) -> None:
    token = {"nobody": None, "stranger": deployed.stranger}[who]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    inbox, runs = await _inbox_messages(deployed, "echo"), await _runs(deployed, "relay")
    body = {"text": "refused"}
    a2a_send = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "SendMessage",
        "params": {
            "message": {
                "messageId": f"m-{uuid.uuid4().hex}",
                "role": "ROLE_USER",
                "parts": [{"text": "refused"}],
            }
        },
    }
    async with httpx.AsyncClient(base_url=deployed.gateway.url, headers=headers) as http:
        answers = [
            await http.get(f"/a2a/{deployed.namespace}/agents/echo/.well-known/agent-card.json"),
            await http.post(f"/a2a/{deployed.namespace}/agents/echo", json=a2a_send),
            await http.post(f"/a2a/{deployed.namespace}/workflows/relay", json=a2a_send),
            await http.post(
                f"/a2a/{deployed.namespace}/agents/echo/message:send",
                json={"message": a2a_send["params"]["message"]},  # type: ignore[index]
            ),
            await http.post(f"/v1/namespaces/{deployed.namespace}/agents/echo:call", json=body),
            await http.post(f"/v1/namespaces/{deployed.namespace}/workflows/relay:call", json=body),
        ]
    for answer in answers:
        assert answer.status_code == status, (answer.request.url, answer.text)
        assert answer.text, "a refusal says why"
    assert answers[0].headers.get("www-authenticate") == ("Bearer" if status == 401 else None)

    async with httpx2.AsyncClient(headers=headers, timeout=30) as http2:
        if status == 401:
            with pytest.raises(Exception):  # noqa: B017, PT011  # the SDK's own error type
                async with _mcp(deployed.mcp_url(), http2) as mcp:
                    await mcp.list_tools()
        else:
            async with _mcp(deployed.mcp_url(), http2) as mcp:
                assert (await mcp.list_tools()).tools == []
                with pytest.raises(MCPError):
                    await mcp.call_tool("agent_echo", body)

    assert await _inbox_messages(deployed, "echo") == inbox
    assert await _runs(deployed, "relay") == runs


async def test_a_gateway_killed_during_calls_loses_and_duplicates_no_call(
    deployed: Deployed,
) -> None:
    """Blocking calls to a gated Agent and a Workflow over it are in flight when the gateway
    is SIGKILLed; after the restart each is one task that completes, its message handled
    once; a client retrying with the same id gets the same task."""
    headers = {"Authorization": f"Bearer {deployed.token}"}
    inbox = await _inbox_messages(deployed, "slow")
    handled_before = deployed.handled(deployed.slow_gate)
    targets = [("agents", "slow")] * IN_FLIGHT + [("workflows", "slowflow")] * IN_FLIGHT
    messages = [_message({"text": f"call-{i}"}) for i in range(len(targets))]
    async with httpx.AsyncClient(headers=headers, timeout=120) as http:
        clients = {
            target: await _client(deployed.a2a_base(*target), http, BINDINGS[0])
            for target in set(targets)
        }
        calls = [
            asyncio.create_task(
                _final_task(clients[target], pb.SendMessageRequest(message=message))
            )
            for target, message in zip(targets, messages, strict=True)
        ]
        await asyncio.to_thread(
            wait_for,
            lambda: len(deployed.handled(deployed.slow_gate)) >= len(handled_before) + len(calls),
            DEADLINE,
            "every call to reach the gated Agent",
        )
        assert not any(call.done() for call in calls), "a call ended before the gate opened"

        deployed.gateway.kill()
        cut = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(answer, BaseException) for answer in cut), cut
        deployed.gateway.start()
        deployed.slow_gate.touch()

        for target, message in zip(targets, messages, strict=True):
            client = clients[target]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + DEADLINE
            while True:
                task = await client.get_task(pb.GetTaskRequest(id=message.message_id))
                if task.status.state == pb.TaskState.TASK_STATE_COMPLETED:
                    break
                assert loop.time() < deadline, f"{message.message_id} is {task.status.state}"
                await asyncio.sleep(0.2)
            assert _output(task) == {"echo": get_data_parts(message.parts)[0]["text"], "by": "slow"}
        # A client retrying after the cut: the same id is the same task, nothing re-sent.
        retried = await _final_task(clients[targets[0]], pb.SendMessageRequest(message=messages[0]))
        assert retried.status.state == pb.TaskState.TASK_STATE_COMPLETED

    handled = deployed.handled(deployed.slow_gate)[len(handled_before) :]
    assert len(handled) == len(set(handled)) == len(calls), handled
    assert await _inbox_messages(deployed, "slow") == inbox + len(calls)
    assert deployed.gateway.starts == 2


async def test_rbac_narrowed_to_one_agent_lets_that_one_be_called_and_no_other(
    deployed: Deployed,
) -> None:
    headers = {"Authorization": f"Bearer {deployed.narrow}"}
    ns = deployed.namespace
    async with httpx.AsyncClient(base_url=deployed.gateway.url, headers=headers) as http:
        allowed = await http.post(f"/v1/namespaces/{ns}/agents/echo:call", json={"text": "ok"})
        other_agent = await http.post(f"/v1/namespaces/{ns}/agents/slow:call", json={})
        a_workflow = await http.get(
            f"/a2a/{ns}/workflows/relay/.well-known/agent-card.json", headers=headers
        )
    assert allowed.status_code == 200, allowed.text
    assert allowed.json()["output"] == {"echo": "ok", "by": "echo"}
    assert other_agent.status_code == 403, other_agent.text
    assert a_workflow.status_code == 403, a_workflow.text
    async with (
        httpx2.AsyncClient(headers=headers, timeout=120) as http2,
        _mcp(deployed.mcp_url(), http2) as mcp,
    ):
        tools = [tool.name for tool in (await mcp.list_tools()).tools]
        with pytest.raises(MCPError):
            await mcp.call_tool("agent_slow", {"text": "no"})
    assert tools == ["agent_echo"]


async def test_an_api_key_calls_as_its_service_account(deployed: Deployed) -> None:
    base = deployed.a2a_base("agents", "echo")
    async with httpx.AsyncClient(headers={"X-API-Key": deployed.api_key}, timeout=120) as http:
        client = await _client(base, http, TransportProtocol.JSONRPC.value)
        task = await _final_task(client, pb.SendMessageRequest(message=_message("keyed")))
    assert task.status.state == pb.TaskState.TASK_STATE_COMPLETED
    assert _output(task) == {"echo": "keyed", "by": "echo"}
    called = _troupe(
        "call", "agent", "echo", "-n", deployed.namespace, "--gateway", deployed.gateway.url,
        "--api-key", deployed.api_key, "--data", json.dumps({"text": "key"}),
    )  # fmt: skip
    assert called.returncode == 0, called.stdout + called.stderr


class _Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, dict[str, Any]]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        token = self.headers.get("X-A2A-Notification-Token", "")
        self.received.append((token, json.loads(body)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return None


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[tuple[str, dict[str, Any]]]]]:
    """An HTTP server on loopback that keeps every push notification POSTed to it."""
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Receiver)
    _Receiver.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/hook", _Receiver.received
    finally:
        server.shutdown()
        server.server_close()


async def test_a_push_notification_config_is_kept_and_delivered_when_the_task_ends(
    deployed: Deployed,
    http: httpx.AsyncClient,
    receiver: tuple[str, list[tuple[str, dict[str, Any]]]],
) -> None:
    url, received = receiver
    client = await _client(
        deployed.a2a_base("agents", "echo"), http, TransportProtocol.HTTP_JSON.value
    )
    sent = _message("pushed")
    config = pb.TaskPushNotificationConfig(url=url, token="push-token")
    request = pb.SendMessageRequest(
        message=sent,
        configuration=pb.SendMessageConfiguration(task_push_notification_config=config),
    )

    task = await _final_task(client, request)

    assert task.status.state == pb.TaskState.TASK_STATE_COMPLETED
    configs = await client.list_task_push_notification_configs(
        pb.ListTaskPushNotificationConfigsRequest(task_id=sent.message_id)
    )
    assert [c.url for c in configs.configs] == [url]
    delivered = await asyncio.to_thread(
        wait_for,
        lambda: [body for token, body in received if token == "push-token"],
        DEADLINE,
        "the push notification",
    )
    assert sent.message_id in json.dumps(delivered)
