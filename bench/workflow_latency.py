"""Benchmark: a 3-step linear workflow of echo agents, end to end, against a bare
nats-py chain of three JetStream hops, same server, same run.

Troupe: a run is triggered, the engine dispatches a → b → c to three echo
agent runtimes, logs every transition and publishes the result. Bare: a
message goes through three streams, each hop a pull consumer that fetches,
publishes to the next stream and acks. Latency is one run (or message) at a
time, from publish to the result's arrival at a subscriber; throughput is N
runs started at once.

Run: ``.venv/bin/python bench/workflow_latency.py [--samples 300] [--runs 500]``
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, StreamConfig

from troupe_devcluster import launcher
from troupe_runtime.agent.runtime import Runtime
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.agent_resources import build_agent_resources
from troupe_runtime.contract.engine_config import EngineConfig
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.workflow_resources import build_workflow_resources
from troupe_runtime.nats.provision import ensure_agent_resources, ensure_workflow_resources
from troupe_runtime.workflow.service import EngineService

STEPS = ("a", "b", "c")
IN_FLIGHT = 64


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(fraction * len(ordered)), len(ordered) - 1)]


async def until(ready: Callable[[], bool], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError("component not ready")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def troupe_workflow(nats_url: str, js: JetStreamContext) -> AsyncIterator[EngineConfig]:
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    config = EngineConfig.model_validate(
        {
            "workflow": "chain",
            "namespace": namespace,
            "triggerSubject": f"{namespace}.start",
            "maxConcurrentRuns": 1000,
            "nats": {"url": nats_url},
            "steps": [
                {
                    "name": step,
                    "agent": step,
                    "subject": naming.inbox_subject(namespace, step, 0),
                    "dependsOn": [STEPS[i - 1]] if i else [],
                }
                for i, step in enumerate(STEPS)
            ],
        }
    )
    async with AsyncExitStack() as stack:
        for step in STEPS:
            agent = RuntimeConfig.model_validate(
                {
                    "agent": step,
                    "namespace": namespace,
                    "nats": {"url": nats_url},
                    "messaging": {"maxInFlight": IN_FLIGHT},
                }
            )
            await ensure_agent_resources(js, build_agent_resources(agent))
            runtime = Runtime(agent, host="127.0.0.1", port=0)
            task = asyncio.create_task(runtime.run())
            stack.push_async_callback(_stop, runtime.stop, task)
            await until(runtime.ready)
        await ensure_workflow_resources(js, build_workflow_resources(config))
        service = EngineService(config, host="127.0.0.1", port=0)
        engine_task = asyncio.create_task(service.run())
        stack.push_async_callback(_stop, service.stop, engine_task)
        await until(service.ready)
        yield config


async def _stop(stop: Callable[[], None], task: asyncio.Task[None]) -> None:
    stop()
    await task


@asynccontextmanager
async def bare_chain(js: JetStreamContext, nc: Client) -> AsyncIterator[tuple[str, str]]:
    """Three streams, three pull consumers that forward fetch → publish → ack."""
    prefix = f"bare{uuid.uuid4().hex[:8]}"
    hops = [f"{prefix}.{i}" for i in range(len(STEPS) + 1)]
    for i, subject in enumerate(hops):
        await js.add_stream(StreamConfig(name=f"{prefix}_{i}", subjects=[subject]))
    stop = asyncio.Event()

    async def forward(i: int) -> None:
        subscription = await js.pull_subscribe(
            hops[i], durable=f"hop{i}", config=ConsumerConfig(max_ack_pending=IN_FLIGHT * 4)
        )
        while not stop.is_set():
            try:
                messages = await subscription.fetch(IN_FLIGHT, timeout=0.5)
            except nats.errors.TimeoutError:
                continue
            for msg in messages:
                await js.publish(hops[i + 1], msg.data, headers=msg.headers)
                await msg.ack()

    tasks = [asyncio.create_task(forward(i)) for i in range(len(STEPS))]
    try:
        yield hops[0], hops[-1]
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def measure(
    nc: Client,
    results: str,
    start: Callable[[str], Awaitable[None]],
    key: Callable[[Msg], str],
    samples: int,
    runs: int,
) -> tuple[list[float], float]:
    """Sequential latencies (ms), then the rate of ``runs`` started at once (per s)."""
    arrivals: dict[str, asyncio.Future[float]] = {}

    async def arrived(msg: Msg) -> None:
        future = arrivals.get(key(msg))
        if future is not None and not future.done():
            future.set_result(time.perf_counter())

    subscription = await nc.subscribe(results, cb=arrived)
    loop = asyncio.get_running_loop()
    latencies = []
    for _ in range(samples):
        run_id = uuid.uuid4().hex
        arrivals[run_id] = loop.create_future()
        sent = time.perf_counter()
        await start(run_id)
        latencies.append((await asyncio.wait_for(arrivals[run_id], 30) - sent) * 1000)
    ids = [uuid.uuid4().hex for _ in range(runs)]
    for run_id in ids:
        arrivals[run_id] = loop.create_future()
    began = time.perf_counter()
    await asyncio.gather(*(start(run_id) for run_id in ids))
    finished = await asyncio.wait_for(asyncio.gather(*(arrivals[i] for i in ids)), 300)
    await subscription.unsubscribe()
    return latencies, runs / (max(finished) - began)


def trigger_payload(run_id: str) -> tuple[dict[str, str], bytes]:
    event = CloudEvent(id=run_id, source="/bench", type="bench.start", data={"n": 1})
    return envelope.to_binary(event)


async def bench(nats_url: str, samples: int, runs: int) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    async with troupe_workflow(nats_url, js) as config:

        async def start_run(run_id: str) -> None:
            headers, payload = trigger_payload(run_id)
            await js.publish(config.trigger_subject, payload, headers=headers)

        troupe = await measure(
            nc,
            config.subject("results", "*"),
            start_run,
            lambda msg: msg.subject.rsplit(".", 1)[1],
            samples,
            runs,
        )
    async with bare_chain(js, nc) as (first, last):

        async def start_bare(run_id: str) -> None:
            await js.publish(first, b"{}", headers={"run": run_id})

        bare = await measure(
            nc, last, start_bare, lambda msg: (msg.headers or {}).get("run", ""), samples, runs
        )
    await nc.close()
    (t_lat, t_rate), (b_lat, b_rate) = troupe, bare
    print(f"3-step linear workflow, {samples} sequential runs, {runs} concurrent runs")
    print(f"{'':28}{'p50 ms':>9}{'p99 ms':>9}{'runs/s':>9}")
    for name, lat, rate in (
        ("bare nats-py, 3 JS hops", b_lat, b_rate),
        ("troupe workflow", t_lat, t_rate),
    ):
        print(f"{name:28}{statistics.median(lat):9.2f}{percentile(lat, 0.99):9.2f}{rate:9.0f}")
    print(
        f"ratios troupe/bare: p50 {statistics.median(t_lat) / statistics.median(b_lat):.2f}x, "
        f"p99 {percentile(t_lat, 0.99) / percentile(b_lat, 0.99):.2f}x, "
        f"throughput {t_rate / b_rate:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--runs", type=int, default=500)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    layout = launcher.up_nats()
    try:
        asyncio.run(bench(layout.nats_url, args.samples, args.runs))
    finally:
        launcher.down(layout)


if __name__ == "__main__":
    main()
