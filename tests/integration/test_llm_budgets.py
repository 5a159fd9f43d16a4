"""Budgets and token rate limits on the real LLM runtime: real nats-server, the real guard
and its KV ledgers, the scripted model (exact token counts). A hard limit dead-letters the
message as budget-exceeded without calling the model; answer mode answers with what the
loop has; a committed call is counted exactly; a Workflow's budget counts the calls of an
agent called as a tool, which gets the workflow attribute; the Agent's own tokens per
minute, per replica and shared; the provider's rpm token given back when tpm throttles."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import nats
import pytest
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg, StreamConfig
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry

from tests.integration.llm_harness import (
    PRICING,
    CallableTools,
    llm_config,
    tool,
    toolbox_of,
)
from tests.integration.runtime_harness import (
    eventually,
    inbox_empty,
    output_stream,
    provisioned,
    send,
    stored,
    stream_count,
)
from tests.unit.llm_client_support import provider, runtime
from troupe_devcluster.scripted_llm import ScriptedLlm, ScriptedToolCall, Text, ToolCalls
from troupe_runtime.agent.handlers import LoadedHandler
from troupe_runtime.agent.llm.handler import NamespaceBudgets, ToolBoxFactory, llm_agent
from troupe_runtime.agent.llm.journal import DEFERRED
from troupe_runtime.agent.llm.router import DEFAULT_BUDGET_MAX_TOKENS, ModelRouter
from troupe_runtime.agent.llm.tokens import estimate_tokens
from troupe_runtime.agent.llm.tools import toolbox_factory
from troupe_runtime.agent.llm.types import ChatRequest, RateLimited
from troupe_runtime.agent.runtime import Runtime
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.budget import BudgetDefinition, Ledger
from troupe_runtime.contract.dead_letters import ATTEMPTS_HEADER, REASON_HEADER
from troupe_runtime.contract.envelope import ERROR_TYPE, WORKFLOW_ATTRIBUTE, CloudEvent
from troupe_runtime.contract.llm import ResolvedTool
from troupe_runtime.contract.model_provider import Pricing
from troupe_runtime.nats.event_log import EventLog
from troupe_runtime.nats.provision import budget_bucket_config
from troupe_runtime.serving.metrics import BudgetMetrics, LlmMetrics

PRICE = Pricing.model_validate(PRICING)
WORKFLOW = "research"
MAX_TOKENS = 75


def run_budget(
    name: str, hard: int, limits: dict[str, Any] | None = None, **scope: Any
) -> BudgetDefinition:
    """A budget of ``hard`` tokens per run (or of ``limits``); the namespace's unless
    ``scope`` says otherwise."""
    return BudgetDefinition.model_validate(
        {
            "name": name,
            "generation": 1,
            "scope": "Namespace",
            "window": {"type": "Run"},
            "limits": limits or {"tokens": {"hard": hard}},
            **scope,
        }
    )


async def define(js: JetStreamContext, namespace: str, *definitions: BudgetDefinition) -> None:
    """Write definitions as the operator does (the bucket with the operator's config)."""
    kv = await js.create_key_value(budget_bucket_config(namespace))
    for definition in definitions:
        value = definition.model_dump_json(by_alias=True, exclude_none=True).encode()
        await kv.put(naming.budget_definition_key(definition.name), value)


async def ledger(js: JetStreamContext, namespace: str, budget: str, run: str) -> Ledger:
    kv = await js.key_value(naming.budget_bucket(namespace))
    entry = await kv.get(naming.budget_ledger_key(budget, naming.run_window_token(run)))
    return Ledger.model_validate_json(entry.value or b"")


async def settled(js: JetStreamContext, namespace: str, budget: str, run: str) -> Ledger:
    """The ledger once it holds nothing: a commit is written after the call returns (the
    next hold carries it, or it goes alone a moment later)."""
    found: list[Ledger] = []

    async def no_holds() -> bool:
        found[:] = [await ledger(js, namespace, budget, run)]
        return not found[0].holds

    await eventually(no_holds, f"budget {budget}'s ledger to hold nothing")
    return found[0]


@asynccontextmanager
async def running_agent(
    config: RuntimeConfig, toolboxes: ToolBoxFactory | None = None
) -> AsyncIterator[tuple[Runtime, BudgetMetrics]]:
    """The LLM agent with the namespace's budgets, as ``load_handler`` builds it."""
    registry = CollectorRegistry()
    metrics = BudgetMetrics(registry)
    agent = llm_agent(
        config,
        LlmMetrics(registry),
        os.environ,
        toolboxes=toolboxes or toolbox_of(CallableTools()),
        budgets=NamespaceBudgets(config.namespace, metrics),
    )
    handler = LoadedHandler(agent, agent.close, agent.bind)
    runtime = Runtime(config, handler=handler, host="127.0.0.1", port=0, grace=2.0)
    task = asyncio.create_task(runtime.run())

    async def ready() -> bool:
        if task.done():
            task.result()
        return runtime.ready()

    await eventually(ready, "the runtime to become ready")
    try:
        yield runtime, metrics
    finally:
        runtime.stop()
        await asyncio.wait_for(task, 30)


async def replies_stream(js: JetStreamContext, namespace: str) -> str:
    """A stream storing the namespace's workflow replies, as an engine's would."""
    name = f"REPLIES_{namespace}"
    await js.add_stream(
        StreamConfig(name=name, subjects=[naming.workflow_replies_wildcard(namespace)])
    )
    return name


def parsed(msg: RawStreamMsg) -> CloudEvent:
    return envelope.parse(msg.headers, msg.data or b"")


def sample(metrics: BudgetMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize(
    ("limits", "refusal"),
    [
        # The first call alone holds its prompt plus 1024 tokens for its answer...
        ({"tokens": {"hard": 1000}}, "tokens spent 0 + held 0 + this call's"),
        # ...which at $10 a million output tokens is past a cent.
        ({"costUsd": {"hard": 0.01}}, "costUsd spent 0 + held 0 + this call's"),
    ],
    ids=["tokens", "cost"],
)
async def test_a_hard_limit_dead_letters_the_message_without_calling_the_model(
    nats_url: str, scripted_llm: ScriptedLlm, limits: dict[str, Any], refusal: str
) -> None:
    config = llm_config(nats_url, scripted_llm.base_url)
    namespace, run = config.namespace, f"run-{uuid.uuid4().hex[:8]}"
    scripted_llm.script(Text("never asked"))
    async with provisioned(config) as (_, js):
        await define(js, namespace, run_budget("team", 0, limits=limits))
        replies = await replies_stream(js, namespace)
        replyto = naming.workflow_subject(namespace, WORKFLOW, "replies", run)
        async with running_agent(config) as (_, metrics):
            await send(
                js,
                config,
                {"q": "everything"},
                correlationid=run,
                replyto=replyto,
                troupeworkflow=WORKFLOW,
            )
            await eventually(lambda: stream_count(js, config.dead_letter_stream), "a dead letter")
            await eventually(lambda: inbox_empty(js, config), "the input to be acknowledged")
            await eventually(lambda: stream_count(js, replies), "the failure reply")
            [letter] = await stored(js, config.dead_letter_stream)
            [reply] = await stored(js, replies)
            spent = await ledger(js, namespace, "team", run)
            refused = sample(metrics, "troupe_budget_holds_total", budget="team", outcome="refused")
    assert scripted_llm.completions == []
    headers = letter.headers or {}
    assert headers[REASON_HEADER] == "budget-exceeded"
    assert headers[ATTEMPTS_HEADER] == "1"  # not retried
    failure = parsed(reply)
    assert failure.type == ERROR_TYPE
    assert failure.data["reason"] == "budget-exceeded"
    assert "'team'" in failure.data["error"]
    assert refusal in failure.data["error"]
    assert (failure.model_extra or {})[WORKFLOW_ATTRIBUTE] == WORKFLOW
    assert (spent.refusals, spent.spent.tokens, spent.holds) == (1, 0, {})
    assert refused == 1


async def test_a_call_within_the_limit_is_charged_exactly_what_it_used(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    config = llm_config(nats_url, scripted_llm.base_url)
    namespace, run = config.namespace, f"run-{uuid.uuid4().hex[:8]}"
    scripted_llm.script(Text("Bees dance.", usage=(100, 20)))
    async with provisioned(config) as (_, js):
        await define(js, namespace, run_budget("team", 5000))
        async with running_agent(config) as (_, metrics):
            await send(js, config, {"q": "bees"}, correlationid=run)
            await eventually(lambda: stream_count(js, output_stream(config)), "the output")
            spent = await settled(js, namespace, "team", run)
            await eventually(
                lambda: sample(metrics, "troupe_budget_spent_tokens_total", budget="team"),
                "the commit counted",
            )
            counted = sample(metrics, "troupe_budget_spent_tokens_total", budget="team")
    [request] = scripted_llm.completions
    assert request.body["max_tokens"] == DEFAULT_BUDGET_MAX_TOKENS
    assert spent.spent.tokens == 120
    assert spent.spent.cost_usd == pytest.approx(PRICE.cost(100, 20))
    assert spent.holds == {}
    assert counted == 120


async def test_answer_mode_answers_with_what_it_has_when_the_budget_runs_out(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    # 500 output tokens a call and 600 a run: the first call fits, its 120 tokens leave no
    # room for the second's hold.
    config = llm_config(nats_url, scripted_llm.base_url, maxTokens=500, onBudgetExceeded="answer")
    namespace, run = config.namespace, f"run-{uuid.uuid4().hex[:8]}"

    async def lookup(arguments: dict[str, Any]) -> str:
        return "three sources"

    tools = CallableTools(tool("lookup", lookup))
    scripted_llm.script(
        ToolCalls(
            [ScriptedToolCall("lookup", "{}", "c1")], content="Looking it up.", usage=(100, 20)
        ),
        Text("never asked"),
    )
    async with provisioned(config) as (_, js):
        await define(js, namespace, run_budget("team", 600))
        async with running_agent(config, toolbox_of(tools)) as _:
            await send(js, config, {"q": "bees"}, correlationid=run)
            await eventually(lambda: stream_count(js, output_stream(config)), "the output")
            [output] = await stored(js, output_stream(config))
            spent = await settled(js, namespace, "team", run)
    assert len(scripted_llm.completions) == 1
    assert tools.calls == [("lookup", {})]
    assert parsed(output).data == {
        "content": "Looking it up.",
        "model": "scripted-model",
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
        "stopped": "budget-exceeded",
    }
    assert (spent.spent.tokens, spent.refusals) == (120, 1)


async def test_a_workflows_budget_counts_an_agent_called_as_a_tool(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    """The caller's event is in Workflow "research"; the callee (an LLM agent too) gets the
    attribute on its request, so its call counts against the Workflow's budget as well."""
    base = llm_config(nats_url, scripted_llm.base_url)
    namespace = base.namespace
    callee = base.model_copy(update={"agent": "researcher"})
    assert base.llm is not None
    tools = base.llm.policy.tools.model_validate({"agents": [{"agent": "researcher"}]})
    policy = base.llm.policy.model_copy(update={"tools": tools})
    resolved = ResolvedTool(name="researcher", inbox_subject=callee.inbox_subject(0))
    caller = base.model_copy(
        update={
            "agent": "analyst",
            "llm": base.llm.model_copy(update={"policy": policy, "agents": [resolved]}),
        }
    )
    run = f"run-{uuid.uuid4().hex[:8]}"
    scripted_llm.script(
        ToolCalls([ScriptedToolCall("researcher", '{"topic": "bees"}', "c1")], usage=(50, 10)),
        Text("Bees dance.", usage=(30, 5)),  # the callee's answer
        Text("They dance.", usage=(70, 8)),  # the caller's final answer
    )
    async with provisioned(callee) as (_, js), provisioned(caller) as _:
        await define(
            js,
            namespace,
            run_budget("flow", 100_000, scope="Workflow", workflow=WORKFLOW),
            run_budget("other", 100_000, scope="Workflow", workflow="elsewhere"),
        )
        async with (
            running_agent(callee) as _,
            running_agent(caller, toolbox_factory(caller)) as _,
        ):
            await send(js, caller, {"q": "bees"}, correlationid=run, troupeworkflow=WORKFLOW)
            await answered(js, caller, 2)  # the callee's output, then the caller's
            outputs = [parsed(msg) for msg in await stored(js, output_stream(caller))]
            spent = await settled(js, namespace, "flow", run)
            with pytest.raises(NotFoundError):
                await ledger(js, namespace, "other", run)
    by_agent = {event.source: event for event in outputs}
    final = by_agent[f"/{namespace}/analyst"]
    assert final.data["content"] == "They dance."
    assert (final.model_extra or {})[WORKFLOW_ATTRIBUTE] == WORKFLOW
    researched = by_agent[f"/{namespace}/researcher"]
    assert (researched.model_extra or {})[WORKFLOW_ATTRIBUTE] == WORKFLOW
    assert len(scripted_llm.completions) == 3
    assert spent.spent.tokens == 60 + 35 + 78


async def deferrals(js: JetStreamContext, config: RuntimeConfig, event_id: str) -> list[Any]:
    """The deferral records of one message's journal."""
    log = EventLog(js, config.namespace, naming.conversation_log_id(config.agent, event_id))
    return [event.data for event in await log.replay() if event.type == DEFERRED]


def tpm_config(nats_url: str, base_url: str, scope: str) -> RuntimeConfig:
    """600 tokens a minute (bursts of 100, then 10 a second); each call takes its prompt's
    estimate plus 75: a second call finds the bucket short for some seconds, longer than
    the loop waits in place (half the 2 s timeout), so the message is deferred."""
    return llm_config(
        nats_url,
        base_url,
        maxTokens=MAX_TOKENS,
        rateLimit={"tokensPerMinute": 600, "scope": scope},
    )


async def answered(js: JetStreamContext, config: RuntimeConfig, count: int) -> None:
    async def enough() -> bool:
        return await stream_count(js, output_stream(config)) >= count

    await eventually(enough, f"{count} outputs", within=30)


def second_wait(scripted_llm: ScriptedLlm) -> float:
    """Seconds the second call would wait right after the first: two calls' tokens less the
    burst, at 10 a second (less the time between them: at most a few seconds here)."""
    cost = estimate_tokens(scripted_llm.completions[0].messages) + MAX_TOKENS
    return (2 * cost - 100) / 10


async def test_the_agents_own_tpm_per_replica_defers_the_call_that_does_not_fit(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    config = tpm_config(nats_url, scripted_llm.base_url, "replica")
    scripted_llm.script(Text("one", usage=(10, 5)), Text("two", usage=(10, 5)))
    async with provisioned(config) as (_, js), running_agent(config) as _:
        await send(js, config, {"q": "first"})
        await answered(js, config, 1)
        second = await send(js, config, {"q": "second"})
        await answered(js, config, 2)
        [deferred] = await deferrals(js, config, second.id)
    assert "own token rate limit" in deferred["error"]
    # Longer than the loop waits in place (1 s), at most the wait right after the first.
    assert 1 < deferred["delay"] <= second_wait(scripted_llm)
    assert len(scripted_llm.completions) == 2


async def test_the_agents_own_tpm_shared_by_replicas_holds_across_them(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    """One replica spends the bucket, then another starts (an empty bucket of its own, were
    it per replica): the shared key in the rate-limit bucket still has no room."""
    config = tpm_config(nats_url, scripted_llm.base_url, "global")
    scripted_llm.script(Text("one", usage=(10, 5)), Text("two", usage=(10, 5)))
    async with provisioned(config) as (_, js):
        async with running_agent(config) as _:
            await send(js, config, {"q": "first"})
            await answered(js, config, 1)
        async with running_agent(config) as _:
            second = await send(js, config, {"q": "second"})
            await answered(js, config, 2)
            [deferred] = await deferrals(js, config, second.id)
        kv = await js.key_value(naming.rate_limit_bucket(config.namespace))
        shared = await kv.get(naming.agent_token_limit_key(config.agent))
    assert "own token rate limit" in deferred["error"]
    # The second replica started in the meantime: more time has passed.
    assert 1 < deferred["delay"] <= second_wait(scripted_llm)
    assert float(shared.value or b"nan") > 0


async def test_a_shared_rpm_token_is_given_back_when_the_shared_tpm_throttles(
    nats_url: str, scripted_llm: ScriptedLlm
) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    bucket = f"limits-{uuid.uuid4().hex[:8]}"
    kv = await js.create_key_value(bucket=bucket)
    # rpm: bursts of 2; tpm: bursts of 100. Two replicas' routers share both keys.
    config = runtime(
        [("shared", "m")],
        [
            provider(
                "shared",
                scripted_llm.base_url,
                limits={"requestsPerMinute": 12, "tokensPerMinute": 600},
            )
        ],
    )
    first = ModelRouter(config, {}, kv, max_limit_wait=0.05)
    second = ModelRouter(config, {}, kv, max_limit_wait=0.05)
    messages = [{"role": "user", "content": "hello"}]
    big = ChatRequest(messages=messages, max_tokens=90 - estimate_tokens(messages))
    scripted_llm.script(Text("one", usage=(2, 88)), Text("small"))
    try:
        await first.complete(big, None)
        with pytest.raises(RateLimited):
            await second.complete(big, None)  # tpm is short; its rpm token goes back
        small = ChatRequest(messages=messages, max_tokens=1)
        assert (await second.complete(small, None)).message["content"] == "small"
    finally:
        await first.aclose()
        await second.aclose()
        await js.delete_key_value(bucket)
        await nc.close()
    assert len(scripted_llm.completions) == 2
