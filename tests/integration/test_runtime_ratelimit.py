"""Rate limits: one replica's token bucket, and one bucket shared by all replicas."""

from __future__ import annotations

import time
from contextlib import AsyncExitStack

from tests.integration.runtime_harness import eventually, make_config, provisioned, running, send
from troupe_runtime.agent.context import Context, HandlerFn

TOLERANCE = 0.10


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

    assert abs(measured_rate(times) - 20) <= 20 * TOLERANCE
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
    assert abs(measured_rate(everything) - 25) <= 25 * TOLERANCE
    assert all(times.values()), "every replica handled messages"
