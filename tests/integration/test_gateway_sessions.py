"""A2A's contextId is the session: the official a2a-sdk client and a plain HTTP call through
the gateway's app (uvicorn, real nats-server) to the real LLM runtime with ``spec.llm.session``
and the scripted model. The first message's context (the gateway gives it the task's id) is
continued by the second, and a plain call naming it with ``?contextId`` continues it again;
another caller naming the same context id starts a conversation of its own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
import uvicorn
from a2a.client import ClientConfig, create_client
from a2a.types import a2a_pb2 as pb
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from troupe_gateway.app import build_app
from troupe_gateway.auth import Caller
from troupe_gateway.calls import Calls
from troupe_gateway.directory import Directory
from troupe_gateway.services import Services
from troupe_gateway.settings import Settings

from tests.integration.llm_harness import running_llm
from tests.integration.runtime_harness import provisioned
from tests.integration.test_llm_sessions import history, said, session_config
from troupe_devcluster.layout import free_port
from troupe_devcluster.scripted_llm import ScriptedLlm, Text
from troupe_runtime.contract import naming
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.gateway import DirectoryEntry, caller_session


class ByBearer:
    """Stand-in auth: the caller is the bearer token's text (``test_gateway_auth`` covers the
    real one against the API server)."""

    async def authenticate(self, headers: Mapping[str, str], namespace: str) -> Caller:
        return Caller(user=headers.get("authorization", "").removeprefix("Bearer "))

    async def authorize(self, caller: Caller, namespace: str, resource: Any, name: str) -> None:
        return None


@asynccontextmanager
async def gateway(nc: Client, js: JetStreamContext, config: RuntimeConfig) -> AsyncIterator[str]:
    """The gateway's app on a free port, the Agent listed; its base URL."""
    kv = await js.create_key_value(KeyValueConfig(bucket=naming.directory_bucket(config.namespace)))
    entry = DirectoryEntry(
        kind="Agent",
        namespace=config.namespace,
        name=config.agent,
        subject=config.inbox_subject(0),
        description="Remembers",
        ready=True,
    )
    await kv.put(
        naming.directory_key("Agent", config.agent), entry.model_dump_json(by_alias=True).encode()
    )
    services = Services(
        nc=nc,
        js=js,
        calls=Calls(nc, js, 3600),
        directory=Directory(js),
        authorizer=ByBearer(),
        kube=None,  # type: ignore[arg-type]  # the stand-in auth needs no Kubernetes
        settings=Settings(),
    )
    port = free_port()
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
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving


def text_message(message_id: str, text: str, context_id: str = "") -> pb.Message:
    return pb.Message(
        message_id=message_id,
        context_id=context_id,
        role=pb.Role.ROLE_USER,
        parts=[pb.Part(text=text)],
    )


async def test_the_a2a_context_id_is_the_llm_agents_session(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    config = session_config(nats_url, scripted_llm.base_url)
    scripted_llm.script(
        Text("Bees dance."), Text("To show where food is."), Text("Yes."), Text("Who are you?")
    )
    async with (
        provisioned(config) as (nc, js),
        running_llm(config),
        gateway(nc, js, config) as url,
    ):
        base = f"{url}/a2a/{config.namespace}/agents/{config.agent}"
        async with httpx.AsyncClient(headers={"Authorization": "Bearer alice"}, timeout=30) as http:
            client = await create_client(base, ClientConfig(streaming=False, httpx_client=http))
            request = pb.SendMessageRequest(message=text_message("m-1", "What do bees do?"))
            first = [r async for r in client.send_message(request)][-1].task
            assert first.status.state == pb.TaskState.TASK_STATE_COMPLETED
            context = first.context_id
            request = pb.SendMessageRequest(message=text_message("m-2", "Why?", context))
            second = [r async for r in client.send_message(request)][-1].task
            assert second.status.state == pb.TaskState.TASK_STATE_COMPLETED
            plain = await http.post(
                f"{url}/v1/namespaces/{config.namespace}/agents/{config.agent}:call",
                params={"contextId": context, "timeout": "30"},
                json="Really?",
            )
            stranger = await http.post(
                f"{url}/v1/namespaces/{config.namespace}/agents/{config.agent}:call",
                params={"contextId": context, "timeout": "30"},
                json="What did I ask?",
                headers={"Authorization": "Bearer mallory"},
            )
        assert plain.status_code == 200, plain.text
        assert plain.json()["contextId"] == context
        assert stranger.status_code == 200, stranger.text
        kept = await history(js, config, caller_session("alice", context))
    asked_second, asked_third = scripted_llm.completions[1], scripted_llm.completions[2]
    assert [role for role, _ in said(asked_second.messages)] == [
        "system", "user", "assistant", "user",
    ]  # fmt: skip
    assert "What do bees do?" in asked_second.messages[1]["content"]
    assert asked_second.messages[2]["content"] == "Bees dance."
    assert said(asked_third.messages)[-1] == ("user", "Really?")
    assert asked_third.messages[4]["content"] == "To show where food is."
    assert [t.assistant for t in kept.turns] == ["Bees dance.", "To show where food is.", "Yes."]
    # another caller naming the same context id is not given alice's conversation
    assert said(scripted_llm.completions[3].messages) == [
        ("system", "You are terse."),
        ("user", "What did I ask?"),
    ]
