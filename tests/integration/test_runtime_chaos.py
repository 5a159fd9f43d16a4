"""Chaos at run time on a real nats-server: the faults a ChaosExperiment's entry names are
injected by the runtime (handler, messages, connection, model and tool calls), each taking
the path the real failure takes, and removing the entry (or letting its ``until`` pass)
restores the agent."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue
from prometheus_client import CollectorRegistry

from tests.integration.llm_harness import (
    MODEL,
    CallableTools,
    llm_config,
    running_llm,
    tool,
)
from tests.integration.runtime_harness import (
    eventually,
    inbox_empty,
    make_config,
    output_stream,
    provisioned,
    running,
    sample,
    send,
    stored,
    stream_count,
)
from troupe_devcluster.scripted_llm import ScriptedLlm, ScriptedToolCall, Text, ToolCalls
from troupe_runtime.agent.chaos import Chaos
from troupe_runtime.agent.context import Context
from troupe_runtime.agent.runtime import Runtime
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.chaos import INJECTED_ERROR, AgentFaults, Faults
from troupe_runtime.contract.dead_letters import ERROR_HEADER, REASON_HEADER
from troupe_runtime.nats.provision import chaos_bucket_config
from troupe_runtime.serving.metrics import ChaosMetrics

EXPERIMENT = "flaky-handler"


async def bucket(js: JetStreamContext, config: RuntimeConfig) -> KeyValue:
    try:
        return await js.key_value(naming.chaos_bucket(config.namespace))
    except BucketNotFoundError:
        return await js.create_key_value(chaos_bucket_config(config.namespace))


async def inject(
    js: JetStreamContext,
    config: RuntimeConfig,
    faults: dict[str, Any],
    until: datetime | None = None,
) -> None:
    """Write the agent's entry as the operator would."""
    entry = AgentFaults(
        experiment=EXPERIMENT,
        run="run-1",
        until=until or datetime.now(UTC) + timedelta(minutes=10),
        faults=Faults.model_validate(faults),
    )
    kv = await bucket(js, config)
    await kv.put(
        naming.chaos_faults_key(config.agent), entry.model_dump_json(by_alias=True).encode()
    )


async def withdraw(js: JetStreamContext, config: RuntimeConfig) -> None:
    await (await bucket(js, config)).delete(naming.chaos_faults_key(config.agent))


def injected(runtime: Runtime, point: str, kind: str) -> float:
    return sample(runtime, "troupe_chaos_injected_total", point=point, kind=kind)


def chaos_counted(metrics: ChaosMetrics, point: str, kind: str) -> float:
    value = metrics.registry.get_sample_value(
        "troupe_chaos_injected_total", {"point": point, "kind": kind}
    )
    return value or 0.0


class Recorder:
    """A handler that records each event it ran for and echoes its data."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    async def __call__(self, ctx: Context) -> Any:
        self.ran.append(ctx.event.id)
        return ctx.event.data


async def test_the_runtime_creates_the_chaos_bucket_so_it_can_watch_its_key(
    nats_url: str,
) -> None:
    config = make_config(nats_url)
    async with provisioned(config) as (_, js), running(config, Recorder()) as runtime:
        await js.key_value(naming.chaos_bucket(config.namespace))  # raises when missing
        assert not runtime.chaos.armed


async def test_injected_handler_errors_dead_letter_with_the_injected_reason_until_withdrawn(
    nats_url: str,
) -> None:
    config = make_config(nats_url, retry={"maxAttempts": 2, "backoff": ["50ms"]})
    handler = Recorder()
    async with provisioned(config) as (_, js), running(config, handler) as runtime:
        await inject(js, config, {"handler": {"errorRatio": 1}})
        await eventually(lambda: runtime.chaos.armed, "the runtime to see the faults")
        await send(js, config, {"n": 1})
        await eventually(lambda: stream_count(js, config.dead_letter_stream), "a dead letter")
        await eventually(lambda: inbox_empty(js, config), "the input to be acknowledged")
        [letter] = await stored(js, config.dead_letter_stream)
        assert sample(runtime, "troupe_chaos_active") == 1
        errors = injected(runtime, "handler", "error")

        await withdraw(js, config)
        await eventually(lambda: not runtime.chaos.armed, "the runtime to see the removal")
        after = await send(js, config, {"n": 2})
        await eventually(lambda: stream_count(js, output_stream(config)), "an output")
        assert sample(runtime, "troupe_chaos_active") == 0

    assert handler.ran == [after.id]  # the injected error replaced the handler, twice
    assert errors == 2
    assert letter.headers is not None
    assert letter.headers[REASON_HEADER] == "exhausted"
    assert INJECTED_ERROR in letter.headers[ERROR_HEADER]
    assert f"ChaosExperiment {EXPERIMENT}" in letter.headers[ERROR_HEADER]


async def test_faults_end_at_their_until_even_when_nobody_removes_them(nats_url: str) -> None:
    config = make_config(nats_url, retry={"maxAttempts": 1, "backoff": ["50ms"]})
    handler = Recorder()
    until = datetime.now(UTC) + timedelta(seconds=3)
    async with provisioned(config) as (_, js), running(config, handler) as runtime:
        await inject(js, config, {"handler": {"errorRatio": 1}}, until=until)
        await eventually(lambda: runtime.chaos.armed, "the runtime to see the faults")
        await send(js, config, "before")
        await eventually(lambda: stream_count(js, config.dead_letter_stream), "a dead letter")
        await eventually(lambda: datetime.now(UTC) > until, "the entry's until to pass")
        later = await send(js, config, "after")
        await eventually(lambda: stream_count(js, output_stream(config)), "an output")
        assert sample(runtime, "troupe_chaos_active") == 0
        entry = await (await bucket(js, config)).get(naming.chaos_faults_key(config.agent))

    assert handler.ran == [later.id]
    assert entry.value  # still written: its until alone ended it


async def test_injected_handler_latency_shows_in_the_handling_time(nats_url: str) -> None:
    config = make_config(nats_url)
    async with provisioned(config) as (_, js), running(config, Recorder()) as runtime:
        await inject(js, config, {"handler": {"latency": "400ms"}})
        await eventually(lambda: runtime.chaos.armed, "the runtime to see the faults")
        await send(js, config, "slow")
        await eventually(lambda: stream_count(js, output_stream(config)), "an output")
        latencies = injected(runtime, "handler", "latency")
        handling = sample(runtime, "troupe_handler_seconds_sum")

    assert latencies == 1
    assert handling >= 0.4  # the handling time includes the injected wait


async def test_a_duplicated_message_runs_twice_and_idempotent_delivery_absorbs_the_copy(
    nats_url: str,
) -> None:
    config = make_config(nats_url)
    handler = Recorder()
    async with provisioned(config) as (_, js), running(config, handler) as runtime:
        await inject(js, config, {"messages": {"duplicateRatio": 1}})
        await eventually(lambda: runtime.chaos.armed, "the runtime to see the faults")
        sent = [await send(js, config, {"n": n}) for n in range(3)]
        await eventually(lambda: len(handler.ran) == 6, "every message and its copy to run")
        await eventually(lambda: inbox_empty(js, config), "the copies to be acknowledged")
        outputs = await stored(js, output_stream(config))
        duplicates = injected(runtime, "messages", "duplicate")

    assert sorted(handler.ran) == sorted([event.id for event in sent] * 2)
    assert duplicates == 3  # a copy is never duplicated again
    assert sorted(envelope.parse(o.headers, o.data or b"").data["n"] for o in outputs) == [0, 1, 2]


async def test_a_delayed_message_is_counted_and_still_answered(nats_url: str) -> None:
    config = make_config(nats_url)
    async with provisioned(config) as (_, js), running(config, Recorder()) as runtime:
        await inject(js, config, {"messages": {"delay": "300ms"}})
        await eventually(lambda: runtime.chaos.armed, "the runtime to see the faults")
        await send(js, config, "late")
        await eventually(lambda: stream_count(js, output_stream(config)), "an output")
        delays = injected(runtime, "messages", "delay")

    assert delays == 1


async def test_dropped_connections_are_followed_by_continued_processing(nats_url: str) -> None:
    config = make_config(nats_url)
    handler = Recorder()
    async with provisioned(config) as (_, js), running(config, handler) as runtime:
        await inject(js, config, {"connection": {"dropEvery": "1s"}})
        await eventually(lambda: runtime.chaos.armed, "the runtime to see the faults")
        await eventually(lambda: injected(runtime, "connection", "drop") >= 2, "two drops")
        sent = [await send(js, config, {"n": n}) for n in range(3)]
        await eventually(
            lambda: _at_least(js, output_stream(config), 3), "every message answered", 40.0
        )
        drops = injected(runtime, "connection", "drop")
        await withdraw(js, config)
        await eventually(runtime.ready, "the runtime to be ready")
        reconnects = runtime._nc.stats["reconnects"] if runtime._nc is not None else 0

    assert set(handler.ran) >= {event.id for event in sent}
    assert drops >= 2
    assert reconnects >= 2  # nats-py reconnected each time, the runtime kept its session


async def _at_least(js: JetStreamContext, stream: str, count: int) -> bool:
    return await stream_count(js, stream) >= count


async def test_a_bad_entry_injects_nothing(nats_url: str) -> None:
    config = make_config(nats_url)
    handler = Recorder()
    async with provisioned(config) as (_, js), running(config, handler) as runtime:
        kv = await bucket(js, config)
        await kv.put(naming.chaos_faults_key(config.agent), b'{"faults": {"handler": "loud"}}')
        sent = await send(js, config, "fine")
        await eventually(lambda: stream_count(js, output_stream(config)), "an output")
        assert not runtime.chaos.armed

    assert handler.ran == [sent.id]


def _chaos(config: RuntimeConfig) -> tuple[Chaos, ChaosMetrics]:
    metrics = ChaosMetrics(CollectorRegistry())
    return Chaos(config.namespace, config.agent, metrics), metrics


async def test_injected_model_errors_take_the_model_failure_retry_path(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    config = llm_config(nats_url, scripted_llm.base_url)
    chaos, metrics = _chaos(config)
    scripted_llm.script(Text("After the storm."))
    async with provisioned(config) as (_, js), running_llm(config, chaos=chaos) as (runtime, _):
        await inject(js, config, {"model": {"errorRatio": 1}})
        await eventually(lambda: chaos.armed, "the runtime to see the faults")
        await send(js, config, "hello")
        await eventually(lambda: stream_count(js, config.dead_letter_stream), "a dead letter")
        [letter] = await stored(js, config.dead_letter_stream)
        retries = sample(runtime, "troupe_retries_total")
        asked_meanwhile = len(scripted_llm.completions)

        await withdraw(js, config)
        await eventually(lambda: not chaos.armed, "the runtime to see the removal")
        await send(js, config, "hello again")
        await eventually(lambda: stream_count(js, output_stream(config)), "an answer")
        [answer] = await stored(js, output_stream(config))

    assert asked_meanwhile == 0  # every call failed in place of the provider
    assert retries == config.retry.max_attempts - 1  # retried as an unavailable model
    assert chaos_counted(metrics, "model", "error") == config.retry.max_attempts
    assert letter.headers is not None
    assert "ModelUnavailable" in letter.headers[ERROR_HEADER]
    assert INJECTED_ERROR in letter.headers[ERROR_HEADER]
    assert envelope.parse(answer.headers, answer.data or b"").data["content"] == "After the storm."


async def test_an_injected_tool_error_is_the_error_result_the_model_reads(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    config = llm_config(nats_url, scripted_llm.base_url)
    chaos, metrics = _chaos(config)

    async def lookup(arguments: dict[str, Any]) -> str:
        return "found"

    tools = CallableTools(tool("lookup", lookup))
    scripted_llm.script(ToolCalls([ScriptedToolCall("lookup", "{}")]), Text("No luck."))
    async with (
        provisioned(config) as (_, js),
        running_llm(config, tools, chaos=chaos),
    ):
        await inject(js, config, {"tools": {"errorRatio": 1, "latency": "100ms"}})
        await eventually(lambda: chaos.armed, "the runtime to see the faults")
        await send(js, config, "look it up")
        await eventually(lambda: stream_count(js, output_stream(config)), "an answer")

    assert tools.calls == []  # the tool never ran
    second = scripted_llm.completions[1].messages
    [result] = [m for m in second if m.get("role") == "tool"]
    assert INJECTED_ERROR in result["content"]
    assert chaos_counted(metrics, "tools", "error") == 1
    assert chaos_counted(metrics, "tools", "latency") == 1


class Draws(random.Random):
    """A random source that gives the draws it was handed, in order (then 0.99)."""

    def __init__(self, *draws: float) -> None:
        super().__init__(0)
        self._draws = list(draws)

    def random(self) -> float:
        return self._draws.pop(0) if self._draws else 0.99


async def test_an_injected_model_error_falls_back_to_the_next_model_of_the_chain(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    config = llm_config(nats_url, scripted_llm.base_url)
    assert config.llm is not None
    backup = config.llm.providers[0].model_copy(update={"name": "backup"})
    llm = config.llm.model_copy(
        update={
            "providers": [*config.llm.providers, backup],
            "policy": config.llm.policy.model_copy(
                update={
                    "fallbacks": [config.llm.policy.model.model_copy(update={"provider": "backup"})]
                }
            ),
        }
    )
    config = config.model_copy(update={"llm": llm})
    metrics = ChaosMetrics(CollectorRegistry())
    # The first model's call draws (latency, error) = (0.99, 0.0): it fails; the backup's pass.
    chaos = Chaos(config.namespace, config.agent, metrics, rng=Draws(0.99, 0.0))
    scripted_llm.script(Text("From the backup."))
    async with (
        provisioned(config) as (_, js),
        running_llm(config, chaos=chaos) as (_, llm_metrics),
    ):
        await inject(js, config, {"model": {"errorRatio": 0.5}})
        await eventually(lambda: chaos.armed, "the runtime to see the faults")
        await send(js, config, "hello")
        await eventually(lambda: stream_count(js, output_stream(config)), "an answer")
        [answer] = await stored(js, output_stream(config))

    assert envelope.parse(answer.headers, answer.data or b"").data["content"] == "From the backup."
    assert len(scripted_llm.completions) == 1  # only the backup was asked
    labels = {"agent": config.agent, "from_model": MODEL, "to_model": MODEL}
    fell_back = llm_metrics.registry.get_sample_value(
        "troupe_llm_fallbacks_total", {**labels, "reason": "unavailable"}
    )
    assert fell_back == 1
    assert chaos_counted(metrics, "model", "error") == 1


async def test_the_runtime_wires_its_own_chaos_into_an_llm_agents_model_calls(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    """No harness hands the chaos in: the runtime builds the LLM agent itself, as in a pod."""
    config = llm_config(nats_url, scripted_llm.base_url)
    runtime = Runtime(config, host="127.0.0.1", port=0, grace=2.0)
    task = asyncio.create_task(runtime.run())
    try:
        async with provisioned(config) as (_, js):
            await eventually(runtime.ready, "the runtime to become ready")
            await inject(js, config, {"model": {"errorRatio": 1}})
            await eventually(lambda: runtime.chaos.armed, "the runtime to see the faults")
            await send(js, config, "hello")
            await eventually(lambda: stream_count(js, config.dead_letter_stream), "a dead letter")
            errors = injected(runtime, "model", "error")
    finally:
        runtime.stop()
        await asyncio.wait_for(task, 30)

    assert errors == config.retry.max_attempts
    assert scripted_llm.completions == []


async def test_a_reopened_session_watches_the_key_again(nats_url: str) -> None:
    config = make_config(nats_url, retry={"maxAttempts": 1, "backoff": ["50ms"]})
    async with provisioned(config) as (_, js), running(config, Recorder()) as runtime:
        first = runtime._nc
        assert first is not None
        await first.close()  # closed for good: the runtime opens a new connection
        await eventually(
            lambda: runtime.ready() and runtime._nc is not first, "a new session to serve"
        )
        await inject(js, config, {"handler": {"errorRatio": 1}})
        await eventually(lambda: runtime.chaos.armed, "the new session's watch to see it")
        await send(js, config, "after the reopening")
        await eventually(lambda: stream_count(js, config.dead_letter_stream), "a dead letter")
        reopened = sample(runtime, "troupe_nats_reopened_total", cause="closed")

    assert reopened == 1
