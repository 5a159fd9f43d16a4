"""Cancelling a run on a real nats-server with the real engine: it ends Cancelled, nothing
more is dispatched, its result says so, and a bad or late cancel changes nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import nats
from nats.js import JetStreamContext

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
from troupe_cli.main import amain
from troupe_devcluster.layout import free_port
from troupe_runtime.contract import envelope
from troupe_runtime.contract.engine_config import EngineConfig
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.run_events import CANCEL_TYPE
from troupe_runtime.contract.workflow_resources import build_workflow_resources
from troupe_runtime.nats.provision import ensure_workflow_resources

LINEAR: list[dict[str, Any]] = [{"name": "a"}, {"name": "b", "dependsOn": ["a"]}]


async def cancel(js: JetStreamContext, config: EngineConfig, run: str, data: Any) -> None:
    event = CloudEvent(id=uuid.uuid4().hex, source="/tests", type=CANCEL_TYPE, data=data)
    headers, payload = envelope.to_binary(event)
    await js.publish(config.subject("cancel", run), payload, headers=headers)


async def test_a_cancelled_run_ends_cancelled_and_dispatches_nothing_more(nats_url: str) -> None:
    ns = new_namespace()
    config = engine_config(nats_url, ns, LINEAR)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    started, gate = asyncio.Event(), asyncio.Event()

    async def blocked(ctx: Any) -> Any:
        started.set()
        await gate.wait()
        return "a"

    async def never(ctx: Any) -> Any:
        raise AssertionError("step b was dispatched")

    async with agents(nats_url, ns, {"a": blocked, "b": never}), engine(config):
        run = uuid.uuid4().hex
        await trigger(js, config, None, run)
        await asyncio.wait_for(started.wait(), 30)
        await cancel(js, config, run, {"reason": "replaced\nby a newer run"})
        await cancel(js, config, run, {"reason": "again"})
        outcome = await result(js, config, run)
        gate.set()
        msg = await js.get_last_msg(config.stream, config.subject("results", run))
        assert msg.headers is not None
        kind = envelope.parse(msg.headers, msg.data or b"").type

        async def replied() -> bool:
            info = await js.consumer_info(config.stream, "engine_replies")
            return bool(
                info.num_pending == 0
                and info.num_ack_pending == 0
                and (info.delivered.stream_seq or 0) > 0
            )

        await eventually(replied, "the late reply of step a to be handled")
        kinds = [e.kind for e in await run_events(js, config, run)]
    await nc.close()
    assert outcome == {
        "status": "Cancelled",
        "output": {"steps": {}},
        "error": "replaced by a newer run",
    }
    assert kind == "troupe.workflow.cancelled"
    assert kinds == ["RunStarted", "StepDispatched", "CancelRequested", "RunFinished"]


async def test_a_cancel_of_a_finished_or_unknown_run_or_a_malformed_one_is_dropped(
    nats_url: str,
) -> None:
    ns = new_namespace()
    config = engine_config(nats_url, ns, [{"name": "a"}])
    nc = await nats.connect(nats_url)
    js = nc.jetstream()

    async def done(ctx: Any) -> Any:
        return "done"

    async with agents(nats_url, ns, {"a": done}), engine(config):
        run = uuid.uuid4().hex
        await trigger(js, config, None, run)
        assert (await result(js, config, run))["status"] == "Succeeded"
        await cancel(js, config, run, {"reason": "too late"})
        await cancel(js, config, "never-started", None)
        await js.publish(config.subject("cancel", run), b"\xff not json")
        await cancel(js, config, run, {"reason": ["not", "a", "string"]})

        async def drained() -> bool:
            info = await js.consumer_info(config.stream, "engine_replies")
            return bool(info.num_pending == 0 and info.num_ack_pending == 0)

        await eventually(drained, "every cancel to be acked")
        kinds = [e.kind for e in await run_events(js, config, run)]
        assert (await result(js, config, run))["status"] == "Succeeded"
    await nc.close()
    assert kinds[-1] == "RunFinished"
    assert "CancelRequested" not in kinds


async def test_troupe_runs_cancel_cancels_a_running_run(nats_url: str) -> None:
    ns = new_namespace()
    config = engine_config(nats_url, ns, [{"name": "a"}])
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    started, gate = asyncio.Event(), asyncio.Event()

    async def blocked(ctx: Any) -> Any:
        started.set()
        await gate.wait()
        return "a"

    async with agents(nats_url, ns, {"a": blocked}), engine(config):
        run = uuid.uuid4().hex
        await trigger(js, config, None, run)
        await asyncio.wait_for(started.wait(), 30)
        argv = ["--nats-url", nats_url, "-n", ns, "runs", "cancel", "wf", run, "--reason", "no"]
        assert await amain(argv) == 0
        outcome = await result(js, config, run)
        gate.set()
    await nc.close()
    assert (outcome["status"], outcome["error"]) == ("Cancelled", "no")


async def test_a_cancel_stored_while_the_engine_is_dead_still_ends_the_run_cancelled(
    nats_url: str, tmp_path: Path
) -> None:
    ns = new_namespace()
    config = engine_config(nats_url, ns, LINEAR, healthPort=free_port())
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    gate = asyncio.Event()

    async def blocked(ctx: Any) -> Any:
        await gate.wait()
        return "a"

    async def never(ctx: Any) -> Any:
        raise AssertionError("step b was dispatched")

    await ensure_workflow_resources(js, build_workflow_resources(config))
    async with agents(nats_url, ns, {"a": blocked, "b": never}):
        run = uuid.uuid4().hex
        with engine_process(config, tmp_path) as first:
            await eventually(partial(engine_answers, config, first), "the first engine")
            await trigger(js, config, None, run)

            async def a_dispatched() -> bool:
                return any(e.kind == "StepDispatched" for e in await run_events(js, config, run))

            await eventually(a_dispatched, "step a to be dispatched")
            first.send_signal(signal.SIGKILL)
            first.wait()
        await cancel(js, config, run, {"reason": "while down"})
        gate.set()  # a's reply waits in the stream behind the cancel
        with engine_process(config, tmp_path) as second:
            await eventually(partial(engine_answers, config, second), "the restarted engine")
            outcome = await result(js, config, run)
        kinds = [e.kind for e in await run_events(js, config, run)]
    await nc.close()
    assert (outcome["status"], outcome["error"]) == ("Cancelled", "while down")
    assert "CancelRequested" in kinds
    assert kinds[-1] == "RunFinished"
    assert sum(kind == "StepDispatched" for kind in kinds) == 1


async def test_an_upgrade_adds_the_cancel_subject_to_an_existing_workflow(nats_url: str) -> None:
    """A Workflow provisioned before cancels: the stream and the replies consumer converge."""
    config = engine_config(nats_url, new_namespace(), [{"name": "a"}])
    resources = build_workflow_resources(config)
    old_stream = dataclasses.replace(
        resources.stream,
        subjects=[s for s in resources.stream.subjects or [] if s != config.subject("cancel")],
    )
    old_consumers = [
        dataclasses.replace(c, filter_subjects=[config.subject("replies")])
        if c.durable_name == "engine_replies"
        else c
        for c in resources.consumers
    ]
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_workflow_resources(
        js, dataclasses.replace(resources, stream=old_stream, consumers=old_consumers)
    )
    report = await ensure_workflow_resources(js, resources)
    again = await ensure_workflow_resources(js, resources)
    stream = await js.stream_info(config.stream)
    replies = await js.consumer_info(config.stream, "engine_replies")
    await nc.close()
    assert f"stream/{config.stream}" in report.updated
    assert f"consumer/{config.stream}/engine_replies" in report.updated
    assert not again.changed
    assert config.subject("cancel") in (stream.config.subjects or [])
    assert config.subject("cancel") in (replies.config.filter_subjects or [])
