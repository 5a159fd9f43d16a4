"""Remote A2A agents as tools against a real A2A server (the a2a-sdk's own server side, on
uvicorn): the card read into one tool, a blocking SendMessage answered with the task's
artifacts, failures, questions, silence and HTTP errors as error results the model reads,
the bearer token sent to the card's origin only and never shown; then the whole LLM agent
on the real runtime and the scripted model calling the remote agent."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import nats
import pytest
import uvicorn
from nats.js.api import KeyValueConfig, StreamConfig
from prometheus_client import CollectorRegistry
from troupe_gateway.app import build_app
from troupe_gateway.calls import Calls
from troupe_gateway.directory import Directory
from troupe_gateway.services import Services
from troupe_gateway.settings import Settings

from tests.integration.llm_harness import llm_config
from tests.integration.runtime_harness import (
    eventually,
    inbox_empty,
    output_stream,
    provisioned,
    send,
    stored,
    stream_count,
)
from tests.integration.test_gateway_a2a_client import Everyone
from tests.integration.test_gateway_calls import AGENT, answer
from tests.support.a2a_servers import SLOW_SECONDS, remote_a2a
from troupe_devcluster.layout import free_port
from troupe_devcluster.scripted_llm import ScriptedLlm, ScriptedToolCall, Text, ToolCalls
from troupe_runtime.agent.handlers import LoadedHandler
from troupe_runtime.agent.llm.handler import llm_agent
from troupe_runtime.agent.llm.tools import bound, build_toolbox
from troupe_runtime.agent.llm.tools.a2a import A2aToolBox
from troupe_runtime.agent.llm.types import ToolCall
from troupe_runtime.agent.runtime import Runtime
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.gateway import DirectoryEntry
from troupe_runtime.contract.llm import LlmRuntime, ResolvedTool, a2a_token_env
from troupe_runtime.serving.metrics import LlmMetrics

TOKEN = "tok-" + uuid.uuid4().hex
NAME = "upper"


def runtime_of(url: str, *, token: bool = False, **agent: Any) -> LlmRuntime:
    entry: dict[str, Any] = {"name": NAME, "url": url, "timeout": "3s", **agent}
    resolved: dict[str, Any] = {"name": NAME, "url": url}
    if token:
        entry["auth"] = {"bearerTokenSecret": {"name": "upper-token", "key": "token"}}
        resolved["tokenEnv"] = a2a_token_env(NAME)
    return LlmRuntime.model_validate(
        {
            "policy": {"model": {"provider": "p", "model": "m"}, "tools": {"a2a": [entry]}},
            "a2a": [resolved],
        }
    )


@asynccontextmanager
async def tools_for(
    url: str, *, token: bool = False, metrics: LlmMetrics | None = None, **agent: Any
) -> AsyncIterator[Any]:
    runtime = runtime_of(url, token=token, **agent)
    config = RuntimeConfig.model_validate(
        {"agent": "caller", "namespace": "a2a", "nats": {"url": "nats://127.0.0.1:1"}}
    )
    env = {a2a_token_env(NAME): TOKEN} if token else {}
    box = await build_toolbox(runtime, config=config, nc=None, js=None, env=env, metrics=metrics)
    try:
        yield bound(box, CloudEvent(id="msg-1", source="/tests", type="question", data={}))
    finally:
        await box.aclose()


def callers_log(caplog: pytest.LogCaptureFixture) -> str:
    """What the caller's side logged: the remote agent runs in this process too, and its
    server logs the headers it receives, as a real remote's would in its own pod."""
    return "\n".join(
        record.getMessage()
        for record in caplog.records
        if not record.name.startswith(("a2a.server", "uvicorn", "starlette"))
    )


def ask(text: str, call_id: str = "c1", **more: Any) -> tuple[ToolCall, dict[str, Any]]:
    arguments = {"text": text, **more}
    return ToolCall(id=call_id, name=NAME, arguments=json.dumps(arguments)), arguments


async def test_the_card_becomes_one_tool_named_by_the_policy_with_its_skills() -> None:
    async with remote_a2a() as remote, tools_for(remote.base_url) as tools:
        [spec] = await tools.specs()
    assert spec.name == NAME
    assert spec.parameters["required"] == ["text"]
    assert "Its card: Upper: Upper-cases what it is sent." in spec.description
    assert "- Upper-case: Shouts the text back." in spec.description
    assert "- Count: Counts letters." in spec.description
    assert spec.idempotent is False


async def test_the_skill_filter_keeps_only_the_skills_it_names() -> None:
    async with remote_a2a() as remote, tools_for(remote.base_url, skills=["count"]) as tools:
        [spec] = await tools.specs()
    assert "- Count: Counts letters." in spec.description
    assert "Shouts" not in spec.description


async def test_a_call_is_answered_with_the_final_tasks_artifacts() -> None:
    async with remote_a2a() as remote, tools_for(remote.base_url) as tools:
        result = await tools.call(*ask("hello there", data={"n": 2}))
        await tools.call(*ask("hello there", data={"n": 2}))
    assert not result.is_error
    assert result.content == 'HELLO THERE\n{"n": 2.0}'
    assert remote.seen.texts == ["hello there", "hello there"]
    [first, second] = remote.seen.message_ids
    assert first == second, "the same message and tool call send the same message id"


async def test_an_agent_speaking_http_json_is_called_the_same_way() -> None:
    async with remote_a2a(binding="HTTP+JSON") as remote, tools_for(remote.base_url) as tools:
        result = await tools.call(*ask("over rest", data={"k": "v"}))
    assert remote.agent_card.supported_interfaces[0].protocol_binding == "HTTP+JSON"
    assert (result.content, result.is_error) == ('OVER REST\n{"k": "v"}', False)


async def test_the_card_url_itself_works_as_well_as_the_base_url() -> None:
    async with remote_a2a() as remote:
        url = remote.base_url + "/.well-known/agent-card.json"
        async with tools_for(url) as tools:
            result = await tools.call(*ask("via the card"))
    assert result.content == "VIA THE CARD"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("fail: the disk is full", "remote agent upper: the task failed: the disk is full"),
        ("input", "remote agent upper asks for input: which city do you mean?; this tool"),
    ],
    ids=["failed", "input-required"],
)
async def test_a_task_that_fails_or_asks_for_input_is_an_error_with_the_agents_words(
    text: str, expected: str
) -> None:
    async with remote_a2a() as remote, tools_for(remote.base_url) as tools:
        result = await tools.call(*ask(text))
    assert result.is_error
    assert result.content.startswith(expected), result.content


async def test_an_agent_slower_than_the_timeout_is_an_error_within_it() -> None:
    async with remote_a2a() as remote, tools_for(remote.base_url, timeout="500ms") as tools:
        result = await tools.call(*ask("slow"))
        assert SLOW_SECONDS > 1
    assert result.is_error
    assert result.content == "remote agent upper did not answer within 0.5s"


async def test_an_http_error_is_an_error_result_naming_the_status() -> None:
    async with (
        remote_a2a(interface_url="{base}/broken") as remote,
        tools_for(remote.base_url) as tools,
    ):
        result = await tools.call(*ask("hello"))
    assert result.is_error
    assert result.content.startswith("calling remote agent upper failed:"), result.content
    assert "HTTP Error 500" in result.content


async def test_an_agent_down_at_start_is_offered_and_answers_once_it_is_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    with caplog.at_level(logging.WARNING):
        async with tools_for(f"http://127.0.0.1:{port}") as tools:
            [spec] = await tools.specs()
            down = await tools.call(*ask("anyone?"))
            async with remote_a2a(port=port):
                up = await tools.call(*ask("now"))
    assert spec.name == NAME
    assert down.is_error
    assert down.content.startswith("remote agent upper cannot be called: its card cannot be read")
    assert up.content == "NOW"
    assert f"A2A agent upper (http://127.0.0.1:{port}): its card cannot be read" in caplog.text


async def test_the_token_is_sent_as_a_bearer_and_never_shown_even_when_echoed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG):
        async with remote_a2a(token=TOKEN) as remote:
            async with tools_for(remote.base_url, token=True) as tools:
                answered = await tools.call(*ask("secret handshake"))
                echoed = await tools.call(*ask("echo-auth"))
            async with tools_for(remote.base_url) as tools:
                refused = await tools.call(*ask("no token"))
        async with (
            remote_a2a(token=TOKEN, interface_url="{base}/broken") as broken,
            tools_for(broken.base_url, token=True) as tools,
        ):
            failed = await tools.call(*ask("hello"))
    assert answered.content == "SECRET HANDSHAKE"
    assert f"Bearer {TOKEN}" in remote.seen.authorization
    assert echoed.is_error
    assert echoed.content == "remote agent upper: the task failed: you sent Bearer [redacted]"
    assert refused.is_error
    assert "401" in refused.content
    assert failed.is_error
    for shown in (answered, echoed, refused, failed):
        assert TOKEN not in shown.content
    assert TOKEN not in callers_log(caplog)


async def test_with_a_token_a_card_pointing_elsewhere_is_refused_and_nothing_is_sent() -> None:
    elsewhere = f"http://127.0.0.2:{free_port()}/"
    async with (
        remote_a2a(token=TOKEN, interface_url=elsewhere) as remote,
        tools_for(remote.base_url, token=True) as tools,
    ):
        result = await tools.call(*ask("hello"))
    assert result.is_error
    assert "none of the card's interfaces is on the card's origin" in result.content
    assert remote.seen.texts == []


async def test_a_missing_token_variable_is_a_start_up_error_naming_it() -> None:
    runtime = runtime_of("http://127.0.0.1:1", token=True)
    with pytest.raises(ValueError, match=a2a_token_env(NAME)):
        A2aToolBox.from_policy(runtime.policy.tools.a2a, runtime.a2a, {})


async def test_arguments_off_the_schema_are_an_error_and_nothing_is_sent() -> None:
    async with remote_a2a() as remote, tools_for(remote.base_url) as tools:
        empty = await tools.call(ToolCall("c1", NAME, "{}"), {})
        extra = await tools.call(ToolCall("c2", NAME, "{}"), {"text": "a", "to": "b"})
    assert empty.is_error
    assert extra.is_error
    assert "arguments violate the tool's schema" in empty.content
    assert remote.seen.texts == []


async def test_calls_are_counted_by_kind_and_outcome() -> None:
    metrics = LlmMetrics(CollectorRegistry())
    async with remote_a2a() as remote, tools_for(remote.base_url, metrics=metrics) as tools:
        await tools.call(*ask("one"))
        await tools.call(*ask("fail: two"))

    def counted(outcome: str) -> float:
        labels = {"agent": "caller", "kind": "a2a", "outcome": outcome}
        return metrics.registry.get_sample_value("troupe_llm_tool_calls_total", labels) or 0.0

    assert (counted("succeeded"), counted("error")) == (1, 1)


# Troupe's own gateway as the remote agent: a Troupe Agent called from another as A2A.


async def test_a_troupe_agent_behind_the_gateway_answers_as_a_remote_a2a_tool(
    nats_url: str,
) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    ns = f"a2a-{uuid.uuid4().hex[:6]}"
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
        description="Echoes what it is sent",
        ready=True,
    )
    await kv.put(
        naming.directory_key("Agent", AGENT), entry.model_dump_json(by_alias=True).encode()
    )
    services = Services(
        nc=nc,
        js=js,
        calls=Calls(nc, js, 3600),
        directory=Directory(js),
        authorizer=Everyone(),
        kube=None,  # type: ignore[arg-type]  # the stand-in auth needs no Kubernetes
        settings=Settings(),
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(build_app(services), host="127.0.0.1", port=port, log_level="warning")
    )
    serving = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started or serving.done(), "the gateway to start")
        assert not serving.done(), "the gateway stopped"
        base = f"http://127.0.0.1:{port}/a2a/{ns}/agents/{AGENT}"
        async with tools_for(base, token=True) as tools:
            [spec] = await tools.specs()
            agent = asyncio.create_task(answer(nc, entry, 1))
            result = await tools.call(*ask("hello gateway"))
            await agent
    finally:
        server.should_exit = True
        await serving
        await nc.close()
    assert "Echoes what it is sent" in spec.description
    assert not result.is_error, result.content
    assert json.loads(result.content) == {"echo": "hello gateway"}


# The whole LLM agent: the real runtime, the real tools, the scripted model.


@asynccontextmanager
async def llm_agent_running(config: RuntimeConfig) -> AsyncIterator[LlmMetrics]:
    metrics = LlmMetrics(CollectorRegistry())
    agent = llm_agent(config, metrics, {**os.environ, a2a_token_env(NAME): TOKEN})
    handler = LoadedHandler(agent, agent.close, agent.bind)
    runtime = Runtime(config, handler=handler, host="127.0.0.1", port=0, grace=2.0)
    task = asyncio.create_task(runtime.run())

    async def ready() -> bool:
        if task.done():
            task.result()
        return runtime.ready()

    await eventually(ready, "the runtime to become ready")
    try:
        yield metrics
    finally:
        runtime.stop()
        await asyncio.wait_for(task, 30)


def agent_config(nats_url: str, scripted_llm: ScriptedLlm, url: str) -> RuntimeConfig:
    """The LLM agent calling ``url`` with the token, as the operator resolves it."""
    entry = {
        "name": NAME,
        "url": url,
        "timeout": "1500ms",
        "auth": {"bearerTokenSecret": {"name": "upper-token", "key": "token"}},
    }
    config = llm_config(nats_url, scripted_llm.base_url, tools={"a2a": [entry]})
    assert config.llm is not None
    resolved = ResolvedTool(name=NAME, url=url, token_env=a2a_token_env(NAME))
    return config.model_copy(update={"llm": config.llm.model_copy(update={"a2a": [resolved]})})


def tool_messages(scripted_llm: ScriptedLlm) -> list[str]:
    return [
        str(message["content"])
        for request in scripted_llm.completions
        for message in request.messages
        if message.get("role") == "tool"
    ]


async def everything_stored(js: Any, config: RuntimeConfig) -> str:
    """Every message the agent's streams hold (outputs, journal, dead letters), as text."""
    texts = []
    for stream in (
        output_stream(config),
        naming.event_log_stream(config.namespace),
        config.dead_letter_stream,
    ):
        try:
            for msg in await stored(js, stream):
                texts.append(repr(msg.headers) + (msg.data or b"").decode("utf-8", "replace"))
        except Exception as error:  # a stream the run never created holds nothing
            texts.append(f"{stream}: {type(error).__name__}")
    return "\n".join(texts)


async def test_an_llm_agent_calls_the_remote_agent_and_answers_with_its_reply(
    nats_url: str, scripted_llm: ScriptedLlm, caplog: pytest.LogCaptureFixture
) -> None:
    scripted_llm.script(
        ToolCalls([ScriptedToolCall(NAME, json.dumps({"text": "bees dance"}), "call-1")]),
        Text("The remote agent says: BEES DANCE"),
    )
    with caplog.at_level(logging.DEBUG):
        async with remote_a2a(token=TOKEN) as remote:
            config = agent_config(nats_url, scripted_llm, remote.base_url)
            async with provisioned(config) as (_, js), llm_agent_running(config) as metrics:
                await send(js, config, {"q": "what do bees do?"})
                await eventually(
                    lambda: _count_at_least(js, output_stream(config), 1), "the answer"
                )
                [output] = await stored(js, output_stream(config))
                everything = await everything_stored(js, config)
    answer = envelope.parse(output.headers, output.data or b"").data
    assert answer["content"] == "The remote agent says: BEES DANCE"
    assert tool_messages(scripted_llm) == ["BEES DANCE"]
    request = scripted_llm.completions[0]
    [tool] = request.body["tools"]
    assert tool["function"]["name"] == NAME
    assert "Upper-cases what it is sent." in tool["function"]["description"]
    assert remote.seen.texts == ["bees dance"]
    labels = {"agent": config.agent, "kind": "a2a", "outcome": "succeeded"}
    assert metrics.registry.get_sample_value("troupe_llm_tool_calls_total", labels) == 1
    assert TOKEN not in callers_log(caplog)
    assert TOKEN not in everything
    assert TOKEN not in config.to_json()


async def test_a_failing_remote_agent_is_a_tool_error_the_model_reads_and_answers_after(
    nats_url: str, scripted_llm: ScriptedLlm, caplog: pytest.LogCaptureFixture
) -> None:
    scripted_llm.script(
        ToolCalls([ScriptedToolCall(NAME, json.dumps({"text": "echo-auth"}), "call-1")]),
        ToolCalls([ScriptedToolCall(NAME, json.dumps({"text": "fail: out of paper"}), "c2")]),
        Text("The remote agent could not help."),
    )
    with caplog.at_level(logging.DEBUG):
        async with remote_a2a(token=TOKEN) as remote:
            config = agent_config(nats_url, scripted_llm, remote.base_url)
            async with provisioned(config) as (_, js), llm_agent_running(config) as metrics:
                await send(js, config, {"q": "help"})
                await eventually(
                    lambda: _count_at_least(js, output_stream(config), 1), "the answer"
                )
                await eventually(lambda: inbox_empty(js, config), "the input to be acknowledged")
                [output] = await stored(js, output_stream(config))
                everything = await everything_stored(js, config)
    answer = envelope.parse(output.headers, output.data or b"").data
    assert answer["content"] == "The remote agent could not help."
    assert tool_messages(scripted_llm)[-2:] == [
        "remote agent upper: the task failed: you sent Bearer [redacted]",
        "remote agent upper: the task failed: out of paper",
    ]
    labels = {"agent": config.agent, "kind": "a2a", "outcome": "error"}
    assert metrics.registry.get_sample_value("troupe_llm_tool_calls_total", labels) == 2
    assert TOKEN not in callers_log(caplog)
    assert TOKEN not in everything


async def test_a_model_that_keeps_calling_an_unreachable_agent_dead_letters_precisely(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    call = ToolCalls([ScriptedToolCall(NAME, json.dumps({"text": "anyone?"}), "call-1")])
    scripted_llm.answer_by_default(call)
    url = f"http://127.0.0.1:{free_port()}"
    config = agent_config(nats_url, scripted_llm, url)
    assert config.llm is not None
    policy = config.llm.policy.model_copy(update={"max_turns": 2})
    config = config.model_copy(update={"llm": config.llm.model_copy(update={"policy": policy})})
    async with provisioned(config) as (_, js), llm_agent_running(config):
        await send(js, config, {"q": "help"})
        await eventually(lambda: stream_count(js, config.dead_letter_stream), "a dead letter")
        [letter] = await stored(js, config.dead_letter_stream)
    headers = dict(letter.headers or {})
    assert "tools on its last turn" in json.dumps(headers) + (letter.data or b"").decode()
    assert tool_messages(scripted_llm)[0].startswith(
        "remote agent upper cannot be called: its card cannot be read"
    )


async def _count_at_least(js: Any, stream: str, count: int) -> bool:
    return await stream_count(js, stream) >= count
