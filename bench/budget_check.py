"""Benchmark: the budget check's added latency per model call, with 1 and 3 applicable
budgets against none, in the same run.

Three LLM agents, each of a namespace of its own on one real nats-server, ask the same
scripted OpenAI-compatible server (``troupe_devcluster.scripted_llm``, in a subprocess of
its own so its threads take no GIL from the measured process): one namespace has no
Budget, one has a namespace Budget, one has three that all apply (the namespace's per day,
the Agent's per hour, a rolling 6h one in tokens and dollars). Each is the LLM agent
handler as the runtime loads it (``load_handler``): definitions watched, the router holding
on every applicable budget's ledger by compare-and-set before the model call and
committing the usage after. One message, one model call. Samples rotate which agent goes
first, so all see the same machine. A second table times the guard alone (reserve, then
commit, no model call) for 0, 1 and 3 budgets.

A commit is queued, not waited for (``state.budgets``: written in the background), so a
call's added latency is its hold's one compare-and-set; the commit's write still costs the
process its CPU, off the caller's path. The bench checks at the end that every commit landed.

Run: ``make bench BENCH=budget_check [ARGS="--calls 300"]``
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import nats
from nats.js import JetStreamContext

from troupe_devcluster import launcher
from troupe_runtime.agent.context import Context
from troupe_runtime.agent.handlers import LoadedHandler, load_handler
from troupe_runtime.contract import budget as ledger_plan
from troupe_runtime.contract import naming
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.agent_resources import build_agent_resources
from troupe_runtime.contract.budget import Amount, BudgetDefinition, SpendContext
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.nats.provision import ensure_agent_resources
from troupe_runtime.state.budgets import BudgetGuard, Definitions, open_budget_bucket
from troupe_runtime.state.store import StateStore

MODEL = "bench-model"
AGENT = "bench"
SERVER = """
import sys
from troupe_devcluster.scripted_llm import ScriptedLlm, Text

server = ScriptedLlm(models=[sys.argv[1]])
server.answer_by_default(Text("The answer is forty-two.", usage=(24, 6)))
print(server.port, flush=True)
sys.stdin.read()
"""
GENEROUS = {"tokens": {"hard": 10**12}, "costUsd": {"hard": 1e8}}
BUDGETS: dict[str, list[dict[str, Any]]] = {
    "none": [],
    "one": [{"name": "namespace", "scope": "Namespace", "window": {"type": "Day"}}],
    "three": [
        {"name": "namespace", "scope": "Namespace", "window": {"type": "Day"}},
        {"name": "agent", "scope": "Agents", "agents": [AGENT], "window": {"type": "Hour"}},
        {"name": "rolling", "scope": "Namespace", "window": {"type": "Rolling", "duration": "6h"}},
    ],
}


@contextmanager
def scripted_server() -> Iterator[str]:
    """A scripted server in a subprocess answering every request; its base URL."""
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER, MODEL],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        port = process.stdout.readline().strip()
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.kill()
        process.wait(timeout=10)


def agent_config(nats_url: str, base_url: str, namespace: str, stream: bool) -> RuntimeConfig:
    """An LLM agent asking the scripted model, no tools, no schema."""
    return RuntimeConfig.model_validate(
        {
            "agent": AGENT,
            "namespace": namespace,
            "nats": {"url": nats_url},
            "handler": {"type": "llm"},
            "llm": {
                "policy": {"model": {"provider": "scripted", "model": MODEL}, "stream": stream},
                "providers": [
                    {
                        "name": "scripted",
                        "spec": {
                            "baseUrl": base_url,
                            "models": [
                                {
                                    "name": MODEL,
                                    "pricing": {
                                        "inputPerMillion": 1.0,
                                        "outputPerMillion": 2.0,
                                    },
                                }
                            ],
                        },
                    }
                ],
            },
        }
    )


def definitions_of(kind: str) -> list[BudgetDefinition]:
    return [
        BudgetDefinition.model_validate({"generation": 1, "limits": GENEROUS, **budget})
        for budget in BUDGETS[kind]
    ]


async def write_definitions(js: JetStreamContext, namespace: str, kind: str) -> None:
    """What the operator writes for the namespace's Budgets."""
    kv = await open_budget_bucket(js, namespace)
    for definition in definitions_of(kind):
        value = definition.model_dump_json(by_alias=True).encode()
        await kv.put(naming.budget_definition_key(definition.name), value)


async def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def context(js: JetStreamContext, config: RuntimeConfig) -> Context:
    """A first delivery's context, as the runtime builds it for the handler; each message
    is a run of its own (a correlation id), as a workflow step's would be."""
    event = CloudEvent(
        id=uuid.uuid4().hex,
        source="/bench",
        type="bench.question",
        data="What is the answer?",
        correlationid=uuid.uuid4().hex,
    )
    return Context(
        event,
        attempt=1,
        state=StateStore(js, config),
        logger=logging.getLogger("bench"),
        publisher=_nothing,
        progress=_nothing,
    )


async def loop_call(agent: LoadedHandler, ctx: Context) -> float:
    """One message through the LLM agent (one model call); its latency in seconds."""
    started = time.perf_counter()
    await agent.call(ctx)
    return time.perf_counter() - started


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(fraction * len(ordered)), len(ordered) - 1)]


def table(title: str, samples: dict[str, list[float]]) -> None:
    print(title)
    print(f"{'budgets':10} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9} {'+p50 ms':>9} {'ratio':>6}")
    base = percentile(samples["none"], 0.5)
    for kind, values in samples.items():
        p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
        print(
            f"{kind:10} {p50 * 1e3:9.3f} {p99 * 1e3:9.3f} {statistics.fmean(values) * 1e3:9.3f} "
            f"{(p50 - base) * 1e3:+9.3f} {p50 / base:6.2f}"
        )
    base99 = percentile(samples["none"], 0.99)
    for kind in ("one", "three"):
        p99 = percentile(samples[kind], 0.99)
        print(f"added at p99, {kind}: {(p99 - base99) * 1e3:+.3f} ms ({p99 / base99:.2f}x)")


async def check_ledgers(js: JetStreamContext, namespace: str, kind: str) -> None:
    """Every budget of ``kind`` was charged: the bench measured what it says."""
    kv = await open_budget_bucket(js, namespace)
    now = time.time()
    for definition in definitions_of(kind):
        wid = ledger_plan.window_id(definition.window, now, None)
        assert wid is not None
        entry = await kv.get(naming.budget_ledger_key(definition.name, wid))
        ledger = ledger_plan.Ledger.model_validate_json(entry.value or b"")
        spent = ledger_plan.spent(ledger, definition.window, now)
        assert spent.tokens > 0, f"{namespace}: budget {definition.name} was never charged"
        assert not ledger.holds, f"{namespace}: budget {definition.name} has holds left"


async def bench_loop(
    nats_url: str, base_url: str, calls: int, warmup: int, stream: bool
) -> dict[str, list[float]]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    run = uuid.uuid4().hex[:6]
    agents: dict[str, tuple[LoadedHandler, RuntimeConfig]] = {}
    try:
        for kind in BUDGETS:
            config = agent_config(nats_url, base_url, f"bench{kind}{run}", stream)
            await ensure_agent_resources(js, build_agent_resources(config))
            await write_definitions(js, config.namespace, kind)
            agent = load_handler(config.handler, os.environ, config=config)
            await agent.bind(nc, js)
            agents[kind] = (agent, config)
        samples: dict[str, list[float]] = {kind: [] for kind in agents}
        kinds = list(agents)
        for index in range(warmup + calls):
            # Rotate which goes first, so none always finds a warm connection.
            order = kinds[index % len(kinds) :] + kinds[: index % len(kinds)]
            for kind in order:
                agent, config = agents[kind]
                elapsed = await loop_call(agent, context(js, config))
                if index >= warmup:
                    samples[kind].append(elapsed)
        for agent, _ in agents.values():
            await agent.close()  # writes the commits still queued
        for kind, (_, config) in agents.items():
            await check_ledgers(js, config.namespace, kind)
        return samples
    finally:
        for agent, _ in agents.values():
            await agent.close()
        await nc.close()


async def bench_guard(nats_url: str, calls: int, warmup: int) -> dict[str, list[float]]:
    """The guard alone: reserve, then commit, per call."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    run = uuid.uuid4().hex[:6]
    guards: dict[str, tuple[BudgetGuard, Definitions]] = {}
    try:
        for kind in BUDGETS:
            namespace = f"guard{kind}{run}"
            await write_definitions(js, namespace, kind)
            definitions = Definitions(namespace)
            await definitions.start(js)
            guard = BudgetGuard(namespace, definitions)
            guard.use(js)
            guards[kind] = (guard, definitions)
        samples: dict[str, list[float]] = {kind: [] for kind in guards}
        for index in range(warmup + calls):
            for kind, (guard, _) in guards.items():
                spend = SpendContext(agent=AGENT, workflow=None, run=None, hold_id=f"h{index}")
                started = time.perf_counter()
                reservation = await guard.reserve(spend, Amount(tokens=1054, cost_usd=0.002))
                await reservation.commit(Amount(tokens=30, cost_usd=0.000036))
                if index >= warmup:
                    samples[kind].append(time.perf_counter() - started)
        return samples
    finally:
        for guard, definitions in guards.values():
            await guard.aclose()
            await definitions.stop()
        await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="samples of each (default 300)")
    parser.add_argument("--warmup", type=int, default=30, help="rounds not counted (default 30)")
    parser.add_argument("--stream", action="store_true", help="ask for SSE streams")
    args = parser.parse_args()
    layout = launcher.up_nats()
    try:
        with scripted_server() as base_url:
            loop = asyncio.run(
                bench_loop(layout.nats_url, base_url, args.calls, args.warmup, args.stream)
            )
        guard = asyncio.run(bench_guard(layout.nats_url, args.calls, args.warmup))
    finally:
        launcher.down(layout)
    mode = "streamed (SSE)" if args.stream else "whole answers"
    table(
        f"one model call per message through the LLM agent, {mode}, {args.calls} samples "
        "each, rotated",
        loop,
    )
    print()
    table(f"the guard alone (reserve + commit), {args.calls} samples each", guard)


if __name__ == "__main__":
    main()
