"""The engine SIGKILLed mid-run: it rebuilds from the log and finishes every run,
and each step's effect happens exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import nats

from tests.integration.runtime_harness import eventually
from tests.integration.workflow_harness import (
    agents,
    engine_config,
    new_namespace,
    result,
    run_events,
    trigger,
)
from troupe_devcluster.layout import free_port
from troupe_runtime.agent.context import Context, HandlerFn
from troupe_runtime.contract import pod
from troupe_runtime.contract.engine_config import EngineConfig
from troupe_runtime.contract.workflow_resources import build_workflow_resources
from troupe_runtime.nats.provision import ensure_workflow_resources

LINEAR: list[dict[str, Any]] = [
    {"name": "a"},
    {"name": "b", "dependsOn": ["a"]},
    {"name": "c", "dependsOn": ["b"]},
]


@contextmanager
def engine_process(config: EngineConfig, directory: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m troupe_runtime.workflow`` as its own process, as in its pod."""
    path = directory / f"engine-{uuid.uuid4().hex[:6]}.json"
    path.write_text(config.to_json())
    log = (directory / "engine.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, *pod.ENGINE_COMMAND[1:], "--config", str(path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, pod.POD_IP_ENV: "127.0.0.1"},
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        log.close()


async def engine_answers(
    config: EngineConfig, process: subprocess.Popen[bytes], path: str = pod.READY_PATH
) -> bool:
    """The engine process answers 200 on ``path`` (readiness unless told otherwise)."""
    assert process.poll() is None, "the engine exited"
    try:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{config.health_port}{path}")
    except httpx.TransportError:
        return False
    return response.status_code == 200


def recording(
    name: str, effects: Counter[tuple[str, str]], gate: asyncio.Event, work: float = 0.0
) -> HandlerFn:
    async def handle(ctx: Context) -> Any:
        await gate.wait()
        await asyncio.sleep(work)  # the step's simulated work, so kills land mid-run
        effects[(ctx.event.correlationid or "", name)] += 1
        return [*(ctx.event.data or []), name]

    return handle


async def test_a_sigkilled_engine_resumes_and_runs_each_step_once(
    nats_url: str, tmp_path: Path
) -> None:
    ns = new_namespace()
    config = engine_config(nats_url, ns, LINEAR, healthPort=free_port())
    effects: Counter[tuple[str, str]] = Counter()
    open_gate, b_gate = asyncio.Event(), asyncio.Event()
    open_gate.set()
    handlers = {
        "a": recording("a", effects, open_gate),
        "b": recording("b", effects, b_gate),
        "c": recording("c", effects, open_gate),
    }
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    run = uuid.uuid4().hex
    # Provisioned as the operator does: the engine only binds.
    await ensure_workflow_resources(js, build_workflow_resources(config))
    async with agents(nats_url, ns, handlers):
        with engine_process(config, tmp_path) as first:
            await eventually(partial(engine_answers, config, first), "the first engine")
            await trigger(js, config, [], run)

            async def b_dispatched() -> bool:
                return any(
                    e.kind == "StepDispatched" and getattr(e, "step", "") == "b"
                    for e in await run_events(js, config, run)
                )

            await eventually(b_dispatched, "step b to be dispatched")
            first.send_signal(signal.SIGKILL)
            first.wait()
        b_gate.set()  # b finishes while no engine runs; its reply waits in the stream
        with engine_process(config, tmp_path) as second:
            await eventually(partial(engine_answers, config, second), "the restarted engine")
            outcome = await result(js, config, run)
        events = await run_events(js, config, run)
    await nc.close()
    assert outcome["status"] == "Succeeded"
    assert outcome["output"] == ["a", "b", "c"]
    assert effects == Counter({(run, "a"): 1, (run, "b"): 1, (run, "c"): 1})
    dispatched = Counter(getattr(e, "step", "") for e in events if e.kind == "StepDispatched")
    assert dispatched == Counter({"a": 1, "b": 1, "c": 1})


async def test_runs_survive_repeated_engine_kills_with_exactly_once_effects(
    nats_url: str, tmp_path: Path
) -> None:
    ns = new_namespace()
    config = engine_config(nats_url, ns, LINEAR, healthPort=free_port(), maxConcurrentRuns=10)
    effects: Counter[tuple[str, str]] = Counter()
    gate = asyncio.Event()
    gate.set()
    handlers = {name: recording(name, effects, gate, work=0.02) for name in "abc"}
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    runs = [uuid.uuid4().hex for _ in range(60)]
    total = len(runs) * len(LINEAR)

    def reached(threshold: int) -> bool:
        return len(effects) >= threshold

    # Provisioned as the operator does, so triggers wait in the stream for an engine.
    await ensure_workflow_resources(js, build_workflow_resources(config))
    async with agents(nats_url, ns, handlers):
        await asyncio.gather(*(trigger(js, config, [], r) for r in runs))
        for threshold in (total // 8, total // 3, total // 2):
            with engine_process(config, tmp_path) as process:
                await eventually(partial(engine_answers, config, process), "the engine")
                await eventually(partial(reached, threshold), f"{threshold} effects")
                process.send_signal(signal.SIGKILL)
                process.wait()
        with engine_process(config, tmp_path) as last:
            await eventually(partial(engine_answers, config, last), "the final engine")
            outcomes = await asyncio.gather(*(result(js, config, r) for r in runs))
    await nc.close()
    assert Counter(o["status"] for o in outcomes) == {"Succeeded": len(runs)}
    assert effects == Counter({(r, step["name"]): 1 for r in runs for step in LINEAR})
