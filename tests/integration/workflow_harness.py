"""Helpers for the workflow engine's tests: agents, an engine, triggers, results."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import nats
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from tests.integration.runtime_harness import DEADLINE, eventually, running
from troupe_runtime.agent.context import HandlerFn
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.agent_resources import build_agent_resources
from troupe_runtime.contract.engine_config import EngineConfig
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.run_events import Event
from troupe_runtime.contract.workflow_resources import build_workflow_resources
from troupe_runtime.nats.provision import ensure_agent_resources, ensure_workflow_resources
from troupe_runtime.nats.streams import read_events
from troupe_runtime.workflow.service import EngineService


def agent_config(nats_url: str, namespace: str, agent: str, **fields: Any) -> RuntimeConfig:
    base: dict[str, Any] = {
        "agent": agent,
        "namespace": namespace,
        "nats": {"url": nats_url},
        "retry": {"maxAttempts": 1, "backoff": []},
        "messaging": {"ackWait": "5s", "maxInFlight": 32},
    }
    return RuntimeConfig.model_validate({**base, **fields})


def engine_config(
    nats_url: str, namespace: str, steps: list[dict[str, Any]], **fields: Any
) -> EngineConfig:
    """Steps name their agent (and their fallbacks' names); inbox subjects are filled in
    as the operator does. An approval step (``approval`` given) has no agent."""
    resolved = []
    for step in steps:
        if "approval" in step:  # an approval step: no agent
            resolved.append(step)
            continue
        agent = step.get("agent", step["name"])
        entry = {**step, "agent": agent, "subject": naming.inbox_subject(namespace, agent, 0)}
        compensation = step.get("compensation")
        if compensation is not None:
            entry["compensation"] = {
                **compensation,
                "subject": naming.inbox_subject(namespace, compensation["agent"], 0),
            }
            del entry["compensation"]["agent"]
        if "fallbacks" in step:
            entry["fallbacks"] = [
                {"agent": name, "subject": naming.inbox_subject(namespace, name, 0)}
                for name in step["fallbacks"]
            ]
        resolved.append(entry)
    return EngineConfig.model_validate(
        {
            "workflow": "wf",
            "namespace": namespace,
            "triggerSubject": f"{namespace}.start",
            "steps": resolved,
            "nats": {"url": nats_url},
            **fields,
        }
    )


def new_namespace() -> str:
    return f"w{uuid.uuid4().hex[:10]}"


@asynccontextmanager
async def agents(
    nats_url: str, namespace: str, handlers: dict[str, HandlerFn], **fields: Any
) -> AsyncIterator[None]:
    """One in-process runtime per handler, provisioned and ready."""
    async with AsyncExitStack() as stack:
        nc = await nats.connect(nats_url)
        stack.push_async_callback(nc.close)
        for name, handler in handlers.items():
            config = agent_config(nats_url, namespace, name, **fields)
            await ensure_agent_resources(nc.jetstream(), build_agent_resources(config))
            await stack.enter_async_context(running(config, handler))
        yield


@asynccontextmanager
async def engine(config: EngineConfig) -> AsyncIterator[EngineService]:
    nc = await nats.connect(config.nats.url)
    try:
        await ensure_workflow_resources(nc.jetstream(), build_workflow_resources(config))
    finally:
        await nc.close()
    service = EngineService(config, host="127.0.0.1", port=0)
    task = asyncio.create_task(service.run())

    def ready() -> bool:
        if task.done():
            task.result()
        return service.ready()

    await eventually(ready, "the engine to become ready")
    try:
        yield service
    finally:
        service.stop()
        await asyncio.wait_for(task, DEADLINE)


async def trigger(js: JetStreamContext, config: EngineConfig, data: Any, run_id: str) -> None:
    event = CloudEvent(id=run_id, source="/tests", type="test.start", data=data)
    headers, payload = envelope.to_binary(event)
    await js.publish(config.trigger_subject, payload, headers=headers)


async def result(js: JetStreamContext, config: EngineConfig, run_id: str) -> dict[str, Any]:
    """Wait for the run's result on its results subject."""
    found: dict[str, Any] = {}

    async def published() -> bool:
        try:
            msg = await js.get_last_msg(config.stream, config.subject("results", run_id))
        except NotFoundError:
            return False
        found.update(json.loads(msg.data or b"{}"))
        return True

    await eventually(published, f"the result of run {run_id}")
    return found


async def run_events(js: JetStreamContext, config: EngineConfig, run_id: str) -> list[Event]:
    return await read_events(js, config.stream, config.subject("events", run_id))
