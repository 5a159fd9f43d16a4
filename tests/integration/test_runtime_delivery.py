"""Delivery: outputs, acknowledgements, deduplication, concurrency and priorities."""

from __future__ import annotations

import asyncio

from tests.integration.runtime_harness import (
    eventually,
    http_get,
    inbox_empty,
    make_config,
    output_stream,
    output_subject,
    provisioned,
    running,
    sample,
    send,
    stored,
    stream_count,
)
from troupe_runtime.agent.context import Context
from troupe_runtime.agent.handlers.echo import echo
from troupe_runtime.state import StateStore

TRACE = "0af7651916cd43dd8448eb211c80319c"


async def test_echo_publishes_a_follow_up_event_and_acknowledges_the_input(
    nats_url: str,
) -> None:
    config = make_config(nats_url)
    async with provisioned(config) as (_, js), running(config, echo):
        event = await send(
            js,
            config,
            {"hello": "world"},
            correlationid="run-1",
            traceparent=f"00-{TRACE}-b7ad6b7169203331-01",
        )
        await eventually(lambda: stream_count(js, output_stream(config)), "the output")
        await eventually(lambda: inbox_empty(js, config), "the input to be acknowledged")
        [output] = await stored(js, output_stream(config))

    assert output.subject == output_subject(config.namespace)
    assert output.data == b'{"hello":"world"}'
    assert output.headers is not None
    assert output.headers["ce-causationid"] == event.id
    assert output.headers["ce-correlationid"] == "run-1"
    assert output.headers["ce-source"] == f"/{config.namespace}/agent"
    assert output.headers["ce-traceparent"].startswith(f"00-{TRACE}-")


async def test_a_redelivered_input_does_not_duplicate_its_outputs(nats_url: str) -> None:
    config = make_config(nats_url)
    async with provisioned(config) as (_, js), running(config, echo) as runtime:
        first = await send(js, config, {"n": 1})
        await send(js, config, {"n": 1}, event_id=first.id)
        await eventually(
            lambda: sample(runtime, "troupe_messages_total", outcome="succeeded") == 2,
            "both deliveries to be handled",
        )
        outputs = await stream_count(js, output_stream(config))

    assert outputs == 1


async def test_no_more_than_max_in_flight_handlers_run_at_once(nats_url: str) -> None:
    config = make_config(nats_url, messaging={"maxInFlight": 3})
    running_now, peak, done = 0, 0, 0

    async def slow(ctx: Context) -> None:
        nonlocal running_now, peak, done
        running_now += 1
        peak = max(peak, running_now)
        await asyncio.sleep(0.1)
        running_now -= 1
        done += 1

    async with provisioned(config) as (_, js):
        for n in range(12):
            await send(js, config, n)
        async with running(config, slow):
            await eventually(lambda: done == 12, "12 messages handled")

    assert peak == 3


async def test_handlers_share_state_through_the_context(nats_url: str) -> None:
    config = make_config(
        nats_url,
        state=[{"name": "counts", "conflictPolicy": "retry"}],
        messaging={"maxInFlight": 8},
    )
    done = 0

    async def count(ctx: Context) -> None:
        nonlocal done
        counts = await ctx.state.bucket("counts")
        await counts.update("total", lambda total: (total or 0) + 1)
        done += 1

    async with provisioned(config) as (_, js):
        for n in range(24):
            await send(js, config, n)
        async with running(config, count) as runtime:
            await eventually(lambda: done == 24, "24 messages handled")
            total = await (await StateStore(js, config).bucket("counts")).get("total")

    assert total is not None
    assert total.value == 24
    assert sample(runtime, "troupe_messages_total", outcome="succeeded") == 24


async def test_higher_priorities_go_first_and_lower_ones_are_not_starved(
    nats_url: str,
) -> None:
    config = make_config(nats_url, messaging={"priorityLevels": 2, "maxInFlight": 1})
    order: list[int | None] = []

    async def record(ctx: Context) -> None:
        order.append(ctx.event.priority)

    async with provisioned(config) as (_, js):
        for n in range(15):
            await send(js, config, n, priority=0)
            await send(js, config, n, priority=1)
        async with running(config, record):
            await eventually(lambda: len(order) == 30, "30 messages handled")

    assert order[0] == 1
    assert order[:12].count(1) == 8
    assert order[:12].count(0) == 4


async def test_the_health_port_serves_probes_and_metrics(nats_url: str) -> None:
    config = make_config(nats_url)
    async with provisioned(config) as (_, js), running(config, echo) as runtime:
        await send(js, config, "ping")
        await eventually(lambda: stream_count(js, output_stream(config)), "the output")
        healthz = await http_get(runtime.health.port, "/healthz")
        readyz = await http_get(runtime.health.port, "/readyz")
        metrics = await http_get(runtime.health.port, "/metrics")

    assert (healthz.status_code, readyz.status_code) == (200, 200)
    assert 'troupe_messages_total{outcome="succeeded"} 1.0' in metrics.text
    assert "troupe_handler_seconds_count 1.0" in metrics.text
