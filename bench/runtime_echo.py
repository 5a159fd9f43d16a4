"""Benchmark: an echo agent on the runtime against a bare nats-py loop, same server, same run.

Throughput: N messages are published to the inbox first, then the consumer
starts; the rate is measured between the first and the last output's
JetStream timestamps. Latency per hop: one message at a time, from the
input's publish to the output's arrival at a subscriber.

Run: ``.venv/bin/python bench/runtime_echo.py [--messages 5000] [--samples 300]``
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from troupe_devcluster import launcher
from troupe_runtime.agent.handlers import LoadedHandler
from troupe_runtime.agent.handlers.echo import echo
from troupe_runtime.agent.runtime import Runtime
from troupe_runtime.contract import envelope
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.agent_resources import DUPLICATE_WINDOW_SECONDS, build_agent_resources
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.nats.provision import ensure_agent_resources

IN_FLIGHT = 64
POLL_SECONDS = 0.02

Consumer = Callable[[RuntimeConfig], AbstractAsyncContextManager[None]]


def agent_config(nats_url: str) -> RuntimeConfig:
    """A fresh echo agent, in a namespace of its own, with one output subject."""
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    return RuntimeConfig.model_validate(
        {
            "agent": "echo",
            "namespace": namespace,
            "nats": {"url": nats_url},
            "messaging": {"maxInFlight": IN_FLIGHT},
            "contract": {"outputSubjects": [f"out.{namespace}"]},
        }
    )


async def provision(js: JetStreamContext, config: RuntimeConfig) -> str:
    await ensure_agent_resources(js, build_agent_resources(config))
    stream = f"OUT_{config.namespace}"
    await js.add_stream(
        StreamConfig(
            name=stream,
            subjects=config.contract.output_subjects,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
        )
    )
    return stream


def event(index: int) -> tuple[dict[str, str], bytes]:
    return envelope.to_binary(
        CloudEvent(
            id=uuid.uuid4().hex,
            source="/bench",
            type="bench.echo",
            data={"i": index, "pad": "x" * 64},
        )
    )


@asynccontextmanager
async def runtime_echo(config: RuntimeConfig) -> AsyncIterator[None]:
    runtime = Runtime(config, handler=LoadedHandler(echo), host="127.0.0.1", port=0)
    task = asyncio.create_task(runtime.run())

    async def ready() -> bool:
        return runtime.ready()

    await until(ready)
    try:
        yield
    finally:
        runtime.stop()
        await task


@asynccontextmanager
async def bare_echo(config: RuntimeConfig) -> AsyncIterator[None]:
    """The baseline: fetch a batch, publish each (deduplicated), ack each."""
    nc = await nats.connect(config.nats.url)
    js = nc.jetstream()
    subscription = await js.pull_subscribe_bind(config.consumer_name(0), config.inbox_stream)
    [subject] = config.contract.output_subjects
    stopping = asyncio.Event()

    async def loop() -> None:
        while not stopping.is_set():
            try:
                messages = await subscription.fetch(IN_FLIGHT, timeout=0.5)
            except TimeoutError:
                continue
            for msg in messages:
                headers = {**(msg.headers or {})}
                headers["Nats-Msg-Id"] = f"{headers['ce-id']}:{subject}"
                await js.publish(subject, msg.data, headers=headers)
                await msg.ack()

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        stopping.set()
        await task
        await nc.close()


async def until(condition: Callable[[], Awaitable[bool]], within: float = 120.0) -> None:
    deadline = time.monotonic() + within
    while True:
        if await condition():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the benchmark did not finish within {within:g}s")
        await asyncio.sleep(POLL_SECONDS)


async def throughput(
    js: JetStreamContext, config: RuntimeConfig, consumer: Consumer, messages: int
) -> float:
    out = await provision(js, config)
    for index in range(messages):
        headers, payload = event(index)
        await js.publish_async(config.inbox_subject(0), payload, headers=headers)
    await js.publish_async_completed()

    async def all_out() -> bool:
        return bool((await js.stream_info(out)).state.messages >= messages)

    async with consumer(config):
        await until(all_out)
    state = (await js.stream_info(out)).state
    first, last = await js.get_msg(out, state.first_seq), await js.get_msg(out, state.last_seq)
    assert first.time is not None
    assert last.time is not None
    return (messages - 1) / (last.time - first.time).total_seconds()


async def latencies(
    nc: Client, js: JetStreamContext, config: RuntimeConfig, consumer: Consumer, samples: int
) -> list[float]:
    await provision(js, config)
    arrivals: asyncio.Queue[float] = asyncio.Queue()

    async def arrived(msg: Msg) -> None:
        arrivals.put_nowait(time.perf_counter())

    subscription = await nc.subscribe(config.contract.output_subjects[0], cb=arrived)
    measured = []
    async with consumer(config):
        for index in range(samples):
            headers, payload = event(index)
            sent = time.perf_counter()
            await js.publish(config.inbox_subject(0), payload, headers=headers)
            measured.append(await asyncio.wait_for(arrivals.get(), 10) - sent)
    await subscription.unsubscribe()
    return measured


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def bench(nats_url: str, messages: int, samples: int) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    rates, hops = {}, {}
    contenders: dict[str, Consumer] = {"bare nats-py": bare_echo, "troupe runtime": runtime_echo}
    for name, consumer in contenders.items():
        rates[name] = await throughput(js, agent_config(nats_url), consumer, messages)
        hops[name] = await latencies(nc, js, agent_config(nats_url), consumer, samples)
    await nc.close()

    print(f"echo, {messages} messages, maxInFlight/batch {IN_FLIGHT}; {samples} latency samples")
    print(f"{'':16} {'msgs/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9}")
    for name in contenders:
        p50, p99 = percentile(hops[name], 0.5) * 1e3, percentile(hops[name], 0.99) * 1e3
        mean = statistics.fmean(hops[name]) * 1e3
        print(f"{name:16} {rates[name]:10.0f} {p50:9.3f} {p99:9.3f} {mean:9.3f}")
    bare, runtime = hops["bare nats-py"], hops["troupe runtime"]
    print(f"throughput ratio runtime/bare: {rates['troupe runtime'] / rates['bare nats-py']:.2f}")
    for label, fraction in (("p50", 0.5), ("p99", 0.99)):
        added = (percentile(runtime, fraction) - percentile(bare, fraction)) * 1e3
        print(f"added latency per hop at {label}: {added:+.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    layout = launcher.up_nats()
    try:
        asyncio.run(bench(layout.nats_url, args.messages, args.samples))
    finally:
        launcher.down(layout)


if __name__ == "__main__":
    main()
