"""Forged traffic on an agent's own subjects, against a real nats-server and a real runtime:
fake advisories, junk, pre-empted letter ids, undeclared priority levels."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError, NoStreamResponseError

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
from troupe_runtime.agent.context import Context
from troupe_runtime.agent.deadletter import DeadLetters
from troupe_runtime.contract import advisories, naming
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.dead_letters import (
    REASON_HEADER,
    SEQUENCE_HEADER,
    DeadLetterReason,
    Origin,
    letter_id,
)
from troupe_runtime.serving.metrics import RuntimeMetrics


def advisory_subject(config: RuntimeConfig, priority: int = 0) -> str:
    return naming.max_deliveries_advisory(config.inbox_stream, config.consumer_name(priority))


def forged_advisory(config: RuntimeConfig, sequence: int, deliveries: int) -> bytes:
    return json.dumps(
        {
            "type": advisories.ADVISORY_TYPE,
            "id": "forged",
            "stream": config.inbox_stream,
            "consumer": config.consumer_name(0),
            "stream_seq": sequence,
            "deliveries": deliveries,
        }
    ).encode()


def advisory_stream(config: RuntimeConfig) -> str:
    return naming.advisory_stream(config.namespace, config.agent)


async def test_a_forged_max_deliveries_advisory_for_a_message_in_flight_does_not_move_it(
    nats_url: str,
) -> None:
    config = make_config(nats_url, retry={"maxAttempts": 2})
    release = asyncio.Event()
    handled: list[int] = []

    async def slow(ctx: Context) -> Any:
        handled.append(ctx.attempt)
        await release.wait()
        return ctx.event.data

    async with provisioned(config) as (nc, js), running(config, slow) as runtime:
        await send(js, config, "in flight")
        await eventually(lambda: handled == [1], "the handler to start")
        # As many deliveries as the consumer allows: the forgery's only tell is the message
        # being in flight.
        deliveries = config.retry.max_attempts + 1
        await nc.publish(
            advisory_subject(config), forged_advisory(config, 1, deliveries=deliveries)
        )
        await eventually(
            lambda: sample(runtime, "troupe_advisories_total", verdict="defer") >= 1,
            "the rescuer to look at the advisory",
        )
        release.set()
        await eventually(lambda: stream_count(js, output_stream(config)), "the output")
        await eventually(lambda: inbox_empty(js, config), "the input to be acknowledged")
        # The deferred advisory is looked at again and dropped: the message is gone.
        await eventually(lambda: _empty(js, advisory_stream(config)), "the advisory to be acked")
        letters = await stream_count(js, config.dead_letter_stream)

    assert handled == [1]
    assert letters == 0


async def test_junk_on_the_advisory_subject_is_acked_and_the_runtime_stays_ready(
    nats_url: str,
) -> None:
    config = make_config(nats_url)
    called: list[Any] = []

    async def record(ctx: Context) -> None:
        called.append(ctx.event.data)

    junk = [
        b"not json",
        b"[" * 1500,
        b'{"type": "io.nats.jetstream.advisory.v1.max_deliver"}',
        json.dumps({"type": advisories.ADVISORY_TYPE, "stream": "TROUPE_other"}).encode(),
        forged_advisory(config, 1, deliveries=1),  # fewer deliveries than the consumer allows
        forged_advisory(config, 999, deliveries=99),  # a message that does not exist
    ]
    async with provisioned(config) as (nc, js), running(config, record) as runtime:
        for data in junk:
            await nc.publish(advisory_subject(config), data)
        await nc.flush()

        def judged() -> float:
            return sum(
                sample(runtime, "troupe_advisories_total", verdict=verdict)
                for verdict in ("junk", "drop", "defer", "rescue")
            )

        # The stream is empty before the junk is stored too: wait for every verdict first.
        await eventually(lambda: judged() >= len(junk), "a verdict on every junk message")
        await eventually(lambda: _empty(js, advisory_stream(config)), "every junk message acked")
        junk_count = sample(runtime, "troupe_advisories_total", verdict="junk")
        dropped = sample(runtime, "troupe_advisories_total", verdict="drop")
        await send(js, config, "good")
        await eventually(lambda: called == ["good"], "the next good message to be handled")
        readyz = await http_get(runtime.health.port, "/readyz")
        restarts = sample(runtime, "troupe_rescuer_restarts_total")

    assert (junk_count, dropped) == (4, 2)
    assert readyz.status_code == 200
    assert restarts == 0


async def test_the_advisory_stream_refuses_a_message_larger_than_an_advisory(
    nats_url: str,
) -> None:
    config = make_config(nats_url)
    async with provisioned(config) as (_, js):
        with pytest.raises(BadRequestError, match="message size exceeds maximum"):
            await js.publish(advisory_subject(config), b"x" * (advisories.MAX_ADVISORY_BYTES + 1))

        assert await stream_count(js, advisory_stream(config)) == 0


async def test_a_forged_letter_sent_first_does_not_make_the_real_letter_disappear(
    nats_url: str,
) -> None:
    config = make_config(nats_url)

    async def never(ctx: Context) -> None:
        raise AssertionError("a malformed message is never handled")

    async with provisioned(config) as (_, js), running(config, never):
        origin = Origin(config.inbox_subject(0), config.inbox_stream, 1)
        forged = await js.publish(
            config.dead_letter_subject,
            b"forged",
            headers={"Nats-Msg-Id": letter_id(origin), REASON_HEADER: "forged"},
        )
        await js.publish(config.inbox_subject(0), b"{not a cloudevent")
        await eventually(
            lambda: _count_at_least(js, config.dead_letter_stream, 2), "the real dead letter"
        )
        letters = await stored(js, config.dead_letter_stream)
        await eventually(lambda: inbox_empty(js, config), "the input to be acknowledged")

    assert forged.seq == 1
    real = [m for m in letters if m.data == b"{not a cloudevent"]
    assert len(real) == 1
    assert (real[0].headers or {})[REASON_HEADER] == "malformed"
    assert (real[0].headers or {})[SEQUENCE_HEADER] == "1"
    assert (real[0].headers or {})["Nats-Msg-Id"].startswith(letter_id(origin) + ":")


async def test_a_message_dead_lettered_twice_is_still_stored_once(nats_url: str) -> None:
    """The letter id keeps deduplicating honest writers (a replica and the rescuer)."""
    config = make_config(nats_url)
    async with provisioned(config) as (nc, js):
        letters = DeadLetters(nc, js, config)
        origin = Origin(config.inbox_subject(0), config.inbox_stream, 4)
        for reason, error in (("exhausted", "boom"), ("max-deliveries", "crashed")):
            await letters.send(
                b"data",
                {"ce-id": "e1"},
                reason=DeadLetterReason(reason),
                error=error,
                attempts=3,
                origin=origin,
            )

        assert await stream_count(js, config.dead_letter_stream) == 1


async def test_a_message_on_an_undeclared_priority_level_is_refused_at_publish_time(
    nats_url: str,
) -> None:
    config = make_config(nats_url, messaging={"priorityLevels": 2, "ackWait": "5s"})
    async with provisioned(config) as (_, js):
        for subject in (
            naming.inbox_subject(config.namespace, config.agent, 2),
            naming.inbox_subject(config.namespace, config.agent, 9),
            f"{config.inbox_subject(0)}.deeper",
        ):
            with pytest.raises(NoStreamResponseError):
                await js.publish(subject, b"{}")
        await js.publish(config.inbox_subject(1), b"{}")

        assert await stream_count(js, config.inbox_stream) == 1


async def test_the_rescue_loop_is_restarted_after_it_fails_and_counts_it(
    nats_url: str,
) -> None:
    config = make_config(nats_url, messaging={"ackWait": "1s"})

    class FailsOnce(DeadLetters):
        failed = False

        async def _on_advisory(self, msg: Any) -> None:
            if not FailsOnce.failed:
                FailsOnce.failed = True
                raise RuntimeError("the rescuer broke")
            await super()._on_advisory(msg)

    async with provisioned(config) as (nc, js):
        metrics = RuntimeMetrics()
        rescuer = FailsOnce(nc, js, config, metrics)
        await rescuer.watch_max_deliveries()
        try:
            await nc.publish(advisory_subject(config), b"junk")
            await eventually(lambda: _empty(js, advisory_stream(config)), "the advisory acked")
        finally:
            await rescuer.stop()
        restarts = metrics.registry.get_sample_value("troupe_rescuer_restarts_total")

    assert FailsOnce.failed
    assert restarts == 1


async def _empty(js: JetStreamContext, stream: str) -> bool:
    return await stream_count(js, stream) == 0


async def _count_at_least(js: JetStreamContext, stream: str, count: int) -> bool:
    return await stream_count(js, stream) >= count
