"""The LLM agent's loop on the real runtime, real NATS and the scripted model: answers,
tools, the journal and resuming from it, bounded history, 429s, structured output, usage
and streaming."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import NoKeysError, NotFoundError

from tests.integration.llm_harness import (
    MODEL,
    PROVIDER,
    CallableTools,
    effects,
    llm_config,
    running_llm,
    tool,
)
from tests.integration.runtime_harness import (
    EFFECTS_ENV,
    eventually,
    inbox_empty,
    output_stream,
    provisioned,
    send,
    stored,
    stream_count,
)
from troupe_devcluster.layout import free_port
from troupe_devcluster.scripted_llm import HttpError, ScriptedLlm, ScriptedToolCall, Text, ToolCalls
from troupe_runtime.contract import envelope, naming, pod
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.dead_letters import ERROR_HEADER, REASON_HEADER
from troupe_runtime.contract.usage import Usage
from troupe_runtime.nats.event_log import EventLog
from troupe_runtime.serving.metrics import LlmMetrics

REPOSITORY = Path(__file__).resolve().parents[2]
HARNESS = "tests.integration.llm_harness"


async def outputs(
    js: JetStreamContext, config: RuntimeConfig, count: int = 1, within: float = 20.0
) -> list[RawStreamMsg]:
    stream = output_stream(config)
    await eventually(lambda: _at_least(js, stream, count), f"{count} outputs", within)
    return await stored(js, stream)


async def _at_least(js: JetStreamContext, stream: str, count: int) -> bool:
    return await stream_count(js, stream) >= count


async def letters(js: JetStreamContext, config: RuntimeConfig) -> list[RawStreamMsg]:
    await eventually(lambda: stream_count(js, config.dead_letter_stream), "a dead letter")
    await eventually(lambda: inbox_empty(js, config), "the input to be acknowledged")
    return await stored(js, config.dead_letter_stream)


async def usage_recorded(js: JetStreamContext, config: RuntimeConfig) -> Usage:
    """The agent's usage in the namespace's per-minute usage bucket, once it is there."""
    found: list[Usage] = []

    async def written() -> bool:
        try:
            kv = await js.key_value(naming.usage_bucket(config.namespace))
            keys = await kv.keys()  # (nats-py's filters match substrings, not subjects)
        except (NotFoundError, NoKeysError):
            return False
        [key] = keys
        assert key.startswith(f"{config.agent}.{PROVIDER}.{MODEL}.")
        entry = await kv.get(key)
        found.append(Usage.model_validate_json(entry.value or b""))
        return True

    await eventually(written, "the usage record")
    return found[-1]


def counted(metrics: LlmMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def data_of(msg: RawStreamMsg) -> Any:
    return envelope.parse(msg.headers, msg.data or b"").data


async def journal(js: JetStreamContext, config: RuntimeConfig, event_id: str) -> list[str]:
    log = EventLog(js, config.namespace, naming.conversation_log_id(config.agent, event_id))
    return [event.id for event in await log.replay()]


async def test_an_answer_without_tools_is_the_output_with_its_usage(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    config = llm_config(
        nats_url, scripted_llm.base_url, systemPrompt={"text": "About {{ input.q }}."}
    )
    scripted_llm.script(Text("Bees dance.", usage=(100, 20)))
    async with provisioned(config) as (_, js), running_llm(config) as (_, metrics):
        await send(js, config, {"q": "bees"})
        [output] = await outputs(js, config)
        recorded = await usage_recorded(js, config)
    parsed = envelope.parse(output.headers, output.data or b"")
    assert parsed.data == {
        "content": "Bees dance.",
        "model": MODEL,
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
    }
    assert Usage.from_attributes(parsed.model_extra or {}) == Usage(
        tokens_in=100, tokens_out=20, cost_usd=(100 * 2.0 + 20 * 10.0) / 1e6
    )
    [request] = scripted_llm.completions
    assert request.messages == [
        {"role": "system", "content": "About bees."},
        {"role": "user", "content": '{"q":"bees"}'},
    ]
    assert recorded == Usage(tokens_in=100, tokens_out=20, cost_usd=0.0004)
    labels = {"agent": config.agent, "provider": PROVIDER, "model": MODEL}
    assert counted(metrics, "troupe_llm_tokens_total", **labels, direction="in") == 100
    assert counted(metrics, "troupe_llm_tokens_total", **labels, direction="out") == 20
    assert counted(metrics, "troupe_llm_cost_usd_total", **labels) == 0.0004
    assert counted(metrics, "troupe_llm_requests_total", **labels, outcome="succeeded") == 1


def call(name: str, arguments: str = "{}", id: str | None = None) -> ScriptedToolCall:
    return ScriptedToolCall(name, arguments, id)


async def _echo(arguments: dict[str, Any]) -> str:
    return json.dumps(arguments)


async def test_tools_run_and_what_the_model_got_wrong_comes_back_as_errors_it_reads(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    config = llm_config(nats_url, scripted_llm.base_url, toolChoice="required")
    tools = CallableTools(tool("echo", _echo))
    scripted_llm.script(
        ToolCalls(
            [call("echo", '{"x": 1}', "a"), call("echo", "{not json", "b"), call("nope", "{}", "c")]
        ),
        ToolCalls([call("echo", '{"x": 2}', "a")]),  # the model reuses a call id
        Text("done"),
    )
    async with provisioned(config) as (_, js), running_llm(config, tools):
        await send(js, config, "go")
        [output] = await outputs(js, config)
    assert data_of(output)["content"] == "done"
    assert tools.calls == [("echo", {"x": 1}), ("echo", {"x": 2})]
    assert tools.ids == ["0-a", "1-a"]  # unique in the message, for the tools' request ids
    first, second, _ = scripted_llm.completions
    assert first.body["tool_choice"] == {"type": "function", "function": {"name": "echo"}}
    assert second.body["tool_choice"] == "auto"  # forced on the first turn only
    assert all(isinstance(m["content"], str) for m in second.messages)  # never null
    results = {m["tool_call_id"]: m["content"] for m in second.messages if m["role"] == "tool"}
    assert results["a"] == '{"x": 1}'
    assert "not valid JSON" in results["b"]
    assert "no tool 'nope'" in results["c"]
    assert "echo" in results["c"]


async def test_an_idempotent_tool_that_fails_is_tried_once_more_a_non_idempotent_one_never(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    config = llm_config(nats_url, scripted_llm.base_url)
    runs = {"lookup": 0, "charge": 0}

    async def lookup(arguments: dict[str, Any]) -> str:
        runs["lookup"] += 1
        if runs["lookup"] == 1:
            raise ConnectionError("flaky")
        return "found"

    async def charge(arguments: dict[str, Any]) -> str:
        runs["charge"] += 1
        raise ConnectionError("card service down")

    tools = CallableTools(tool("lookup", lookup, idempotent=True), tool("charge", charge))
    scripted_llm.script(
        ToolCalls([call("lookup", "{}", "l"), call("charge", "{}", "c")]), Text("ok")
    )
    async with provisioned(config) as (_, js), running_llm(config, tools):
        await send(js, config, "buy")
        await outputs(js, config)
    assert runs == {"lookup": 2, "charge": 1}
    results = {
        m["tool_call_id"]: m["content"]
        for m in scripted_llm.completions[1].messages
        if m["role"] == "tool"
    }
    assert results["l"] == "found"
    assert "card service down" in results["c"]


async def test_a_large_tool_result_is_offloaded_and_only_a_preview_is_logged_and_sent(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    config = llm_config(nats_url, scripted_llm.base_url, history={"maxToolResultBytes": 1024})
    big = "".join(f"line {n}\n" for n in range(5000))

    async def fetch(arguments: dict[str, Any]) -> str:
        return big

    scripted_llm.script(ToolCalls([call("fetch", "{}", "f1")]), Text("summarised"))
    async with (
        provisioned(config) as (_, js),
        running_llm(config, CallableTools(tool("fetch", fetch))),
    ):
        event = await send(js, config, "go")
        await outputs(js, config)
        store = await js.object_store(naming.llm_object_store(config.namespace))
        log_id = naming.conversation_log_id(config.agent, event.id)
        stored_object = await store.get(f"{log_id}/tool-0-f1")
        log = EventLog(js, config.namespace, log_id)
        records = {record.id: record for record in await log.replay()}
        raw = await js.get_last_msg(log.stream, log.subject)  # noqa: F841
    assert stored_object.data == big.encode()
    record = records["tool-0-f1"]
    assert record.data["object"] == f"{log_id}/tool-0-f1"
    assert len(json.dumps(record.data)) < 2048
    sent = next(m for m in scripted_llm.completions[1].messages if m["role"] == "tool")
    assert sent["content"].startswith("line 0\nline 1\n")
    assert f"{log_id}/tool-0-f1" in sent["content"]
    assert len(sent["content"].encode()) <= 1024


async def test_the_history_sent_stays_within_the_context_window(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    config = llm_config(nats_url, scripted_llm.base_url, context_window=1024, maxTurns=8)
    chunk = "x" * 1500  # about 375 tokens each, under maxToolResultBytes: kept in the log

    async def read(arguments: dict[str, Any]) -> str:
        return chunk

    scripted_llm.script(*[ToolCalls([call("read", "{}", f"r{n}")]) for n in range(5)], Text("ok"))
    async with (
        provisioned(config) as (_, js),
        running_llm(config, CallableTools(tool("read", read))),
    ):
        event = await send(js, config, "read a lot")
        await outputs(js, config)
        log_id = naming.conversation_log_id(config.agent, event.id)
        records = await EventLog(js, config.namespace, log_id).replay()
    turns = [r.data for r in records if r.id.startswith("turn-")]
    assert [len(turn["new"]) for turn in turns] == [1, 0, 0, 0, 0, 0]  # no history copied
    assert max(len(json.dumps(r.data)) for r in records) < 2 * len(chunk)  # the log is linear
    last = scripted_llm.completions[-1].messages
    assert last[0] == {"role": "user", "content": "read a lot"}
    tools = [m["content"] for m in last if m["role"] == "tool"]
    assert len(tools) == 5
    assert "elided" in tools[0]
    assert tools[-1] == chunk
    assert sum(len(m.get("content") or "") for m in last) / 4 < 1024 * 3 / 4


async def test_what_the_provider_counted_beyond_the_estimate_is_kept_free_of_history(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    config = llm_config(nats_url, scripted_llm.base_url, context_window=1024)
    chunk = "y" * 800  # 200 estimated tokens: two fit in the budget by the estimate alone

    async def read(arguments: dict[str, Any]) -> str:
        return chunk

    scripted_llm.script(
        ToolCalls([call("read", "{}", "r0")]),
        ToolCalls([call("read", "{}", "r1")], usage=(650, 5)),  # the prompt was much denser
        Text("ok"),
    )
    tools = CallableTools(tool("read", read))
    async with provisioned(config) as (_, js), running_llm(config, tools):
        await send(js, config, "read")
        await outputs(js, config)
    last = [m["content"] for m in scripted_llm.completions[-1].messages if m["role"] == "tool"]
    assert "elided" in last[0]
    assert last[1] == chunk


async def test_a_short_retry_after_is_waited_out_in_place_without_burning_an_attempt(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    config = llm_config(nats_url, scripted_llm.base_url)  # timeout 2s: waits of up to 1s
    scripted_llm.script(HttpError(429, headers={"Retry-After": "1"}), Text("after the wait"))
    loop = asyncio.get_running_loop()
    async with provisioned(config) as (_, js), running_llm(config) as (runtime, _):
        started = loop.time()
        event = await send(js, config, "hi")
        [output] = await outputs(js, config)
        elapsed = loop.time() - started
        assert runtime.metrics.retries._value.get() == 0
        assert "deferred-0" not in await journal(js, config, event.id)
    assert data_of(output)["content"] == "after the wait"
    assert elapsed >= 1.0
    assert len(scripted_llm.completions) == 2


async def test_a_long_retry_after_defers_the_message_and_journals_the_deferral(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    config = llm_config(nats_url, scripted_llm.base_url)
    scripted_llm.script(HttpError(429, headers={"Retry-After": "2"}), Text("later"))
    async with provisioned(config) as (_, js), running_llm(config) as (_runtime, _):
        event = await send(js, config, "hi")
        [output] = await outputs(js, config)
        ids = await journal(js, config, event.id)
    assert data_of(output)["content"] == "later"
    assert ids == ["deferred-0", "turn-0"]
    assert len(scripted_llm.completions) == 2


SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}},
    "required": ["answer"],
    "additionalProperties": False,
}


def structured(nats_url: str, base_url: str) -> RuntimeConfig:
    config = llm_config(nats_url, base_url)
    contract = config.contract.model_copy(update={"output_schema": SCHEMA})
    return config.model_copy(update={"contract": contract})


async def test_an_invalid_structured_answer_gets_one_repair_turn(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    config = structured(nats_url, scripted_llm.base_url)
    scripted_llm.script(Text("Sure! Here it is."), Text('```json\n{"answer": "42"}\n```'))
    async with provisioned(config) as (_, js), running_llm(config):
        await send(js, config, "the answer?")
        [output] = await outputs(js, config)
    assert data_of(output) == {"answer": "42"}
    first, second = scripted_llm.completions
    assert first.body["response_format"]["json_schema"]["schema"] == SCHEMA
    assert "not JSON" in second.messages[-1]["content"]


async def test_a_structured_answer_still_invalid_after_the_repair_is_dead_lettered(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    config = structured(nats_url, scripted_llm.base_url)
    scripted_llm.script(Text('{"answer": 1}'), Text('{"wrong": "field"}'))
    async with provisioned(config) as (_, js), running_llm(config):
        await send(js, config, "the answer?")
        [letter] = await letters(js, config)
    assert letter.headers is not None
    assert letter.headers[REASON_HEADER] == "invalid-output"
    assert "answer" in letter.headers[ERROR_HEADER]
    assert len(scripted_llm.completions) == 2


async def test_a_model_asking_for_tools_past_max_turns_is_dead_lettered_as_invalid_output(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    config = llm_config(nats_url, scripted_llm.base_url, maxTurns=2)
    scripted_llm.script(ToolCalls([call("echo", "{}", "a")]), ToolCalls([call("echo", "{}", "b")]))
    async with (
        provisioned(config) as (_, js),
        running_llm(config, CallableTools(tool("echo", _echo))),
    ):
        await send(js, config, "loop forever")
        [letter] = await letters(js, config)
    assert letter.headers is not None
    assert letter.headers[REASON_HEADER] == "invalid-output"
    assert "maxTurns=2" in letter.headers[ERROR_HEADER]
    first, last = scripted_llm.completions
    assert first.body["tool_choice"] == "auto"
    assert last.body["tool_choice"] == "none"  # the last turn was told to answer


async def test_an_answer_too_large_to_journal_is_dead_lettered_at_once_not_asked_again(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    # Past the server's max_payload (1 MiB) a turn cannot be journaled: retrying would only
    # pay for the same answer again.
    config = llm_config(nats_url, scripted_llm.base_url)
    scripted_llm.script(*[Text("x" * 1_500_000)] * 3)
    async with provisioned(config) as (_, js), running_llm(config, CallableTools()):
        await send(js, config, "say a lot")
        [letter] = await letters(js, config)
    assert letter.headers is not None
    assert letter.headers[REASON_HEADER] == "invalid-output"
    assert "journal" in letter.headers[ERROR_HEADER]
    assert len(scripted_llm.completions) == 1


async def test_tool_choice_none_offers_the_model_no_tools(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    config = llm_config(nats_url, scripted_llm.base_url, toolChoice="none")
    scripted_llm.script(Text("no tools needed"))
    async with (
        provisioned(config) as (_, js),
        running_llm(config, CallableTools(tool("echo", _echo))),
    ):
        await send(js, config, "answer")
        [output] = await outputs(js, config)
    assert data_of(output)["content"] == "no tools needed"
    (asked,) = scripted_llm.completions
    assert "tools" not in asked.body


async def test_token_deltas_arrive_on_core_nats_in_order(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    config = llm_config(nats_url, scripted_llm.base_url)
    scripted_llm.script(
        ToolCalls([call("echo", "{}", "a")]),
        Text("one two three", chunks=["one", " two", " three"]),
    )
    received: list[dict[str, Any]] = []
    async with (
        provisioned(config) as (nc, js),
        running_llm(config, CallableTools(tool("echo", _echo))),
    ):
        event_id = "streamed-event"
        subject = naming.token_stream_subject(config.namespace, event_id, event_id)
        subscription = await nc.subscribe(subject)
        await send(js, config, "talk", event_id=event_id)
        while not received or not received[-1].get("final"):
            message = await subscription.next_msg(timeout=20)
            received.append(json.loads(message.data))
    assert received == [
        {"tool": "echo", "turn": 0},
        {"done": True, "turn": 0, "final": False},
        {"delta": "one", "turn": 1},
        {"delta": " two", "turn": 1},
        {"delta": " three", "turn": 1},
        {"done": True, "turn": 1, "final": True},
    ]


def start_runtime(config: RuntimeConfig, workdir: Path) -> subprocess.Popen[bytes]:
    """``python -m troupe_runtime.agent`` as the container runs it."""
    config_file = workdir / "config.json"
    config_file.write_text(config.to_json())
    env = {**os.environ, EFFECTS_ENV: str(workdir / "effects"), pod.POD_IP_ENV: "127.0.0.1"}
    with (workdir / "runtime.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, *pod.AGENT_COMMAND[1:], "--config", str(config_file)],
            cwd=REPOSITORY,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def killed(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()


async def test_a_runtime_killed_mid_conversation_resumes_without_repeating_a_turn_or_a_tool(
    nats_url: str, scripted_llm: ScriptedLlm, tmp_path: Path
) -> None:
    functions = [{"entrypoint": f"{HARNESS}:count"}, {"entrypoint": f"{HARNESS}:hang"}]
    config = llm_config(nats_url, scripted_llm.base_url, tools={"functions": functions})
    config = config.model_copy(update={"health_port": free_port()})
    # "count" finishes; "hang" (not idempotent) starts and hangs until the kill.
    scripted_llm.script(
        ToolCalls([call("count", "{}", "a"), call("hang", "{}", "b")]), Text("back")
    )
    async with provisioned(config) as (_, js):
        first = start_runtime(config, tmp_path)
        try:
            event = await send(js, config, "work")
            await eventually(
                lambda: effects(tmp_path / "effects") == ["count", "hang"], "both tools"
            )
        finally:
            killed(first)
        second = start_runtime(config, tmp_path)
        try:
            # JetStream redelivers once the killed delivery's ackWait (20s) has passed.
            [output] = await outputs(js, config, within=45.0)
            ids = await journal(js, config, event.id)
        finally:
            killed(second)
    assert data_of(output)["content"] == "back"
    assert effects(tmp_path / "effects") == ["count", "hang"]  # neither tool ran again
    assert len(scripted_llm.completions) == 2  # turn 0 was not asked again
    results = {
        m["tool_call_id"]: m["content"]
        for m in scripted_llm.completions[1].messages
        if m["role"] == "tool"
    }
    assert results["a"] == "counted"
    assert "not run again" in results["b"]
    assert ids == ["turn-0", "tool-start-0-a", "tool-0-a", "tool-start-0-b", "tool-0-b", "turn-1"]
