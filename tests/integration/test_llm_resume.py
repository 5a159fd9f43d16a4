"""Resuming from any point of a conversation's journal repeats no answered turn and no
finished tool call, and reaches the same answer: every prefix of a real journal is a crash
the loop must survive (real router, scripted model, real NATS)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import nats
from nats.js import JetStreamContext

from tests.integration.llm_harness import CallableTools, llm_config, tool
from troupe_devcluster.scripted_llm import Reply, ScriptedLlm, ScriptedToolCall, Text, ToolCalls
from troupe_runtime.agent.llm.history import Offloader
from troupe_runtime.agent.llm.journal import Journal, Record, ResumeState, resume
from troupe_runtime.agent.llm.loop import Answer, Conversation, LoopSettings
from troupe_runtime.agent.llm.router import ModelRouter
from troupe_runtime.agent.llm.streaming import TokenStream
from troupe_runtime.agent.schemas import ContractChecker
from troupe_runtime.contract import naming
from troupe_runtime.contract.agent_resources import build_event_log_stream
from troupe_runtime.nats.event_log import EventLog
from troupe_runtime.nats.provision import ProvisionReport, ensure_stream

OPENING = [{"role": "user", "content": "count twice"}]


def script() -> list[Reply]:
    return [
        ToolCalls([ScriptedToolCall("count", '{"n": 1}', "c")]),
        ToolCalls([ScriptedToolCall("count", '{"n": 2}', "c")]),  # the same call id again
        Text("counted twice"),
    ]


async def nothing() -> None:
    return None


async def counted(arguments: dict[str, Any]) -> str:
    return json.dumps(arguments)


async def converse(
    js: JetStreamContext, namespace: str, replies: list[Reply], state: ResumeState
) -> tuple[Answer, CallableTools, int, str]:
    """Run the loop from ``state``; the answer, the tools, the model calls, the log id."""
    tools = CallableTools(tool("count", counted))  # not idempotent
    with ScriptedLlm() as server:
        server.script(*replies)
        config = llm_config("nats://unused", server.base_url).model_copy(
            update={"namespace": namespace}
        )
        assert config.llm is not None
        event_id = uuid.uuid4().hex
        router = ModelRouter(config.llm, {})
        conversation = Conversation(
            LoopSettings(config.agent, config.llm.policy, None, 8192),
            caller=router,
            toolbox=tools,
            journal=Journal(js, namespace, config.agent, event_id),
            offloader=Offloader(js, namespace, 1024),
            stream=TokenStream(None, "unused"),
            checker=ContractChecker(config.contract),
            on_completion=lambda completion, total: None,
            progress=nothing,
            wait_budget=lambda: 0.0,
        )
        try:
            answer = await conversation.run(OPENING if state.fresh else [], state)
        finally:
            await router.aclose()
        return (
            answer,
            tools,
            len(server.completions),
            naming.conversation_log_id(config.agent, event_id),
        )


async def test_resuming_from_every_prefix_of_the_journal_repeats_nothing(nats_url: str) -> None:
    namespace = f"t{uuid.uuid4().hex[:10]}"
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await ensure_stream(js, build_event_log_stream(namespace), ProvisionReport())
        whole, tools, asked, log_id = await converse(js, namespace, script(), ResumeState())
        assert asked == 3
        assert whole.data["content"] == "counted twice"
        assert tools.calls == [("count", {"n": 1}), ("count", {"n": 2})]
        records = [
            Record(event.id, event.type, event.data)
            for event in await EventLog(js, namespace, log_id).replay()
        ]
        assert [record.id for record in records] == [
            "turn-0", "tool-start-0-c", "tool-0-c",
            "turn-1", "tool-start-1-c", "tool-1-c",
            "turn-2",
        ]  # fmt: skip
        for cut in range(len(records) + 1):
            kept = records[:cut]
            state = resume(kept)
            answered = state.next_turn
            started = {r.data["turn"] for r in kept if r.id.startswith("tool-start-")}
            answer, again, asked, _ = await converse(js, namespace, script()[answered:], state)
            assert answer.data["content"] == "counted twice", cut
            assert asked == 3 - answered, cut  # no answered turn asked again
            expected = [("count", {"n": n + 1}) for n in range(2) if n not in started]
            assert again.calls == expected, cut  # no finished or started call run again
    finally:
        await nc.close()
