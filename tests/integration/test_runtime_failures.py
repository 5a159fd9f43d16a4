"""Failures: retries, timeouts, dead letters, and bad messages that never stop the process."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from nats.aio.client import Client

from tests.integration.runtime_harness import (
    eventually,
    http_get,
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
from troupe_runtime.agent.context import AgentError, Context
from troupe_runtime.agent.handlers.echo import echo
from troupe_runtime.contract import naming
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.dead_letters import (
    ATTEMPTS_HEADER,
    ERROR_HEADER,
    REASON_HEADER,
    SEQUENCE_HEADER,
    SUBJECT_HEADER,
)
from troupe_runtime.nats.pull import Puller

SCHEMA = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}


async def test_a_handler_that_always_raises_is_dead_lettered_after_max_attempts(
    nats_url: str,
) -> None:
    config = make_config(nats_url, retry={"maxAttempts": 3, "backoff": ["50ms", "100ms"]})
    attempts: list[int] = []

    async def broken(ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise RuntimeError("the model is on fire")

    async with provisioned(config) as (_, js), running(config, broken) as runtime:
        await send(js, config, {"n": 1})
        await eventually(lambda: stream_count(js, config.dead_letter_stream), "a dead letter")
        [letter] = await stored(js, config.dead_letter_stream)
        # The input is acked after its dead letter is stored; the ack takes a moment.
        await eventually(lambda: inbox_empty(js, config), "the input to be acknowledged")
        retries = sample(runtime, "troupe_retries_total")

    assert attempts == [1, 2, 3]
    assert retries == 2
    assert letter.headers is not None
    assert letter.headers[ATTEMPTS_HEADER] == "3"
    assert letter.headers[REASON_HEADER] == "exhausted"
    assert letter.headers[ERROR_HEADER] == "RuntimeError: the model is on fire"
    assert letter.headers[SUBJECT_HEADER] == config.inbox_subject(0)
    assert letter.headers[SEQUENCE_HEADER] == "1"
    assert letter.data == b'{"n":1}'


async def test_a_hanging_handler_is_timed_out_and_retried(nats_url: str) -> None:
    config = make_config(nats_url, timeout="300ms")
    attempts: list[int] = []

    async def hangs_once(ctx: Context) -> Any:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            await asyncio.Event().wait()
        return "finally"

    async with provisioned(config) as (_, js), running(config, hangs_once) as runtime:
        await send(js, config, "go")
        await eventually(lambda: stream_count(js, output_stream(config)), "the output")
        retried = sample(runtime, "troupe_messages_total", outcome="retried")

    assert attempts == [1, 2]
    assert retried == 1


async def test_progress_extends_the_deadline_of_a_long_handler(nats_url: str) -> None:
    config = make_config(nats_url, timeout="400ms", messaging={"ackWait": "1s"})
    attempts: list[int] = []

    async def long_but_alive(ctx: Context) -> Any:
        attempts.append(ctx.attempt)
        for _ in range(8):
            await asyncio.sleep(0.2)
            await ctx.progress()
        return "done"

    async with provisioned(config) as (_, js), running(config, long_but_alive):
        await send(js, config, "go")
        await eventually(lambda: stream_count(js, output_stream(config)), "the output")

    assert attempts == [1]


async def test_bad_messages_are_dead_lettered_with_a_reason_and_the_process_stays_up(
    nats_url: str,
) -> None:
    config = make_config(nats_url, contract={"inputSchema": SCHEMA})
    called: list[str] = []

    async def record(ctx: Context) -> None:
        called.append(ctx.event.id)

    async with provisioned(config) as (_, js), running(config, record) as runtime:
        subject = config.inbox_subject(0)
        await js.publish(subject, b"{not json", headers=_binary_headers("bad-json"))
        await js.publish(subject, b'{"just": "json"}')
        await send(js, config, {"name": 42}, event_id="bad-schema")
        await eventually(
            lambda: _count_is(stream_count(js, config.dead_letter_stream), 3), "3 dead letters"
        )
        letters = await stored(js, config.dead_letter_stream)
        await send(js, config, {"name": "fine"}, event_id="good")
        await eventually(lambda: called == ["good"], "the good message to be handled")
        healthz = await http_get(runtime.health.port, "/healthz")

    reasons = [(m.headers or {})[REASON_HEADER] for m in letters]
    errors = [(m.headers or {})[ERROR_HEADER] for m in letters]
    assert reasons == ["malformed", "malformed", "invalid-input"]
    assert errors[0].startswith("data is not valid JSON")
    assert errors[1].startswith("not a CloudEvent")
    assert errors[2] == "input data violates the schema at name: 42 is not of type 'string'"
    assert [(m.headers or {})[ATTEMPTS_HEADER] for m in letters] == ["1", "1", "1"]
    assert healthz.status_code == 200


def _binary_headers(event_id: str) -> dict[str, str]:
    return {
        "ce-specversion": "1.0",
        "ce-id": event_id,
        "ce-source": "/tests",
        "ce-type": "test.input",
        "content-type": "application/json",
    }


async def _count_is(count: Any, expected: int) -> bool:
    return bool(await count == expected)


async def test_an_event_past_its_deadline_is_dead_lettered_unhandled(nats_url: str) -> None:
    config = make_config(nats_url)
    called: list[str] = []

    async def record(ctx: Context) -> None:
        called.append(ctx.event.id)

    async with provisioned(config) as (_, js), running(config, record):
        await send(js, config, "too late", deadline=datetime(2020, 1, 1, tzinfo=UTC))
        await eventually(lambda: stream_count(js, config.dead_letter_stream), "a dead letter")
        [letter] = await stored(js, config.dead_letter_stream)

    assert called == []
    assert (letter.headers or {})[REASON_HEADER] == "expired"


async def test_a_handler_cut_short_by_the_events_deadline_says_so(nats_url: str) -> None:
    config = make_config(nats_url, timeout="30s", retry={"maxAttempts": 1})

    async def hang(ctx: Context) -> None:
        await asyncio.Event().wait()

    async with provisioned(config) as (_, js), running(config, hang):
        deadline = datetime.now(UTC) + timedelta(milliseconds=500)
        await send(js, config, "hurry", deadline=deadline)
        await eventually(lambda: stream_count(js, config.dead_letter_stream), "a dead letter")
        [letter] = await stored(js, config.dead_letter_stream)

    error = (letter.headers or {})[ERROR_HEADER]
    assert error.startswith("HandlerTimeout: handler did not finish before the event's deadline")


async def test_an_output_that_violates_the_output_schema_is_dead_lettered(
    nats_url: str,
) -> None:
    config = make_config(nats_url)
    config = config.model_copy(
        update={"contract": config.contract.model_copy(update={"output_schema": SCHEMA})}
    )
    async with provisioned(config) as (_, js), running(config, echo):
        await send(js, config, {"name": ["not", "a", "string"]})
        await eventually(lambda: stream_count(js, config.dead_letter_stream), "a dead letter")
        [letter] = await stored(js, config.dead_letter_stream)
        outputs = await stream_count(js, output_stream(config))

    assert (letter.headers or {})[REASON_HEADER] == "invalid-output"
    assert outputs == 0


async def test_a_non_retryable_error_state_is_dead_lettered_at_once(nats_url: str) -> None:
    config = make_config(
        nats_url, contract={"errorStates": [{"name": "Refused", "retryable": False}]}
    )
    attempts: list[int] = []

    async def refuses(ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise AgentError("Refused", "this agent does not do that")

    async with provisioned(config) as (_, js), running(config, refuses):
        await send(js, config, "do it")
        await eventually(lambda: stream_count(js, config.dead_letter_stream), "a dead letter")
        [letter] = await stored(js, config.dead_letter_stream)

    assert attempts == [1]
    assert (letter.headers or {})[REASON_HEADER] == "rejected"
    assert (letter.headers or {})[
        ERROR_HEADER
    ] == "AgentError: Refused: this agent does not do that"


async def die_on_deliveries(
    nc: Client, config: RuntimeConfig, deliveries: int, *, last: bool = False
) -> None:
    """``deliveries`` replicas take the next message in turn and die before acknowledging it
    (a crash, a hang, an OOM kill). With ``last``, that was the consumer's last delivery: one
    more pull finds nothing, and the server gives up and advises."""
    crashed = Puller(nc, config.inbox_stream, config.consumer_name(0))
    await crashed.start()
    for _ in range(deliveries):
        assert len(await crashed.pull(1, wait=3.0)) == 1
    if last:
        assert await crashed.pull(1, wait=2.0) == []
    await crashed.stop()


async def test_a_message_no_replica_survives_is_dead_lettered_from_the_stored_advisory(
    nats_url: str,
) -> None:
    config = make_config(nats_url, retry={"maxAttempts": 2}, messaging={"ackWait": "1s"})
    called: list[str] = []

    async def record(ctx: Context) -> None:
        called.append(ctx.event.id)

    async with provisioned(config) as (nc, js):
        await send(js, config, "poison")
        # The two attempts allowed die, and so does the extra delivery a replica would
        # dead-letter at once: the server gives up.
        await die_on_deliveries(nc, config, 3, last=True)
        # No replica listened to the advisory: it waits in a stream of its own.
        advisories = naming.advisory_stream(config.namespace, config.agent)
        await eventually(lambda: stream_count(js, advisories), "the stored advisory")
        async with running(config, record):
            await eventually(lambda: stream_count(js, config.dead_letter_stream), "a dead letter")
            await eventually(lambda: inbox_empty(js, config), "the inbox to be emptied")
        [letter] = await stored(js, config.dead_letter_stream)

    assert called == []
    assert (letter.headers or {})[REASON_HEADER] == "max-deliveries"
    assert (letter.headers or {})[ATTEMPTS_HEADER] == "3"
    assert letter.data == b'"poison"'


async def test_a_message_delivered_past_its_attempts_is_dead_lettered_by_the_next_replica(
    nats_url: str,
) -> None:
    config = make_config(nats_url, retry={"maxAttempts": 2}, messaging={"ackWait": "1s"})
    called: list[str] = []

    async def record(ctx: Context) -> None:
        called.append(ctx.event.id)

    async with provisioned(config) as (nc, js):
        await send(js, config, "poison")
        await die_on_deliveries(nc, config, 2)  # both allowed attempts
        async with running(config, record):
            await eventually(lambda: stream_count(js, config.dead_letter_stream), "a dead letter")
            await eventually(lambda: inbox_empty(js, config), "the inbox to be emptied")
        [letter] = await stored(js, config.dead_letter_stream)
        advisories = await stream_count(js, naming.advisory_stream(config.namespace, config.agent))

    assert called == []
    assert (letter.headers or {})[REASON_HEADER] == "max-deliveries"
    assert (letter.headers or {})[ATTEMPTS_HEADER] == "3"
    assert advisories == 0  # the server never gave up: no rescue was needed
