"""Fallback agents on a real nats-server and real agent runtimes: a step whose agent fails
or times out goes on with the next agent, and the run log records each hand-over."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections import Counter
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import nats
import pytest

from tests.integration.runtime_harness import eventually
from tests.integration.test_workflow_recovery import engine_answers, engine_process
from tests.integration.workflow_harness import (
    agents,
    engine,
    engine_config,
    new_namespace,
    result,
    run_events,
    trigger,
)
from troupe_devcluster.layout import free_port
from troupe_runtime.agent.context import Context, HandlerFn
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.run_events import (
    RunStarted,
    StepDispatched,
    StepFailed,
    StepFellBack,
    StepSucceeded,
    dispatch_id,
)
from troupe_runtime.contract.workflow_resources import build_workflow_resources
from troupe_runtime.nats.provision import ensure_workflow_resources
from troupe_runtime.workflow.engine import STEP_EVENT_TYPE
from troupe_runtime.workflow.lease import Lease
from troupe_runtime.workflow.runlog import RunLog


def failing(calls: list[str]) -> HandlerFn:
    async def handle(ctx: Context) -> Any:
        calls.append(ctx.event.id)
        raise RuntimeError("primary is down")

    return handle


def answering(name: str, calls: list[str], gate: asyncio.Event | None = None) -> HandlerFn:
    async def handle(ctx: Context) -> Any:
        calls.append(ctx.event.id)
        if gate is not None:
            await gate.wait()
        return {"by": name, "got": ctx.event.data}

    return handle


async def test_a_step_whose_agent_fails_is_answered_by_its_fallback(nats_url: str) -> None:
    ns = new_namespace()
    config = engine_config(
        nats_url, ns, [{"name": "s", "agent": "primary", "fallbacks": ["backup"]}]
    )
    primary: list[str] = []
    backup: list[str] = []
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    handlers = {"primary": failing(primary), "backup": answering("backup", backup)}
    async with agents(nats_url, ns, handlers), engine(config):
        run = uuid.uuid4().hex
        await trigger(js, config, {"q": 1}, run)
        outcome = await result(js, config, run)
        events = await run_events(js, config, run)
    await nc.close()
    assert outcome == {
        "status": "Succeeded",
        "output": {"by": "backup", "got": {"q": 1}},
        "error": None,
    }
    assert (primary, backup) == ([f"{run}/s/1"], [f"{run}/s/2"])
    (handover,) = [e for e in events if isinstance(e, StepFellBack)]
    assert (handover.from_agent, handover.to_agent, handover.fallback) == ("primary", "backup", 1)
    assert handover.error == "RuntimeError: primary is down"
    assert [e.kind for e in events] == [
        "RunStarted",
        "StepDispatched",
        "StepFailed",
        "StepFellBack",
        "StepDispatched",
        "StepSucceeded",
        "RunFinished",
    ]
    (answer,) = [e for e in events if isinstance(e, StepSucceeded)]
    assert answer.agent == "backup"


async def test_a_step_whose_agent_times_out_goes_on_with_the_next_fallback(
    nats_url: str,
) -> None:
    ns = new_namespace()
    step = {"name": "s", "agent": "stuck", "fallbacks": ["broken", "backup"], "timeout": "400ms"}
    config = engine_config(nats_url, ns, [step])
    stuck: list[str] = []
    broken: list[str] = []
    backup: list[str] = []
    never = asyncio.Event()
    handlers = {
        "stuck": answering("stuck", stuck, never),
        "broken": failing(broken),
        "backup": answering("backup", backup),
    }
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    async with agents(nats_url, ns, handlers, timeout="30s"), engine(config):
        run = uuid.uuid4().hex
        await trigger(js, config, None, run)
        outcome = await result(js, config, run)
        events = await run_events(js, config, run)
        never.set()
    await nc.close()
    assert outcome["status"] == "Succeeded"
    assert outcome["output"]["by"] == "backup"
    handovers = [(e.from_agent, e.to_agent) for e in events if isinstance(e, StepFellBack)]
    assert handovers == [("stuck", "broken"), ("broken", "backup")]
    assert [e.agent for e in events if isinstance(e, StepDispatched)] == [
        "stuck",
        "broken",
        "backup",
    ]
    assert (stuck, broken, backup) == ([f"{run}/s/1"], [f"{run}/s/2"], [f"{run}/s/3"])


async def test_a_step_fails_the_run_only_when_every_fallback_failed(nats_url: str) -> None:
    ns = new_namespace()
    config = engine_config(nats_url, ns, [{"name": "s", "agent": "a", "fallbacks": ["b"]}])
    a_calls: list[str] = []
    b_calls: list[str] = []
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    async with agents(nats_url, ns, {"a": failing(a_calls), "b": failing(b_calls)}), engine(config):
        run = uuid.uuid4().hex
        await trigger(js, config, None, run)
        outcome = await result(js, config, run)
    await nc.close()
    assert outcome["status"] == "Failed"
    assert outcome["error"] == "step s failed: RuntimeError: primary is down"
    assert (len(a_calls), len(b_calls)) == (1, 1)


async def test_an_engine_killed_mid_fallback_resumes_with_the_fallback_dispatched_once(
    nats_url: str, tmp_path: Path
) -> None:
    ns = new_namespace()
    step = {"name": "s", "agent": "primary", "fallbacks": ["backup"]}
    config = engine_config(nats_url, ns, [step], healthPort=free_port())
    primary: list[str] = []
    backup: list[str] = []
    gate = asyncio.Event()
    handlers = {"primary": failing(primary), "backup": answering("backup", backup, gate)}
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    run = uuid.uuid4().hex
    await ensure_workflow_resources(js, build_workflow_resources(config))
    async with agents(nats_url, ns, handlers):
        with engine_process(config, tmp_path) as first:
            await eventually(partial(engine_answers, config, first), "the first engine")
            await trigger(js, config, None, run)

            async def handed_over() -> bool:
                return any(isinstance(e, StepFellBack) for e in await run_events(js, config, run))

            await eventually(handed_over, "the hand-over to the fallback")
            first.send_signal(signal.SIGKILL)
            first.wait()
        with engine_process(config, tmp_path) as second:
            await eventually(partial(engine_answers, config, second), "the restarted engine")
            gate.set()  # the backup answers only once the second engine owns the run
            outcome = await result(js, config, run)
        events = await run_events(js, config, run)
    await nc.close()
    assert outcome["status"] == "Succeeded"
    assert outcome["output"]["by"] == "backup"
    assert (primary, backup) == ([f"{run}/s/1"], [f"{run}/s/2"])
    assert Counter(e.agent for e in events if isinstance(e, StepDispatched)) == Counter(
        {"primary": 1, "backup": 1}
    )
    assert sum(isinstance(e, StepFellBack) for e in events) == 1


@pytest.mark.parametrize("published", [False, True], ids=["before-dispatch", "before-logging"])
async def test_an_engine_that_died_right_after_the_hand_over_dispatches_the_fallback_once(
    nats_url: str, published: bool
) -> None:
    """The log a crashed engine left: the hand-over to ``backup`` logged, and its dispatch
    either not yet published or published but not yet logged. The next engine dispatches
    to ``backup`` (never the primary again) and ``backup`` runs once."""
    ns = new_namespace()
    step = {"name": "s", "agent": "primary", "fallbacks": ["backup"]}
    config = engine_config(nats_url, ns, [step])
    primary: list[str] = []
    backup: list[str] = []
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_workflow_resources(js, build_workflow_resources(config))
    kv = await js.key_value(config.runs_bucket)
    crashed = Lease(nc, js, config)
    assert await crashed.acquire(lambda: False)
    log = RunLog(js, kv, config, crashed)
    run = uuid.uuid4().hex
    now = datetime.now(UTC)
    await log.mark_active(run)
    state = await log.append(None, RunStarted(run_id=run, at=now, input={"q": 1}))
    for event in (
        StepDispatched(run_id=run, at=now, step="s", attempt=1, input={"q": 1}, agent="primary"),
        StepFailed(run_id=run, at=now, step="s", attempt=1, error="down", agent="primary"),
        StepFellBack(
            run_id=run,
            at=now,
            step="s",
            attempt=1,
            fallback=1,
            from_agent="primary",
            to_agent="backup",
            error="down",
        ),
    ):
        state = await log.append(state, event)
    handlers = {"primary": failing(primary), "backup": answering("backup", backup)}
    async with agents(nats_url, ns, handlers):
        if published:  # as the crashed engine did: same id, same reply subject
            sent = dispatch_id(run, "s", 2)
            dispatch = CloudEvent(
                id=sent,
                source="/tests",
                type=STEP_EVENT_TYPE,
                correlationid=run,
                causationid=run,
                replyto=config.subject("replies", run),
                data={"q": 1},
            )
            headers, payload = envelope.to_binary(dispatch)
            await js.publish(
                naming.inbox_subject(ns, "backup", 0),
                payload,
                headers={**headers, "Nats-Msg-Id": sent},
            )
        await crashed.release()
        async with engine(config):
            outcome = await result(js, config, run)
            events = await run_events(js, config, run)
    await nc.close()
    assert outcome["output"] == {"by": "backup", "got": {"q": 1}}
    assert (primary, backup) == ([], [f"{run}/s/2"])
    assert [e.agent for e in events if isinstance(e, StepDispatched)] == ["primary", "backup"]
    assert sum(isinstance(e, StepFellBack) for e in events) == 1
