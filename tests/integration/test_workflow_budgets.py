"""A run stopped by a Budget, on a real nats-server: the step whose model call a hard
limit refused is not retried, the run ends ``BudgetExceeded`` with the finished steps'
outputs, and every step event names its workflow (``troupeworkflow``).

The refused step is answered by ``refusing``: an agent that takes its inbox's messages
and answers each with the runtime's own failure reply (``outputs.send_reply``) carrying
``{"error", "reason": "budget-exceeded"}``, what an LLM agent sends when its budget
refuses a call. The other steps are real agent runtimes. The last test is the whole path
on the real LLM runtime and the scripted model: a Workflow's Run budget refuses a step's
model call, and the run ends as above."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import nats
import pytest
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from tests.integration.llm_harness import llm_config
from tests.integration.runtime_harness import eventually, provisioned
from tests.integration.test_llm_budgets import define, running_agent
from tests.integration.workflow_harness import (
    agent_config,
    agents,
    engine,
    engine_config,
    new_namespace,
    result,
    run_events,
    trigger,
)
from troupe_cli.main import amain
from troupe_devcluster.scripted_llm import ScriptedLlm, Text
from troupe_runtime.agent.context import Context, HandlerFn
from troupe_runtime.agent.outputs import send_reply
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.agent_resources import build_agent_resources
from troupe_runtime.contract.budget import BudgetDefinition, Ledger
from troupe_runtime.contract.dead_letters import ERROR_HEADER, REASON_HEADER
from troupe_runtime.contract.engine_config import EngineConfig
from troupe_runtime.contract.envelope import ERROR_TYPE, WORKFLOW_ATTRIBUTE, CloudEvent
from troupe_runtime.contract.run_state import RunState
from troupe_runtime.nats.provision import ensure_agent_resources
from troupe_runtime.nats.pull import Puller

REFUSAL = (
    "budget 'team': tokens spent 990 + held 0 + this call's 300 would pass the hard limit 1000"
)


def recording(name: str, seen: list[CloudEvent]) -> HandlerFn:
    """A real agent that appends its name to the input list, keeping what it was sent."""

    async def handle(ctx: Context) -> Any:
        seen.append(ctx.event)
        return [*(ctx.event.data or []), name]

    return handle


@asynccontextmanager
async def refusing(nats_url: str, namespace: str, agent: str) -> AsyncIterator[list[CloudEvent]]:
    """An agent whose every model call its budget refuses: each step event it takes is
    answered as a budget-exceeded failure. Yields the events it was sent."""
    config = agent_config(nats_url, namespace, agent)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_agent_resources(js, build_agent_resources(config))
    puller = Puller(nc, naming.inbox_stream(namespace, agent), naming.consumer_name(agent, 0))
    await puller.start()
    seen: list[CloudEvent] = []

    async def serve() -> None:
        while True:
            for msg in await puller.pull(16, 1.0):
                event = envelope.parse(msg.headers, msg.data)
                seen.append(event)
                data = {"error": REFUSAL, "reason": "budget-exceeded"}
                await send_reply(js, config, event, ERROR_TYPE, data)
                await msg.ack()

    task = asyncio.create_task(serve())
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await puller.stop()
        await nc.close()


async def finished_log(js: JetStreamContext, config: EngineConfig, run: str) -> list[Any]:
    """The run's log once it holds RunFinished: the engine publishes the result first."""
    found: list[Any] = []

    async def logged() -> bool:
        found[:] = await run_events(js, config, run)
        return bool(found) and found[-1].kind == "RunFinished"

    await eventually(logged, f"RunFinished in the log of run {run}")
    return found


async def projected(js: JetStreamContext, config: EngineConfig, run: str) -> RunState:
    """The run's projection once it is finished (written just after the log's append)."""
    kv = await js.key_value(config.runs_bucket)
    found: list[RunState] = []

    async def finished() -> bool:
        try:
            entry = await kv.get(run)
        except NotFoundError:
            return False
        found[:] = [RunState.model_validate_json(entry.value or b"")]
        return found[0].terminal

    await eventually(finished, f"the finished projection of run {run}")
    return found[0]


async def last_message(js: JetStreamContext, stream: str, subject: str) -> Any:
    found: list[Any] = []

    async def stored() -> bool:
        try:
            found.append(await js.get_last_msg(stream, subject))
        except NotFoundError:
            return False
        return True

    await eventually(stored, f"a dead letter on {subject}")
    return found[0]


async def test_a_refused_step_ends_the_run_budget_exceeded_with_what_finished(
    nats_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = new_namespace()
    retry = {"maxAttempts": 3, "backoff": ["10ms"]}
    steps: list[dict[str, Any]] = [
        {"name": "a"},
        {"name": "b", "dependsOn": ["a"], "retry": retry},
        {"name": "c", "dependsOn": ["b"]},
    ]
    config = engine_config(nats_url, ns, steps)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    seen_a: list[CloudEvent] = []
    seen_c: list[CloudEvent] = []
    handlers = {"a": recording("a", seen_a), "c": recording("c", seen_c)}
    async with (
        agents(nats_url, ns, handlers),
        refusing(nats_url, ns, "b") as seen_b,
        engine(config),
    ):
        run = uuid.uuid4().hex
        await trigger(js, config, ["start"], run)
        outcome = await result(js, config, run)
        events = await finished_log(js, config, run)
        letter = await last_message(js, config.dead_letter_stream, config.subject("failed", run))
        state = await projected(js, config, run)
        tally = await last_message(js, config.stream, config.tally_subject("BudgetExceeded"))
        results = await js.get_last_msg(config.stream, config.subject("results", run))
        cli = ["--nats-url", nats_url, "-n", ns, "runs"]
        shown = await amain([*cli, "show", "wf", run, "-o", "json"]), capsys.readouterr().out
        listed = await amain([*cli, "list", "wf"]), capsys.readouterr().out
    await nc.close()

    assert outcome == {
        "status": "BudgetExceeded",
        "output": {"steps": {"a": ["start", "a"]}},
        "error": f"step b exceeded a budget: {REFUSAL}",
    }
    # Not retried, though it had two attempts left; the step after it never ran.
    assert [(e.kind, getattr(e, "step", None)) for e in events] == [
        ("RunStarted", None),
        ("StepDispatched", "a"),
        ("StepSucceeded", "a"),
        ("StepDispatched", "b"),
        ("StepFailed", "b"),
        ("RunFinished", None),
    ]
    assert [e.id for e in seen_b] == [f"{run}/b/1"]
    assert seen_c == []
    # Each step event names the workflow, so its Budget counts the agents' calls.
    assert [(e.model_extra or {}).get(WORKFLOW_ATTRIBUTE) for e in [*seen_a, *seen_b]] == [
        "wf",
        "wf",
    ]
    assert results.headers is not None
    assert results.headers["ce-type"] == "troupe.workflow.budgetexceeded"
    assert letter.headers[REASON_HEADER] == "budget-exceeded"
    assert letter.headers[ERROR_HEADER] == f"step b exceeded a budget: {REFUSAL}"
    assert state.status == "BudgetExceeded"
    assert state.steps["b"].reason == "budget-exceeded"
    assert json.loads(tally.data or b"{}") == {"run": run}
    # troupe runs show and list say so.
    assert shown[0] == 0
    document = json.loads(shown[1])
    assert (document["status"], document["output"]) == ("BudgetExceeded", outcome["output"])
    assert [(s["step"], s["status"]) for s in document["steps"]] == [
        ("a", "Succeeded"),
        ("b", "BudgetExceeded"),
    ]
    assert listed[0] == 0
    assert "BudgetExceeded" in listed[1]


async def test_compensations_run_then_the_run_ends_budget_exceeded(nats_url: str) -> None:
    ns = new_namespace()
    steps: list[dict[str, Any]] = [
        {"name": "book", "compensation": {"agent": "cancel"}},
        {"name": "charge", "dependsOn": ["book"], "onFailure": "compensate"},
    ]
    config = engine_config(nats_url, ns, steps)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    booked: list[CloudEvent] = []
    cancelled: list[CloudEvent] = []
    handlers = {"book": recording("book", booked), "cancel": recording("cancel", cancelled)}
    async with agents(nats_url, ns, handlers), refusing(nats_url, ns, "charge"), engine(config):
        run = uuid.uuid4().hex
        await trigger(js, config, [], run)
        outcome = await result(js, config, run)
        kinds = [e.kind for e in await finished_log(js, config, run)]
    await nc.close()
    assert outcome["status"] == "BudgetExceeded"
    assert outcome["output"] == {"steps": {"book": ["book"]}}
    assert kinds[-3:] == ["CompensationDispatched", "CompensationFinished", "RunFinished"]
    assert [e.id for e in cancelled] == [f"{run}/book/compensate"]
    # A compensation event names the workflow too.
    assert (cancelled[0].model_extra or {}).get(WORKFLOW_ATTRIBUTE) == "wf"


async def test_a_workflows_run_budget_stops_a_real_llm_step_and_keeps_the_first_ones_answer(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    """End to end on the real LLM runtime: the Workflow's Run-window budget applies only
    because the engine's step events say ``troupeworkflow: wf``. Step ``a`` (75 output
    tokens held) fits and spends 120; step ``b`` holds 500 for its answer, past the 300 the
    run has: refused before any model call, dead-lettered by the agent, and the run ends
    BudgetExceeded with ``a``'s answer, ``b`` never retried."""
    base = llm_config(nats_url, scripted_llm.base_url, maxTokens=75)
    ns = base.namespace
    assert base.llm is not None
    first = base.model_copy(update={"agent": "a"})
    wide = base.llm.policy.model_copy(update={"max_tokens": 500})
    second = base.model_copy(
        update={"agent": "b", "llm": base.llm.model_copy(update={"policy": wide})}
    )
    retry = {"maxAttempts": 3, "backoff": ["10ms"]}
    config = engine_config(
        nats_url, ns, [{"name": "a"}, {"name": "b", "dependsOn": ["a"], "retry": retry}]
    )
    scripted_llm.script(Text("Bees dance.", usage=(100, 20)))
    per_run = BudgetDefinition.model_validate(
        {
            "name": "per-run",
            "generation": 1,
            "scope": "Workflow",
            "workflow": "wf",
            "window": {"type": "Run"},
            "limits": {"tokens": {"hard": 300}},
        }
    )
    async with provisioned(first) as (_, js), provisioned(second):
        await define(js, ns, per_run)
        async with running_agent(first), running_agent(second), engine(config):
            run = uuid.uuid4().hex
            await trigger(js, config, {"q": "bees"}, run)
            outcome = await result(js, config, run)
            events = await finished_log(js, config, run)
            kv = await js.key_value(naming.budget_bucket(ns))
            key = naming.budget_ledger_key("per-run", naming.run_window_token(run))
            found: list[Ledger] = []

            async def settled() -> bool:  # a's commit is written after its call returns
                entry = await kv.get(key)
                found[:] = [Ledger.model_validate_json(entry.value or b"")]
                return not found[0].holds

            await eventually(settled, "the per-run ledger to hold nothing")
    [spent] = found
    assert outcome["status"] == "BudgetExceeded"
    assert list(outcome["output"]["steps"]) == ["a"]
    assert outcome["output"]["steps"]["a"]["content"] == "Bees dance."
    assert "budget 'per-run'" in outcome["error"]
    assert len(scripted_llm.completions) == 1  # b's call was never made
    assert [e.kind for e in events].count("StepDispatched") == 2  # a once, b once
    assert (spent.spent.tokens, spent.refusals, spent.holds) == (120, 1, {})
