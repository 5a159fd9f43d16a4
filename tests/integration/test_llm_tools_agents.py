"""Agents as tools against a real nats-server and a real callee runtime: the callee's input
schema as parameters, request/reply through its inbox, one request per message and tool
call however often the caller asks, failures and silence as error results."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.js import JetStreamContext

from tests.integration.runtime_harness import make_config, provisioned, running
from troupe_runtime.agent.context import AgentError, Context
from troupe_runtime.agent.llm.tools import CompositeToolBox, bound, toolbox_factory
from troupe_runtime.agent.llm.tools.agents import build_request
from troupe_runtime.agent.llm.types import ToolCall
from troupe_runtime.contract import envelope
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.llm import LlmRuntime

SCHEMA = {
    "type": "object",
    "properties": {"topic": {"type": "string"}, "depth": {"type": "integer"}},
    "required": ["topic"],
    "additionalProperties": False,
}


class Researcher:
    """The callee: answers findings, fails on "nothing", takes its time on "slow"."""

    def __init__(self) -> None:
        self.seen: list[CloudEvent] = []

    async def __call__(self, ctx: Context) -> Any:
        self.seen.append(ctx.event)
        topic = ctx.event.data["topic"]
        if topic == "nothing":
            raise AgentError("NoSources", "nothing found")
        if topic == "slow":
            await asyncio.sleep(2)
        return {"findings": f"about {topic}"}


class Team:
    def __init__(
        self, callee: RuntimeConfig, caller: RuntimeConfig, js: JetStreamContext, nc: Client
    ) -> None:
        self.callee = callee
        self.caller = caller
        self.js = js
        self.nc = nc
        self.researcher = Researcher()

    async def toolbox(self, wait: str = "10s") -> CompositeToolBox:
        runtime = LlmRuntime.model_validate(
            {
                "policy": {
                    "model": {"provider": "local", "model": "m"},
                    "tools": {"agents": [{"agent": "researcher", "timeout": wait}]},
                },
                "agents": [
                    {
                        "name": "researcher",
                        "inboxSubject": self.callee.inbox_subject(0),
                        "inputSchema": SCHEMA,
                        "description": "Finds sources on a topic.",
                    }
                ],
            }
        )
        config = self.caller.model_copy(update={"llm": runtime})
        return await toolbox_factory(config)(self.nc, self.js)


@pytest.fixture
async def team(nats_url: str) -> AsyncIterator[Team]:
    callee = make_config(
        nats_url,
        agent="researcher",
        contract={
            "inputSchema": SCHEMA,
            "errorStates": [{"name": "NoSources", "retryable": False}],
        },
    )
    caller = RuntimeConfig.model_validate(
        {"agent": "analyst", "namespace": callee.namespace, "nats": {"url": nats_url}}
    )
    async with provisioned(callee) as (nc, js):
        team = Team(callee, caller, js, nc)
        async with running(callee, team.researcher):
            yield team


def message(**data: Any) -> CloudEvent:
    return CloudEvent(id=uuid.uuid4().hex, source="/tests", type="question", data=data)


def ask(arguments: dict[str, Any], call_id: str = "call-1") -> tuple[ToolCall, dict[str, Any]]:
    return ToolCall(id=call_id, name="researcher", arguments=json.dumps(arguments)), arguments


async def test_the_callees_input_schema_is_the_tools_parameters(team: Team) -> None:
    tools = await team.toolbox()
    try:
        [spec] = await tools.specs()
    finally:
        await tools.aclose()
    assert spec.name == "researcher"
    assert spec.parameters == SCHEMA
    assert spec.description == "Finds sources on a topic."
    assert spec.idempotent is True


async def test_a_call_is_answered_by_the_callee_through_its_inbox(team: Team) -> None:
    tools = await team.toolbox()
    cause = message(question="why?")
    try:
        result = await bound(tools, cause).call(*ask({"topic": "tides"}))
    finally:
        await tools.aclose()
    assert not result.is_error
    assert json.loads(result.content) == {"findings": "about tides"}
    [request] = team.researcher.seen
    assert request.data == {"topic": "tides"}
    assert request.correlationid == cause.id
    assert request.causationid == cause.id
    assert request.source == f"/{team.caller.namespace}/analyst"


async def test_the_same_message_and_tool_call_reach_the_callee_once(team: Team) -> None:
    tools = await team.toolbox()
    cause = message()
    try:
        first = await tools.for_message(cause).call(*ask({"topic": "moon"}))
        again = await tools.for_message(cause).call(*ask({"topic": "moon"}))
        other = await tools.for_message(cause).call(*ask({"topic": "moon"}, call_id="call-2"))
    finally:
        await tools.aclose()
    assert first == again
    assert not other.is_error
    assert len(team.researcher.seen) == 2
    assert team.researcher.seen[0].id != team.researcher.seen[1].id


async def test_a_callee_that_fails_is_an_error_result_with_its_reason(team: Team) -> None:
    tools = await team.toolbox()
    try:
        result = await tools.for_message(message()).call(*ask({"topic": "nothing"}))
    finally:
        await tools.aclose()
    assert result.is_error
    assert "agent researcher failed (rejected)" in result.content
    assert "nothing found" in result.content


async def test_a_callee_that_does_not_answer_in_time_is_an_error_result(team: Team) -> None:
    tools = await team.toolbox(wait="500ms")
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        result = await tools.for_message(message()).call(*ask({"topic": "slow"}))
        took = loop.time() - started
    finally:
        await tools.aclose()
    assert result.is_error
    assert "agent researcher did not answer within 0.5s" in result.content
    assert 0.5 <= took < 1.5


@pytest.mark.parametrize(
    "arguments",
    [{}, {"topic": 3}, {"topic": "x", "depth": "deep"}, {"topic": "x", "extra": 1}],
    ids=["missing", "wrong type", "wrong nested type", "unknown"],
)
async def test_arguments_off_the_callees_schema_are_an_error_and_nothing_is_sent(
    team: Team, arguments: dict[str, Any]
) -> None:
    tools = await team.toolbox()
    try:
        result = await tools.for_message(message()).call(*ask(arguments))
    finally:
        await tools.aclose()
    assert result.is_error
    assert "arguments violate the tool's schema" in result.content
    assert team.researcher.seen == []


async def test_a_toolbox_not_bound_to_a_message_cannot_call_an_agent(team: Team) -> None:
    tools = await team.toolbox()
    try:
        result = await tools.call(*ask({"topic": "tides"}))
    finally:
        await tools.aclose()
    assert result.is_error
    assert team.researcher.seen == []


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(["topic", "depth", "x"]), children, max_size=3)
    ),
    max_leaves=10,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(arguments=JSON)
def test_arbitrary_arguments_never_crash_an_agent_call(nats_url: str, arguments: Any) -> None:
    async def attempt() -> None:
        callee = make_config(nats_url, agent="researcher", contract={"inputSchema": SCHEMA})
        caller = RuntimeConfig.model_validate(
            {"agent": "analyst", "namespace": callee.namespace, "nats": {"url": nats_url}}
        )
        async with provisioned(callee) as (nc, js):
            team = Team(callee, caller, js, nc)
            tools = await team.toolbox(wait="200ms")
            try:
                call = ToolCall(id="c", name="researcher", arguments="")
                result = await tools.for_message(message()).call(call, arguments)
            finally:
                await tools.aclose()
        assert isinstance(result.content, str)

    asyncio.run(attempt())


async def test_a_reply_given_after_the_caller_gave_up_answers_the_same_call_later(
    team: Team,
) -> None:
    """A caller redelivered after a crash asks again with the same ids: the stored reply
    answers it, and the callee does not run a second time."""
    cause = message()
    impatient = await team.toolbox(wait="200ms")
    try:
        gave_up = await impatient.for_message(cause).call(*ask({"topic": "slow"}))
    finally:
        await impatient.aclose()
    assert gave_up.is_error
    patient = await team.toolbox(wait="10s")
    try:
        later = await patient.for_message(cause).call(*ask({"topic": "slow"}))
    finally:
        await patient.aclose()
    assert json.loads(later.content) == {"findings": "about slow"}
    assert len(team.researcher.seen) == 1


async def test_a_reply_from_another_agent_is_not_taken_for_the_callees(team: Team) -> None:
    cause = message()
    tools = await team.toolbox(wait="10s")
    call, arguments = ask({"topic": "slow"})
    forged_for = build_request(team.caller, cause, call, arguments)
    forged = CloudEvent(
        id="forged",
        source=f"/{team.callee.namespace}/intruder",
        type="troupe.tool.call.result",
        causationid=forged_for.id,
        data={"findings": "forged"},
    )
    headers, payload = envelope.to_binary(forged)
    assert forged_for.replyto is not None
    await team.js.publish(forged_for.replyto, payload, headers=headers)
    try:
        result = await tools.for_message(cause).call(call, arguments)
    finally:
        await tools.aclose()
    assert json.loads(result.content) == {"findings": "about slow"}
