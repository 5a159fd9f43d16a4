"""Whatever the model answers, the loop ends in an answer, a retry or a dead letter with a
precise reason; it never crashes (hypothesis over the real router, journal and NATS)."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import nats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.llm_harness import CallableTools, llm_config, tool
from troupe_devcluster.scripted_llm import (
    HttpError,
    Raw,
    Reply,
    ScriptedLlm,
    ScriptedToolCall,
    Text,
    ToolCalls,
)
from troupe_runtime.agent.llm.history import Offloader
from troupe_runtime.agent.llm.journal import Journal, ResumeState
from troupe_runtime.agent.llm.loop import Answer, Conversation, LoopSettings
from troupe_runtime.agent.llm.router import ModelRouter
from troupe_runtime.agent.llm.streaming import TokenStream
from troupe_runtime.agent.llm.types import (
    DeferMessage,
    InvalidModelOutput,
    ModelRejected,
    ModelUnavailable,
    RateLimited,
)
from troupe_runtime.agent.schemas import ContractChecker
from troupe_runtime.contract.agent_resources import build_event_log_stream
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.nats.provision import ProvisionReport, ensure_stream

ENDINGS = (InvalidModelOutput, ModelRejected, ModelUnavailable, RateLimited, DeferMessage)
"""Dead letter (invalid-output, rejected), retry (unavailable, rate limited), deferral."""

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
messages = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["assistant", "user", "tool"]) | st.text(max_size=5),
        "content": json_values,
        "tool_calls": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "id": json_values,
                    "function": st.fixed_dictionaries(
                        {},
                        optional={
                            "name": st.sampled_from(["echo", "nope"]) | json_values,
                            "arguments": json_values,
                        },
                    )
                    | json_values,
                },
            )
            | json_values,
            max_size=3,
        )
        | json_values,
    },
)
bodies = st.one_of(
    st.binary(max_size=64),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.builds(
        lambda message, finish: json.dumps(
            {"choices": [{"message": message, "finish_reason": finish}], "usage": None}
        ).encode(),
        messages,
        json_values,
    ),
)
calls = st.builds(
    ScriptedToolCall,
    name=st.sampled_from(["echo", "nope"]) | st.text(max_size=10),
    arguments=st.text(max_size=30) | json_values.map(json.dumps),
    id=st.none() | st.text(max_size=10),
)
replies: st.SearchStrategy[Reply] = st.one_of(
    st.builds(Text, content=st.text(max_size=40)),
    st.builds(ToolCalls, calls=st.lists(calls, min_size=1, max_size=3)),
    st.builds(Raw, body=bodies),
    st.builds(
        HttpError,
        status=st.sampled_from([400, 401, 404, 413, 429, 500, 503]),
        headers=st.sampled_from([{}, {"Retry-After": "30"}, {"Retry-After": "soon"}]),
    ),
)


async def _echo(arguments: dict[str, Any]) -> str:
    return json.dumps(arguments)


async def nothing() -> None:
    return None


async def converse(nats_url: str, script: list[Reply], schema: dict[str, Any] | None) -> Answer:
    with ScriptedLlm() as server:
        server.script(*script)
        config = llm_config(nats_url, server.base_url, maxTurns=3)
        assert config.llm is not None
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            await ensure_stream(js, build_event_log_stream(config.namespace), ProvisionReport())
            event = CloudEvent(id=uuid.uuid4().hex, source="/tests", type="t", data="hi")
            router = ModelRouter(config.llm, {})
            conversation = Conversation(
                LoopSettings(config.agent, config.llm.policy, schema, 8192),
                caller=router,
                toolbox=CallableTools(tool("echo", _echo, idempotent=True)),
                journal=Journal(js, config.namespace, config.agent, event.id),
                offloader=Offloader(js, config.namespace, 1024),
                stream=TokenStream(nc, f"t.{event.id}"),
                checker=ContractChecker(
                    config.contract.model_copy(update={"output_schema": schema})
                ),
                on_completion=lambda completion, total: None,
                progress=nothing,
                wait_budget=lambda: 0.0,
            )
            try:
                return await conversation.run([{"role": "user", "content": "hi"}], ResumeState())
            finally:
                await router.aclose()
        finally:
            await nc.close()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    script=st.lists(replies, min_size=1, max_size=4),
    schema=st.sampled_from([None, {"type": "object", "required": ["answer"]}]),
)
def test_any_model_output_ends_in_an_answer_a_retry_or_a_precise_dead_letter(
    nats_url: str, script: list[Reply], schema: dict[str, Any] | None
) -> None:
    try:
        answer = asyncio.run(converse(nats_url, script, schema))
    except ENDINGS as ending:
        reason = str(ending)
        assert reason  # a reason a person can read
        return
    if schema is None:
        assert isinstance(answer.data["content"], str)
    else:
        assert isinstance(answer.data, dict)
        assert "answer" in answer.data
