"""The workflow engine on a real nats-server: DAG runs across real agent runtimes."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any

import nats
import pytest

from tests.integration.runtime_harness import eventually
from tests.integration.workflow_harness import (
    agents,
    engine,
    engine_config,
    new_namespace,
    result,
    run_events,
    trigger,
)
from troupe_runtime.agent.context import Context, HandlerFn
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.envelope import CloudEvent


def appender(name: str) -> HandlerFn:
    async def handle(ctx: Context) -> Any:
        return [*(ctx.event.data or []), name]

    return handle


def run_id() -> str:
    return uuid.uuid4().hex


async def test_a_linear_workflow_passes_each_output_to_the_next_step(nats_url: str) -> None:
    ns = new_namespace()
    config = engine_config(
        nats_url,
        ns,
        [{"name": "a"}, {"name": "b", "dependsOn": ["a"]}, {"name": "c", "dependsOn": ["b"]}],
    )
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    async with agents(nats_url, ns, {n: appender(n) for n in "abc"}), engine(config):
        run = run_id()
        await trigger(js, config, ["start"], run)
        outcome = await result(js, config, run)
        kinds = [(e.kind, getattr(e, "step", None)) for e in await run_events(js, config, run)]
    await nc.close()
    assert outcome == {"status": "Succeeded", "output": ["start", "a", "b", "c"], "error": None}
    assert kinds == [
        ("RunStarted", None),
        ("StepDispatched", "a"),
        ("StepSucceeded", "a"),
        ("StepDispatched", "b"),
        ("StepSucceeded", "b"),
        ("StepDispatched", "c"),
        ("StepSucceeded", "c"),
        ("RunFinished", None),
    ]


async def test_a_diamond_fans_out_and_joins_both_branches(nats_url: str) -> None:
    ns = new_namespace()
    steps: list[dict[str, Any]] = [
        {"name": "a"},
        {"name": "b", "dependsOn": ["a"]},
        {"name": "c", "dependsOn": ["a"]},
        {
            "name": "d",
            "dependsOn": ["b", "c"],
            "input": {"left": "steps.b.output", "right": "steps.c.output"},
        },
    ]
    config = engine_config(nats_url, ns, steps)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()

    async def join(ctx: Context) -> Any:
        return sorted([*ctx.event.data["left"], *ctx.event.data["right"]])

    handlers = {"a": appender("a"), "b": appender("b"), "c": appender("c"), "d": join}
    async with agents(nats_url, ns, handlers), engine(config):
        run = run_id()
        await trigger(js, config, [], run)
        outcome = await result(js, config, run)
    await nc.close()
    assert outcome["status"] == "Succeeded"
    assert outcome["output"] == ["a", "a", "b", "c"]


async def test_a_step_that_fails_once_succeeds_on_the_engine_retry(nats_url: str) -> None:
    ns = new_namespace()
    step = {"name": "flaky", "retry": {"maxAttempts": 2, "backoff": ["100ms"]}}
    config = engine_config(nats_url, ns, [step])
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    calls: list[str] = []

    async def flaky(ctx: Context) -> Any:
        calls.append(ctx.event.id)
        if len(calls) == 1:
            raise RuntimeError("first call fails")
        return "ok"

    async with agents(nats_url, ns, {"flaky": flaky}), engine(config):
        run = run_id()
        await trigger(js, config, None, run)
        outcome = await result(js, config, run)
    await nc.close()
    assert outcome["status"] == "Succeeded"
    assert calls == [f"{run}/flaky/1", f"{run}/flaky/2"]


async def test_a_step_that_times_out_fails_the_run(nats_url: str) -> None:
    ns = new_namespace()
    config = engine_config(nats_url, ns, [{"name": "slow", "timeout": "300ms"}])
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    release = asyncio.Event()

    async def slow(ctx: Context) -> Any:
        await release.wait()
        return "late"

    async with agents(nats_url, ns, {"slow": slow}, timeout="30s"), engine(config):
        run = run_id()
        await trigger(js, config, None, run)
        outcome = await result(js, config, run)
        release.set()
    await nc.close()
    assert outcome["status"] == "Failed"
    # The engine's own timeout, or the agent giving up at the attempt's deadline: both
    # end the attempt when the step's timeout passes.
    assert outcome["error"].startswith("step slow failed: ")


async def test_an_expired_deadline_fails_the_run_and_dead_letters_it(nats_url: str) -> None:
    ns = new_namespace()
    config = engine_config(nats_url, ns, [{"name": "slow"}], deadline="500ms")
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    release = asyncio.Event()

    async def slow(ctx: Context) -> Any:
        await release.wait()

    async with agents(nats_url, ns, {"slow": slow}, timeout="30s"), engine(config):
        run = run_id()
        await trigger(js, config, None, run)
        outcome = await result(js, config, run)
        release.set()
        dead = await js.get_last_msg(config.dead_letter_stream, config.subject("failed", run))
    await nc.close()
    assert outcome["status"] == "Failed"
    assert outcome["error"] == "deadline of 0:00:00.500000 exceeded"
    assert dead.headers is not None
    assert dead.headers["Troupe-Error"] == "deadline of 0:00:00.500000 exceeded"


async def test_compensation_undoes_completed_steps_in_reverse_order(nats_url: str) -> None:
    ns = new_namespace()
    steps: list[dict[str, Any]] = [
        {"name": "book-flight", "compensation": {"agent": "cancel-flight"}},
        {
            "name": "book-hotel",
            "dependsOn": ["book-flight"],
            "compensation": {"agent": "cancel-hotel"},
        },
        {"name": "charge", "dependsOn": ["book-hotel"], "onFailure": "compensate"},
    ]
    config = engine_config(nats_url, ns, steps)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    undone: list[str] = []

    def canceller(name: str) -> HandlerFn:
        async def handle(ctx: Context) -> Any:
            undone.append(name)
            return None

        return handle

    async def charge(ctx: Context) -> Any:
        raise RuntimeError("card declined")

    handlers = {
        "book-flight": appender("flight"),
        "book-hotel": appender("hotel"),
        "charge": charge,
        "cancel-flight": canceller("flight"),
        "cancel-hotel": canceller("hotel"),
    }
    async with agents(nats_url, ns, handlers), engine(config):
        run = run_id()
        await trigger(js, config, [], run)
        outcome = await result(js, config, run)
    await nc.close()
    assert outcome["status"] == "Failed"
    assert "card declined" in outcome["error"]
    assert undone == ["hotel", "flight"]


async def test_a_duplicate_trigger_does_not_start_a_second_run(nats_url: str) -> None:
    ns = new_namespace()
    config = engine_config(nats_url, ns, [{"name": "count"}])
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    seen: list[str] = []

    async def count(ctx: Context) -> Any:
        seen.append(ctx.event.id)

    async with agents(nats_url, ns, {"count": count}), engine(config):
        run = run_id()
        await trigger(js, config, None, run)
        await result(js, config, run)
        await trigger(js, config, None, run)
        second = run_id()
        await trigger(js, config, None, second)
        await result(js, config, second)
    await nc.close()
    assert seen == [f"{run}/count/1", f"{second}/count/1"]


async def test_a_hundred_concurrent_runs_all_complete(nats_url: str) -> None:
    ns = new_namespace()
    config = engine_config(
        nats_url, ns, [{"name": "a"}, {"name": "b", "dependsOn": ["a"]}], maxConcurrentRuns=40
    )
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    async with agents(nats_url, ns, {n: appender(n) for n in "ab"}), engine(config):
        runs = [run_id() for _ in range(100)]
        await asyncio.gather(*(trigger(js, config, [i], r) for i, r in enumerate(runs)))
        outcomes = await asyncio.gather(*(result(js, config, r) for r in runs))
    await nc.close()
    assert Counter(o["status"] for o in outcomes) == {"Succeeded": 100}
    assert [o["output"] for o in outcomes] == [[i, "a", "b"] for i in range(100)]


@pytest.mark.parametrize("bad", [b"{not json", b'{"no": "cloudevent"}'])
async def test_a_malformed_trigger_is_dead_lettered_and_the_engine_stays_up(
    nats_url: str, bad: bytes
) -> None:
    ns = new_namespace()
    config = engine_config(nats_url, ns, [{"name": "a"}])
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    async with agents(nats_url, ns, {"a": appender("a")}), engine(config) as service:
        await js.publish(config.trigger_subject, bad)

        async def dead_lettered() -> bool:
            info = await js.stream_info(config.dead_letter_stream)
            return info.state.messages == 1

        await eventually(dead_lettered, "the malformed trigger in the dead-letter stream")
        run = run_id()
        await trigger(js, config, [], run)
        assert (await result(js, config, run))["status"] == "Succeeded"
        assert service.ready()
    await nc.close()


async def test_a_run_starts_from_the_workflows_own_start_subject(nats_url: str) -> None:
    ns = new_namespace()
    config = engine_config(nats_url, ns, [{"name": "a"}])
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    async with agents(nats_url, ns, {"a": appender("a")}), engine(config):
        run = run_id()
        event = CloudEvent(id=run, source="/cli", type="troupe.run", data=["cli"])
        headers, payload = envelope.to_binary(event)
        await js.publish(config.subject("start", run), payload, headers=headers)
        outcome = await result(js, config, run)
    await nc.close()
    assert outcome["output"] == ["cli", "a"]


async def test_a_runs_priority_reaches_the_agents_matching_inbox(nats_url: str) -> None:
    ns = new_namespace()
    config = engine_config(nats_url, ns, [{"name": "urgent", "priorityLevels": 3}])
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    seen: list[int | None] = []

    async def record(ctx: Context) -> Any:
        seen.append(ctx.event.priority)

    async with (
        agents(nats_url, ns, {"urgent": record}, messaging={"priorityLevels": 3}),
        engine(config),
    ):
        run = run_id()
        event = CloudEvent(id=run, source="/tests", type="test.start", priority=2, data={})
        headers, payload = envelope.to_binary(event)
        await js.publish(config.trigger_subject, payload, headers=headers)
        await result(js, config, run)
        inbox = naming.inbox_stream(ns, "urgent")
        on_top = await js.consumer_info(inbox, naming.consumer_name("urgent", 2))
    await nc.close()
    assert seen == [2]
    assert on_top.delivered.consumer_seq == 1
