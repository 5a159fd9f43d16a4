"""Rate limits: one replica's token bucket, and one bucket shared by all replicas."""

from __future__ import annotations

import time
from contextlib import AsyncExitStack

from tests.integration.runtime_harness import (
    eventually,
    inbox_empty,
    make_config,
    provisioned,
    running,
    send,
)
from troupe_runtime.agent.context import Context, HandlerFn
from troupe_runtime.contract import naming
from troupe_runtime.contract.agent_resources import build_agent_resources
from troupe_runtime.nats.provision import ensure_agent_resources

TOLERANCE = 0.10
"""How far above the limit the measured rate may be (clock jitter over a short run).

A limit is a ceiling, so the bound above is tight; below, a loaded machine may run slower
than the limit without a fault, so the floor (``FLOOR`` of the rate) only catches a limiter
that throttles far too hard. Unlimited, the same runs go hundreds of messages a second.
"""
FLOOR = 0.5


def measured_rate(times: list[float]) -> float:
    """Messages per second between the first and the last message handled."""
    return (len(times) - 1) / (max(times) - min(times))


async def test_a_replica_rate_limit_holds(nats_url: str) -> None:
    config = make_config(nats_url, rateLimit={"rate": 20, "burst": 1}, messaging={"maxInFlight": 4})
    times: list[float] = []

    async def record(ctx: Context) -> None:
        times.append(time.monotonic())

    async with provisioned(config) as (_, js):
        for n in range(41):
            await send(js, config, n)
        async with running(config, record) as runtime:
            await eventually(lambda: len(times) == 41, "41 messages handled")
            throttled = runtime.metrics.registry.get_sample_value("troupe_throttled_total")

    assert 20 * FLOOR <= measured_rate(times) <= 20 * (1 + TOLERANCE)
    assert throttled is not None
    assert throttled >= 35


async def test_a_global_rate_limit_holds_across_three_replicas(nats_url: str) -> None:
    config = make_config(
        nats_url,
        rateLimit={"rate": 25, "burst": 1, "scope": "global"},
        messaging={"maxInFlight": 4},
    )
    times: dict[int, list[float]] = {0: [], 1: [], 2: []}

    def recorder(replica: int) -> HandlerFn:
        async def record(ctx: Context) -> None:
            times[replica].append(time.time())

        return record

    async with provisioned(config) as (_, js):
        for n in range(51):
            await send(js, config, n)
        async with AsyncExitStack() as replicas:
            for replica in times:
                await replicas.enter_async_context(running(config, recorder(replica)))
            await eventually(lambda: sum(map(len, times.values())) == 51, "51 messages handled")

    everything = [t for replica in times.values() for t in replica]
    assert 25 * FLOOR <= measured_rate(everything) <= 25 * (1 + TOLERANCE)
    assert all(times.values()), "every replica handled messages"


async def test_a_message_waiting_longer_than_ack_wait_for_a_token_is_not_redelivered(
    nats_url: str,
) -> None:
    # A token every 1.5 s per replica, and ackWait 1 s: every message but a replica's
    # first waits past ackWait, and JetStream would hand it to the other replica.
    config = make_config(
        nats_url, rateLimit={"rate": 0.66, "burst": 1}, messaging={"ackWait": "1s"}
    )
    handled: list[tuple[str, int]] = []

    async def record(ctx: Context) -> None:
        handled.append((ctx.event.id, ctx.attempt))

    async with provisioned(config) as (_, js):
        sent = [(await send(js, config, n)).id for n in range(4)]
        async with running(config, record), running(config, record):
            await eventually(lambda: inbox_empty(js, config), "every message acknowledged")

    assert sorted(handled) == sorted((event_id, 1) for event_id in sent)


async def test_junk_in_the_global_rate_limit_key_does_not_stop_the_agent(nats_url: str) -> None:
    config = make_config(nats_url, rateLimit={"rate": 50, "burst": 1, "scope": "global"})
    handled: list[str] = []

    async def record(ctx: Context) -> None:
        handled.append(ctx.event.id)

    async with provisioned(config) as (_, js):
        limits = await js.key_value(naming.rate_limit_bucket(config.namespace))
        await limits.put(config.agent, b"1e300")  # a TAT no replica could have written
        first = await send(js, config, "first")
        async with running(config, record):
            await eventually(lambda: handled == [first.id], "the message past a far-future TAT")
            await limits.put(config.agent, b"junk")
            second = await send(js, config, "second")
            await eventually(lambda: handled == [first.id, second.id], "the message past junk")


async def test_a_message_whose_token_cannot_be_taken_is_handed_back_at_once(
    nats_url: str,
) -> None:
    # ackWait is far beyond the test's deadline: only a NAK brings the message back in time.
    config = make_config(
        nats_url,
        rateLimit={"rate": 50, "burst": 1, "scope": "global"},
        messaging={"ackWait": "120s"},
        retry={"maxAttempts": 20},
    )
    bucket = naming.rate_limit_bucket(config.namespace)
    handled: list[str] = []

    async def record(ctx: Context) -> None:
        handled.append(ctx.event.id)

    async with provisioned(config) as (_, js), running(config, record):
        await js.delete_key_value(bucket)
        event = await send(js, config, "wait for the bucket")

        async def pulled() -> bool:
            info = await js.consumer_info(config.inbox_stream, config.consumer_name(0))
            return bool(info.delivered.consumer_seq >= 1)

        await eventually(pulled, "the message to be pulled while the bucket is gone")
        await ensure_agent_resources(js, build_agent_resources(config))
        await eventually(lambda: handled == [event.id], "the message handled", within=10)
