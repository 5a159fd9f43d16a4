"""Benchmark: what a workflow's finished runs cost the operator and the engine.

Two workflows on one nats-server, one with ``--few`` finished runs (default 100), one
with ``--many`` (default 100,000), seeded as the engine leaves them: each run's log
(RunStarted, StepDispatched, StepSucceeded, RunFinished), its result, its tally and its
projection in the runs bucket. Then, alternating between the two:

- operator pass: what a Workflow pass does against NATS (provision the resources, count
  the runs and read the latest one), the median of ``--passes``;
- engine start: an engine process's work from connecting to ready (bind, take the
  lease, recover the unfinished runs, open the consumers), the median of ``--starts``.

The target is a ratio (many / few) of at most 1.2 for both.

Run: ``.venv/bin/python bench/workflow_retention.py [--few 100] [--many 100000]``
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import nats
from nats.js import JetStreamContext

from troupe_devcluster import launcher
from troupe_operator.builders.jetstream import workflow_spec_fields
from troupe_operator.clients.nats import NatsPool, NatsTarget
from troupe_runtime.contract import envelope
from troupe_runtime.contract.engine_config import EngineConfig
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.run_events import (
    Event,
    RunFinished,
    RunStarted,
    StepDispatched,
    StepSucceeded,
    encode_event,
)
from troupe_runtime.contract.run_state import replay
from troupe_runtime.contract.workflow_resources import build_workflow_resources
from troupe_runtime.nats.provision import ensure_workflow_resources
from troupe_runtime.workflow.service import EngineService

CHUNK = 2000
"""Publishes in flight at once while seeding."""


def workflow(nats_url: str, name: str) -> EngineConfig:
    return EngineConfig.model_validate(
        {
            "workflow": name,
            "namespace": "bench",
            "triggerSubject": f"bench.{name}.start",
            "steps": [{"name": "a", "agent": "a", "subject": "troupe.bench.agents.a.in.p0"}],
            "nats": {"url": nats_url},
        }
    )


async def seed(js: JetStreamContext, config: EngineConfig, runs: int) -> None:
    """``runs`` finished runs, as an engine leaves them."""
    kv = await js.key_value(config.runs_bucket)
    at = datetime.now(UTC) - timedelta(minutes=5)

    async def one(run: str) -> None:
        events: list[Event] = [
            RunStarted(run_id=run, at=at, input=[]),
            StepDispatched(run_id=run, at=at, step="a", attempt=1, input=[]),
            StepSucceeded(run_id=run, at=at, step="a", attempt=1, output=["a"]),
            RunFinished(run_id=run, at=at, status="Succeeded", output=["a"]),
        ]
        for event in events:
            await js.publish(config.subject("events", run), encode_event(event))
        result = CloudEvent(
            id=f"{run}/result", source="/bench", type="troupe.workflow.succeeded", data={}
        )
        headers, payload = envelope.to_binary(result)
        await js.publish(config.subject("results", run), payload, headers=headers)
        await js.publish(config.tally_subject("Succeeded"), f'{{"run": "{run}"}}'.encode())
        state = replay(events)
        assert state is not None
        await kv.put(run, state.model_dump_json(by_alias=True).encode())

    ids = [uuid.uuid4().hex for _ in range(runs)]
    for start in range(0, runs, CHUNK):
        await asyncio.gather(*(one(run) for run in ids[start : start + CHUNK]))


async def operator_pass(pool: NatsPool, target: NatsTarget, config: EngineConfig) -> float:
    started = time.perf_counter()
    resources = build_workflow_resources(config)
    await pool.provision_workflow(target, resources, workflow_spec_fields(resources))
    tally = await pool.runs(target, config)
    elapsed = time.perf_counter() - started
    assert tally.last is not None
    return elapsed


async def engine_start(config: EngineConfig) -> float:
    service = EngineService(config, host="127.0.0.1", port=0)
    started = time.perf_counter()
    task = asyncio.create_task(service.run())
    while not service.ready():
        if task.done():
            task.result()
        await asyncio.sleep(0.001)
    elapsed = time.perf_counter() - started
    service.stop()
    await task
    return elapsed


async def alternate(
    repeats: int,
    measure: Callable[[EngineConfig], Awaitable[float]],
    few: EngineConfig,
    many: EngineConfig,
) -> tuple[float, float]:
    """Medians for ``few`` and ``many``, measured in turn so drift hits both alike."""
    samples: dict[str, list[float]] = {few.workflow: [], many.workflow: []}
    for _ in range(repeats):
        for config in (few, many):
            samples[config.workflow].append(await measure(config))
    return statistics.median(samples[few.workflow]), statistics.median(samples[many.workflow])


def report(what: str, few_runs: int, many_runs: int, few: float, many: float) -> None:
    ratio = many / few
    verdict = "ok" if ratio <= 1.2 else "OVER TARGET"
    print(
        f"{what:<14} {few_runs:>7} runs: {few * 1000:8.2f} ms   {many_runs:>7} runs: "
        f"{many * 1000:8.2f} ms   ratio {ratio:.2f} (target <= 1.2: {verdict})"
    )


async def bench(nats_url: str, few_runs: int, many_runs: int, passes: int, starts: int) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream(timeout=30)
    few, many = workflow(nats_url, "few"), workflow(nats_url, "many")
    for config, runs in ((few, few_runs), (many, many_runs)):
        await ensure_workflow_resources(js, build_workflow_resources(config))
        began = time.perf_counter()
        await seed(js, config, runs)
        info = await js.stream_info(config.stream)
        print(
            f"seeded {runs} finished runs of {config.workflow} "
            f"({info.state.messages} messages) in {time.perf_counter() - began:.1f}s"
        )
    await nc.close()

    pool = NatsPool()
    target = NatsTarget(nats_url)

    async def one_pass(config: EngineConfig) -> float:
        return await operator_pass(pool, target, config)

    await alternate(3, one_pass, few, many)  # warm the connection and the server's caches
    pass_few, pass_many = await alternate(passes, one_pass, few, many)
    await pool.close()
    start_few, start_many = await alternate(starts, engine_start, few, many)
    report("operator pass", few_runs, many_runs, pass_few, pass_many)
    report("engine start", few_runs, many_runs, start_few, start_many)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--few", type=int, default=100)
    parser.add_argument("--many", type=int, default=100_000)
    parser.add_argument("--passes", type=int, default=40)
    parser.add_argument("--starts", type=int, default=15)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    layout = launcher.up_nats()
    try:
        asyncio.run(bench(layout.nats_url, args.few, args.many, args.passes, args.starts))
    finally:
        launcher.down(layout)


if __name__ == "__main__":
    main()
