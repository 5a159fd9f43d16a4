"""The official a2a-sdk client against the gateway's app, served by uvicorn, on a real
nats-server: card discovery, a blocking SendMessage answered by the Agent, GetTask, and a
streamed send. Auth is a stand-in letting everyone in (``test_gateway_auth`` covers the real
one against the API server); the Agent is the test, as in ``test_gateway_calls``."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import httpx
import nats
import uvicorn
from a2a.client import ClientConfig, create_client
from a2a.types import a2a_pb2 as pb
from nats.js.api import KeyValueConfig, StreamConfig
from troupe_gateway.app import build_app
from troupe_gateway.auth import Caller
from troupe_gateway.calls import Calls
from troupe_gateway.directory import Directory
from troupe_gateway.services import Services
from troupe_gateway.settings import Settings

from tests.integration.test_gateway_calls import AGENT, answer
from troupe_devcluster.layout import free_port
from troupe_runtime.contract import naming
from troupe_runtime.contract.gateway import DirectoryEntry


class Everyone:
    async def authenticate(self, headers: Mapping[str, str], namespace: str) -> Caller:
        return Caller(user="smoke")

    async def authorize(self, caller: Caller, namespace: str, resource: Any, name: str) -> None:
        return None


async def test_an_a2a_client_discovers_sends_streams_and_gets(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    ns = "smoke"
    await js.add_stream(
        StreamConfig(
            name=naming.inbox_stream(ns, AGENT), subjects=[naming.inbox_wildcard(ns, AGENT)]
        )
    )
    await js.add_stream(
        StreamConfig(name=naming.event_log_stream(ns), subjects=[naming.event_log_subject(ns, ">")])
    )
    kv = await js.create_key_value(KeyValueConfig(bucket=naming.directory_bucket(ns)))
    entry = DirectoryEntry(
        kind="Agent",
        namespace=ns,
        name=AGENT,
        subject=naming.inbox_subject(ns, AGENT, 0),
        description="Echoes",
        ready=True,
    )
    await kv.put(
        naming.directory_key("Agent", AGENT), entry.model_dump_json(by_alias=True).encode()
    )
    port = free_port()
    services = Services(
        nc=nc,
        js=js,
        calls=Calls(nc, js, 3600),
        directory=Directory(js),
        authorizer=Everyone(),
        kube=None,  # type: ignore[arg-type]  # the stand-in auth needs no Kubernetes
        settings=Settings(),
    )
    server = uvicorn.Server(
        uvicorn.Config(build_app(services), host="127.0.0.1", port=port, log_level="warning")
    )
    serving = asyncio.create_task(server.serve())
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while not server.started:
            assert asyncio.get_running_loop().time() < deadline, "uvicorn did not start"
            assert not serving.done(), "uvicorn stopped"
            await asyncio.sleep(0.05)
        base = f"http://127.0.0.1:{port}/a2a/{ns}/agents/{AGENT}"
        async with httpx.AsyncClient(headers={"Authorization": "Bearer x"}, timeout=30) as http:
            card = await http.get(base + "/.well-known/agent-card.json")
            assert card.status_code == 200
            assert card.json()["name"]
            client = await create_client(base, ClientConfig(streaming=False, httpx_client=http))
            agent = asyncio.create_task(answer(nc, entry, 1))
            message = pb.Message(
                message_id="m-1", role=pb.Role.ROLE_USER, parts=[pb.Part(text="hello")]
            )
            got = [r async for r in client.send_message(pb.SendMessageRequest(message=message))]
            assert got[-1].task.status.state == pb.TaskState.TASK_STATE_COMPLETED
            await agent
            task = await client.get_task(pb.GetTaskRequest(id="m-1"))
            assert task.status.state == pb.TaskState.TASK_STATE_COMPLETED
            assert task.context_id == "m-1"
            streaming = await create_client(base, ClientConfig(streaming=True, httpx_client=http))
            agent = asyncio.create_task(answer(nc, entry, 1))
            message = pb.Message(
                message_id="m-2", role=pb.Role.ROLE_USER, parts=[pb.Part(text="again")]
            )
            events = [
                r async for r in streaming.send_message(pb.SendMessageRequest(message=message))
            ]
            await agent
            assert events, "the stream carried no event"
            final = await client.get_task(pb.GetTaskRequest(id="m-2"))
            assert final.status.state == pb.TaskState.TASK_STATE_COMPLETED
    finally:
        server.should_exit = True
        await serving
        await nc.close()
