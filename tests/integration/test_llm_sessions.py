"""Sessions of an LLM agent on the real runtime, real NATS and the scripted model: a session
remembered across messages, replicas and a restart, within its cap (trimmed or summarised),
each double-texting policy, a hostile session id, and no session I/O when sessions are off."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import BucketNotFoundError, NoKeysError

from tests.integration.llm_harness import CallableTools, llm_config, running_llm, tool
from tests.integration.runtime_harness import (
    eventually,
    inbox_empty,
    make_config,
    output_stream,
    provisioned,
    send,
    stored,
    stream_count,
)
from tests.integration.test_llm_loop import killed, start_runtime
from troupe_devcluster.layout import free_port
from troupe_devcluster.model_server import ModelServer
from troupe_devcluster.scripted_llm import ScriptedLlm, ScriptedToolCall, Text, ToolCalls
from troupe_runtime.agent.llm.sessions import SUMMARY_NOTE, SUMMARY_PROMPT
from troupe_runtime.contract import envelope, naming, pod
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.agent_resources import build_agent_resources
from troupe_runtime.contract.dead_letters import ERROR_HEADER, REASON_HEADER
from troupe_runtime.contract.sessions import SessionHistory, SessionPolicy
from troupe_runtime.nats.provision import delete_agent_resources, ensure_agent_resources

SYSTEM = {"text": "You are terse."}
SLOW = 2.5
"""Seconds the scripted model takes over a first message, so a second arrives mid-run."""


def session_config(nats_url: str, base_url: str, **session: Any) -> RuntimeConfig:
    config = llm_config(nats_url, base_url, systemPrompt=SYSTEM, session=session, tools={})
    return config.model_copy(
        update={
            "timeout": config.timeout * 5,
            "messaging": config.messaging.model_copy(update={"max_in_flight": 4}),
        }
    )


async def outputs(js: JetStreamContext, config: RuntimeConfig, count: int) -> list[Any]:
    stream = output_stream(config)

    async def enough() -> bool:
        return await stream_count(js, stream) >= count

    await eventually(enough, f"{count} outputs", 30.0)
    return [envelope.parse(m.headers, m.data or b"").data for m in await stored(js, stream)]


async def letters(js: JetStreamContext, config: RuntimeConfig) -> list[RawStreamMsg]:
    await eventually(lambda: stream_count(js, config.dead_letter_stream), "a dead letter", 30.0)
    return await stored(js, config.dead_letter_stream)


async def history(js: JetStreamContext, config: RuntimeConfig, session: str) -> SessionHistory:
    kv = await js.key_value(naming.session_bucket(config.namespace, config.agent))
    entry = await kv.get(naming.session_history_key(session))
    return SessionHistory.model_validate_json(entry.value or b"")


async def recorded(js: JetStreamContext, config: RuntimeConfig, session: str, n: int) -> None:
    async def written() -> bool:
        try:
            return len((await history(js, config, session)).turns) >= n
        except (KeyError, Exception):
            return False

    await eventually(written, f"{n} exchanges in the session's history")


def said(request_messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in request_messages]


async def asked(server: ScriptedLlm, count: int) -> None:
    await eventually(lambda: len(server.completions) >= count, f"{count} model requests")


# -- continuity ------------------------------------------------------------------------------


async def test_an_agent_remembers_a_session_across_messages(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    config = session_config(nats_url, scripted_llm.base_url)
    scripted_llm.script(Text("Bees dance."), Text("To show where food is."), Text("Hello."))
    async with provisioned(config) as (_, js), running_llm(config):
        await send(js, config, "What do bees do?", sessionid="s-1")
        await outputs(js, config, 1)
        await recorded(js, config, "s-1", 1)
        await send(js, config, "Why?", sessionid="s-1")
        await outputs(js, config, 2)
        await send(js, config, "Hi", sessionid="other")
        await outputs(js, config, 3)
        kept = await history(js, config, "s-1")
    second, other = scripted_llm.completions[1], scripted_llm.completions[2]
    assert said(second.messages) == [
        ("system", "You are terse."),
        ("user", "What do bees do?"),
        ("assistant", "Bees dance."),
        ("user", "Why?"),
    ]
    assert said(other.messages) == [("system", "You are terse."), ("user", "Hi")]
    assert [(t.user, t.assistant) for t in kept.turns] == [
        ("What do bees do?", "Bees dance."),
        ("Why?", "To show where food is."),
    ]


async def test_without_sessions_on_no_session_bucket_is_touched(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    config = llm_config(nats_url, scripted_llm.base_url, systemPrompt=SYSTEM)
    scripted_llm.script(Text("One."), Text("Two."))
    async with provisioned(config) as (_, js), running_llm(config):
        await send(js, config, "first", sessionid="s-1")
        await send(js, config, "second", sessionid="s-1")
        await outputs(js, config, 2)
        with pytest.raises(BucketNotFoundError):
            await js.key_value(naming.session_bucket(config.namespace, config.agent))
    for request in scripted_llm.completions:
        assert len(request.messages) == 2  # the system prompt and the input, nothing kept


async def test_a_message_without_a_session_id_reads_and_writes_no_session(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    config = session_config(nats_url, scripted_llm.base_url)
    scripted_llm.script(Text("One."))
    async with provisioned(config) as (_, js), running_llm(config):
        await send(js, config, "first")
        await outputs(js, config, 1)
        kv = await js.key_value(naming.session_bucket(config.namespace, config.agent))
        with pytest.raises(NoKeysError):
            await kv.keys()
        assert (await kv.status()).values == 0


async def test_a_hostile_session_id_is_dead_lettered_as_malformed_naming_it(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    config = session_config(nats_url, scripted_llm.base_url)
    async with provisioned(config) as (_, js), running_llm(config):
        headers, payload = envelope.to_binary(
            envelope.CloudEvent(id="h1", source="/t", type="t.input", data="hi")
        )
        headers["ce-sessionid"] = "..%2F..%2Fetc passwd"
        await js.publish(config.inbox_subject(0), payload, headers=headers)
        [letter] = await letters(js, config)
        await eventually(lambda: inbox_empty(js, config), "the input to be acknowledged")
    assert letter.headers is not None
    assert letter.headers[REASON_HEADER] == "malformed"
    assert "sessionid" in letter.headers[ERROR_HEADER]
    assert scripted_llm.completions == []


# -- the cap ---------------------------------------------------------------------------------


async def test_past_max_turns_the_oldest_exchange_is_trimmed(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    config = session_config(nats_url, scripted_llm.base_url, maxTurns=2)
    scripted_llm.script(Text("A1"), Text("A2"), Text("A3"), Text("A4"))
    async with provisioned(config) as (_, js), running_llm(config):
        for index in range(1, 5):
            await send(js, config, f"Q{index}", sessionid="s")
            await outputs(js, config, index)
            await recorded(js, config, "s", min(index, 2))
        kept = await history(js, config, "s")
    assert [(t.user, t.assistant) for t in kept.turns] == [("Q3", "A3"), ("Q4", "A4")]
    fourth = said(scripted_llm.completions[3].messages)
    assert ("user", "Q1") not in fourth
    assert fourth[1:] == [
        ("user", "Q2"), ("assistant", "A2"), ("user", "Q3"), ("assistant", "A3"), ("user", "Q4"),
    ]  # fmt: skip


async def test_past_the_cap_the_agents_model_summarises_the_oldest_exchanges(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    config = session_config(nats_url, scripted_llm.base_url, maxTurns=1, overflow="summarize")
    scripted_llm.script(
        Text("A1"), Text("A2"), Text("They asked Q1."), Text("A3"), Text("Q1 and Q2.")
    )
    async with provisioned(config) as (_, js), running_llm(config):
        await send(js, config, "Q1", sessionid="s")
        await outputs(js, config, 1)
        await recorded(js, config, "s", 1)
        await send(js, config, "Q2", sessionid="s")
        await outputs(js, config, 2)

        async def summarised() -> bool:
            return (await history(js, config, "s")).summary is not None

        await eventually(summarised, "the summary")
        kept = await history(js, config, "s")
        await send(js, config, "Q3", sessionid="s")
        await outputs(js, config, 3)

        async def resummarised() -> bool:
            return (await history(js, config, "s")).summary == "Q1 and Q2."

        await eventually(resummarised, "the second summary")
    summary_request = scripted_llm.completions[2]
    assert summary_request.messages[0]["content"] == SUMMARY_PROMPT
    assert "Q1" in summary_request.messages[1]["content"]
    assert kept.summary == "They asked Q1."
    assert [(t.user, t.assistant) for t in kept.turns] == [("Q2", "A2")]
    third = said(scripted_llm.completions[3].messages)
    assert third[1] == ("system", SUMMARY_NOTE.format(summary="They asked Q1."))
    assert third[2:] == [("user", "Q2"), ("assistant", "A2"), ("user", "Q3")]
    assert "Earlier summary: They asked Q1." in scripted_llm.completions[4].messages[1]["content"]


# -- double texting --------------------------------------------------------------------------


def thinking() -> ToolCalls:
    """A first turn that takes ``SLOW`` seconds and asks for a tool: the loop's next turn
    boundary comes after it."""
    return ToolCalls([ScriptedToolCall("note", "{}", "n1")], content="Thinking so far.", delay=SLOW)


async def noted(arguments: dict[str, Any]) -> str:
    return "noted"


async def double_text(
    nats_url: str, server: ScriptedLlm, policy: str, *replies: Any
) -> tuple[RuntimeConfig, list[Any], list[RawStreamMsg], SessionHistory]:
    """A first message of a session, then a second while the model is on the first."""
    config = session_config(nats_url, server.base_url, doubleTexting=policy)
    server.script(*replies)
    tools = CallableTools(tool("note", noted, idempotent=True))
    async with provisioned(config) as (_, js), running_llm(config, tools):
        await send(js, config, "first", sessionid="s")
        await asked(server, 1)
        await send(js, config, "second", sessionid="s")
        await eventually(lambda: inbox_empty(js, config), "both settled", 30.0)

        async def settled() -> bool:
            done = await stream_count(js, output_stream(config))
            if config.dead_letter.enabled:
                done += await stream_count(js, config.dead_letter_stream)
            return done >= 2

        await eventually(settled, "two outputs or dead letters", 30.0)
        out = [
            envelope.parse(m.headers, m.data or b"").data
            for m in await stored(js, output_stream(config))
        ]
        dead = await stored(js, config.dead_letter_stream)
        kept = await history(js, config, "s")
    return config, out, dead, kept


async def test_reject_dead_letters_the_second_message_as_session_busy(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    _, out, dead, kept = await double_text(
        nats_url, scripted_llm, "reject", Text("First answer.", delay=SLOW)
    )
    [letter] = dead
    assert letter.headers is not None
    assert letter.headers[REASON_HEADER] == "session-busy"
    assert "doubleTexting: reject" in letter.headers[ERROR_HEADER]
    assert envelope.parse(letter.headers, letter.data or b"").data == "second"
    assert [o["content"] for o in out] == ["First answer."]
    assert len(scripted_llm.completions) == 1
    assert [t.user for t in kept.turns] == ["first"]


async def test_enqueue_runs_the_second_message_after_the_first_with_its_exchange(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    _, out, dead, kept = await double_text(
        nats_url, scripted_llm, "enqueue", Text("First answer.", delay=SLOW), Text("Second.")
    )
    assert dead == []
    assert [o["content"] for o in out] == ["First answer.", "Second."]
    first, second = scripted_llm.served[0], scripted_llm.served[1]
    assert second.received >= first.finished  # not before the first was answered
    assert said(scripted_llm.completions[1].messages)[1:] == [
        ("user", "first"), ("assistant", "First answer."), ("user", "second"),
    ]  # fmt: skip
    assert [t.user for t in kept.turns] == ["first", "second"]


async def test_interrupt_stops_the_first_at_its_turn_boundary_and_keeps_its_answer_so_far(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    _, out, dead, kept = await double_text(
        nats_url, scripted_llm, "interrupt", thinking(), Text("Second.")
    )
    assert dead == []
    interrupted, answered = out
    assert interrupted["stopped"] == "interrupted"
    assert interrupted["content"] == "Thinking so far."
    assert answered["content"] == "Second."
    assert len(scripted_llm.completions) == 2  # the first never asked its second turn
    assert said(scripted_llm.completions[1].messages)[1:] == [
        ("user", "first"), ("assistant", "Thinking so far."), ("user", "second"),
    ]  # fmt: skip
    assert [(t.user, t.assistant) for t in kept.turns] == [
        ("first", "Thinking so far."),
        ("second", "Second."),
    ]


async def test_rollback_stops_the_first_and_discards_its_turns(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    _, out, dead, kept = await double_text(
        nats_url, scripted_llm, "rollback", thinking(), Text("Second.")
    )
    [letter] = dead
    assert letter.headers is not None
    assert letter.headers[REASON_HEADER] == "session-rolled-back"
    assert envelope.parse(letter.headers, letter.data or b"").data == "first"
    assert [o["content"] for o in out] == ["Second."]
    assert len(scripted_llm.completions) == 2
    assert said(scripted_llm.completions[1].messages) == [
        ("system", "You are terse."),
        ("user", "second"),
    ]
    assert [t.user for t in kept.turns] == ["second"]


# -- replicas and restarts -------------------------------------------------------------------


async def ready(port: int) -> bool:
    try:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}{pod.READY_PATH}", timeout=2)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


async def test_a_session_continues_across_two_replicas_and_a_restart(
    nats_url: str, scripted_llm: ScriptedLlm, tmp_path: Path
) -> None:
    base = session_config(nats_url, scripted_llm.base_url)
    base = base.model_copy(
        update={"messaging": base.messaging.model_copy(update={"max_in_flight": 1})}
    )
    scripted_llm.script(Text("A1", delay=SLOW), Text("A2"), Text("A3"))
    replicas = []
    async with provisioned(base) as (_, js):
        # As the operator provisions two replicas: the consumer lets each hold a message.
        await ensure_agent_resources(js, build_agent_resources(base, replicas=2))
        try:
            for name in ("a", "b"):
                port = free_port()
                (tmp_path / name).mkdir()
                replicas.append(
                    start_runtime(base.model_copy(update={"health_port": port}), tmp_path / name)
                )
                await eventually(partial(ready, port), f"replica {name}", 30.0)
            # Each replica takes one message at a time: the second goes to the idle one,
            # which waits for the first's answer (enqueue) and is given it.
            await send(js, base, "Q1", sessionid="s")
            await asked(scripted_llm, 1)
            await send(js, base, "Q2", sessionid="s")
            await outputs(js, base, 2)
        finally:
            for process in replicas:
                killed(process)  # kill -9
        restarted = base.model_copy(update={"health_port": free_port()})
        (tmp_path / "c").mkdir()
        again = start_runtime(restarted, tmp_path / "c")
        try:
            await send(js, base, "Q3", sessionid="s")
            answers = await outputs(js, base, 3)
        finally:
            killed(again)
        kept = await history(js, base, "s")
    first, second, third = scripted_llm.completions
    assert first.peer[1] != second.peer[1]  # two processes, two connections
    assert said(second.messages)[1:] == [("user", "Q1"), ("assistant", "A1"), ("user", "Q2")]
    assert said(third.messages)[1:] == [
        ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2"), ("user", "Q3"),
    ]  # fmt: skip
    assert [a["content"] for a in answers] == ["A1", "A2", "A3"]
    assert [t.user for t in kept.turns] == ["Q1", "Q2", "Q3"]


async def test_the_session_bucket_is_provisioned_with_the_retention_and_deleted_with_the_agent(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    config = session_config(nats_url, scripted_llm.base_url, retention="2h")
    bucket = naming.session_bucket(config.namespace, config.agent)
    async with provisioned(config) as (_, js):
        info = await js.stream_info(naming.kv_stream(bucket))
        assert info.config.max_age == 7200.0
        assert info.config.max_msgs_per_subject == 1
        deleted = await delete_agent_resources(js, build_agent_resources(config))
        assert f"stream/{naming.kv_stream(bucket)}" in deleted
        with pytest.raises(BucketNotFoundError):
            await js.key_value(bucket)
    assert json.dumps(deleted)


# -- the real local model --------------------------------------------------------------------


async def test_the_local_model_summarises_what_leaves_the_cap(
    nats_url: str, local_model: ModelServer
) -> None:
    """Summarising is the model's own work: SmolLM2 writes the summary end to end once."""
    llm = {
        "policy": {
            "model": {"provider": "local", "model": local_model.model},
            "maxTokens": 32,
            "temperature": 0,
            "session": {"maxTurns": 1, "overflow": "summarize"},
        },
        "providers": [
            {
                "name": "local",
                "spec": {
                    "baseUrl": local_model.base_url,
                    "models": [{"name": local_model.model, "contextWindow": 2048}],
                },
            }
        ],
    }
    config = make_config(
        nats_url, handler={"type": "llm"}, llm=llm, timeout="60s", messaging={"ackWait": "90s"}
    )
    async with provisioned(config) as (_, js), running_llm(config):
        await send(js, config, "My name is Ada and I like red.", sessionid="s")
        await outputs(js, config, 1)
        await recorded(js, config, "s", 1)
        await send(js, config, "What colour do I like?", sessionid="s")
        await outputs(js, config, 2)

        async def summarised() -> bool:
            return bool((await history(js, config, "s")).summary)

        await eventually(summarised, "the model's summary", 120.0)
        kept = await history(js, config, "s")
    assert [t.user for t in kept.turns] == ["What colour do I like?"]
    assert kept.summary
    assert len(kept.encoded()) <= SessionPolicy().max_bytes
