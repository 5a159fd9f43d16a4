"""One owner for a workflow's runs: engine pods replaced while runs are in flight, a
stale engine fenced off by the server, a duplicate append that rebuilds from the log."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import uuid
from collections import Counter
from contextlib import ExitStack
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import nats
import pytest

from tests.integration.runtime_harness import eventually
from tests.integration.test_workflow_recovery import (
    LINEAR,
    engine_answers,
    engine_process,
    recording,
)
from tests.integration.workflow_harness import (
    agents,
    engine_config,
    new_namespace,
    result,
    run_events,
    trigger,
)
from troupe_devcluster.layout import free_port
from troupe_runtime.contract import pod
from troupe_runtime.contract.engine_config import EngineConfig
from troupe_runtime.contract.run_events import RunStarted, StepDispatched, encode_event
from troupe_runtime.contract.workflow_resources import build_workflow_resources
from troupe_runtime.nats.provision import ensure_workflow_resources
from troupe_runtime.workflow.lease import Lease, LeaseLost
from troupe_runtime.workflow.runlog import RunLog

ROTATIONS = 6
RUNS_PER_ROTATION = 8
OVERLAP_EFFECTS = 12


async def live(config: EngineConfig, process: subprocess.Popen[bytes]) -> bool:
    """The process serves /healthz: it is up and contending, though perhaps not owning."""
    return await engine_answers(config, process, pod.HEALTH_PATH)


async def test_engine_pods_deleted_repeatedly_during_load_leave_no_run_stuck(
    nats_url: str, tmp_path: Path
) -> None:
    """Like a ReplicaSet: each replacement starts before its predecessor is gone, and the
    predecessor is told to stop (SIGTERM) or dies (SIGKILL) while runs are in flight."""
    ns = new_namespace()
    base = engine_config(nats_url, ns, LINEAR, maxConcurrentRuns=8)
    effects: Counter[tuple[str, str]] = Counter()
    gate = asyncio.Event()
    gate.set()
    handlers = {name: recording(name, effects, gate, work=0.1) for name in "abc"}
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    runs: list[str] = []
    await ensure_workflow_resources(js, build_workflow_resources(base))

    def pod() -> tuple[EngineConfig, subprocess.Popen[bytes]]:
        config = base.model_copy(update={"health_port": free_port()})
        return config, stack.enter_context(engine_process(config, tmp_path))

    def progressed(threshold: int) -> bool:
        return len(effects) >= threshold

    async def more_load() -> None:
        """New runs, so that each deletion lands while runs are in flight."""
        batch = [uuid.uuid4().hex for _ in range(RUNS_PER_ROTATION)]
        runs.extend(batch)
        await asyncio.gather(*(trigger(js, base, [], r) for r in batch))

    with ExitStack() as stack:
        async with agents(nats_url, ns, handlers):
            config, current = pod()
            await eventually(partial(engine_answers, config, current), "the first engine")
            for rotation in range(ROTATIONS):
                successor_config, successor = pod()
                await eventually(partial(live, successor_config, successor), "the new pod")
                # The two overlap while runs start and move on, as the chaos run saw.
                await more_load()
                await eventually(
                    partial(progressed, len(effects) + OVERLAP_EFFECTS),
                    "runs to make progress while both engines are up",
                )
                current.send_signal(signal.SIGTERM if rotation % 2 == 0 else signal.SIGKILL)
                current.wait()
                await eventually(
                    partial(engine_answers, successor_config, successor), "the new pod to own"
                )
                config, current = successor_config, successor
            outcomes = await asyncio.gather(*(result(js, base, r) for r in runs))
    await nc.close()
    assert Counter(o["status"] for o in outcomes) == {"Succeeded": len(runs)}
    assert effects == Counter({(r, step["name"]): 1 for r in runs for step in LINEAR})


async def test_an_engine_whose_lease_was_taken_cannot_append_to_a_runs_log(
    nats_url: str,
) -> None:
    config = engine_config(nats_url, new_namespace(), LINEAR)
    nc = await nats.connect(nats_url)
    other = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_workflow_resources(js, build_workflow_resources(config))
    kv = await js.key_value(config.runs_bucket)
    stale = Lease(nc, js, config)
    assert await stale.acquire(lambda: False)
    log = RunLog(js, kv, config, stale)
    run = uuid.uuid4().hex
    started = await log.append(None, RunStarted(run_id=run, at=datetime.now(UTC)))
    # The owner hangs with its connection open; a successor takes over (a short wait
    # stands in for TAKEOVER_SECONDS) by winning the compare-and-set on the lease.
    successor = Lease(other, other.jetstream(), config)
    await successor._take()
    dispatched = StepDispatched(run_id=run, at=datetime.now(UTC), step="a", attempt=1)
    with pytest.raises(LeaseLost):
        await log.append(started, dispatched)
    events = await run_events(js, config, run)
    await successor.release()
    await other.close()
    await nc.close()
    assert [e.kind for e in events] == ["RunStarted"]


async def test_a_retried_append_that_the_log_already_has_returns_the_state_from_the_log(
    nats_url: str,
) -> None:
    """The append landed but saving the projection failed: the retry is a duplicate, and
    the engine's state and the projection then match the log."""
    config = engine_config(nats_url, new_namespace(), LINEAR)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_workflow_resources(js, build_workflow_resources(config))
    kv = await js.key_value(config.runs_bucket)
    lease = Lease(nc, js, config)
    assert await lease.acquire(lambda: False)
    log = RunLog(js, kv, config, lease)
    run = uuid.uuid4().hex
    started = await log.append(None, RunStarted(run_id=run, at=datetime.now(UTC)))
    dispatched = StepDispatched(run_id=run, at=datetime.now(UTC), step="a", attempt=1)
    # What a crashed save leaves: the event in the log, the projection one event behind.
    await js.publish(
        config.subject("events", run),
        encode_event(dispatched),
        headers={"Nats-Msg-Id": dispatched.key},
    )
    state = await log.append(started, dispatched)
    projected = await log.projected(run)
    await lease.release()
    await nc.close()
    assert state.steps["a"].status == "Running"
    assert projected == state


async def test_a_dispatch_that_fails_is_tried_again_and_the_run_finishes(
    nats_url: str, tmp_path: Path
) -> None:
    """The step's agent has no inbox stream yet, so publishing the dispatch fails; the
    engine stays up and dispatches again once the agent exists."""
    ns = new_namespace()
    config = engine_config(nats_url, ns, [{"name": "late"}], healthPort=free_port())
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_workflow_resources(js, build_workflow_resources(config))
    run = uuid.uuid4().hex

    async def late(ctx: Any) -> Any:
        return "done"

    with engine_process(config, tmp_path) as process:
        await eventually(partial(engine_answers, config, process), "the engine")
        await trigger(js, config, None, run)

        async def started() -> bool:
            return any(e.kind == "RunStarted" for e in await run_events(js, config, run))

        await eventually(started, "the run to start")
        async with agents(nats_url, ns, {"late": late}):
            outcome = await result(js, config, run)
        assert await engine_answers(config, process)
    await nc.close()
    assert outcome["status"] == "Succeeded"


async def test_each_dispatch_carries_the_earlier_of_the_step_timeout_and_the_run_deadline(
    nats_url: str, tmp_path: Path
) -> None:
    ns = new_namespace()
    steps: list[dict[str, Any]] = [
        {"name": "quick", "timeout": "30s"},
        {"name": "long", "timeout": "1h", "dependsOn": ["quick"]},
    ]
    config = engine_config(nats_url, ns, steps, deadline="10m", healthPort=free_port())
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_workflow_resources(js, build_workflow_resources(config))
    deadlines: dict[str, datetime | None] = {}

    def noting(name: str) -> Any:
        async def handle(ctx: Any) -> Any:
            deadlines[name] = ctx.event.deadline
            return name

        return handle

    run = uuid.uuid4().hex
    async with agents(nats_url, ns, {"quick": noting("quick"), "long": noting("long")}):
        with engine_process(config, tmp_path) as process:
            await eventually(partial(engine_answers, config, process), "the engine")
            await trigger(js, config, None, run)
            await result(js, config, run)
        events = await run_events(js, config, run)
    await nc.close()
    started = next(e for e in events if isinstance(e, RunStarted))
    quick = next(e for e in events if isinstance(e, StepDispatched) and e.step == "quick")
    assert deadlines["quick"] == quick.at + config.step("quick").timeout
    assert config.deadline is not None
    assert deadlines["long"] == started.at + config.deadline
