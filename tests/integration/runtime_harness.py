"""Helpers for the runtime's integration tests: unique agents, runtimes, streams.

Also the handlers the subprocess tests load by ``module:function``; they
record what they did in the file named by ``TROUPE_TEST_EFFECTS``.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg, StreamConfig
from nats.js.errors import NotFoundError

from troupe_runtime.agent.context import Context, HandlerFn
from troupe_runtime.agent.handlers import LoadedHandler
from troupe_runtime.agent.runtime import Runtime
from troupe_runtime.contract import envelope
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.agent_resources import DUPLICATE_WINDOW_SECONDS, build_agent_resources
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.nats.provision import ensure_agent_resources

DEADLINE = 20.0
EFFECTS_ENV = "TROUPE_TEST_EFFECTS"


def make_config(nats_url: str, **fields: Any) -> RuntimeConfig:
    """A config for a fresh agent in a namespace of its own, with one output subject."""
    namespace = f"t{uuid.uuid4().hex[:10]}"
    base: dict[str, Any] = {
        "agent": "agent",
        "namespace": namespace,
        "nats": {"url": nats_url},
        "contract": {"outputSubjects": [output_subject(namespace)]},
        "retry": {"maxAttempts": 3, "backoff": ["100ms"]},
        "messaging": {"ackWait": "5s"},
        "healthPort": 8080,
    }
    return RuntimeConfig.model_validate({**base, **fields})


def output_subject(namespace: str) -> str:
    return f"out.{namespace}.result"


def output_stream(config: RuntimeConfig) -> str:
    return f"OUT_{config.namespace}"


async def eventually(condition: Callable[[], object], what: str, within: float = DEADLINE) -> None:
    """Poll ``condition`` (sync or async) until it is truthy; fail naming ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        last = condition()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within:g}s waiting for {what} ({last!r})")
        await asyncio.sleep(0.05)


@asynccontextmanager
async def provisioned(config: RuntimeConfig) -> AsyncIterator[tuple[Client, JetStreamContext]]:
    """The agent's JetStream resources, as the operator makes them, plus an output stream."""
    nc = await nats.connect(config.nats.url)
    js = nc.jetstream()
    await ensure_agent_resources(js, build_agent_resources(config))
    await js.add_stream(
        StreamConfig(
            name=output_stream(config),
            subjects=[f"out.{config.namespace}.>"],
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
        )
    )
    try:
        yield nc, js
    finally:
        await nc.close()


@asynccontextmanager
async def running(
    config: RuntimeConfig, handler: HandlerFn, grace: float = 5.0
) -> AsyncIterator[Runtime]:
    """A runtime in this process, ready (consumers bound) when the block starts."""
    runtime = Runtime(config, handler=LoadedHandler(handler), host="127.0.0.1", port=0, grace=grace)
    task = asyncio.create_task(runtime.run())

    async def ready() -> bool:
        if task.done():
            task.result()
        return runtime.ready()

    await eventually(ready, "the runtime to become ready")
    try:
        yield runtime
    finally:
        runtime.stop()
        await asyncio.wait_for(task, grace + DEADLINE)


async def send(
    js: JetStreamContext,
    config: RuntimeConfig,
    data: Any,
    *,
    priority: int = 0,
    event_id: str | None = None,
    **attributes: Any,
) -> CloudEvent:
    """Publish ``data`` to the agent's inbox as a binary-mode CloudEvent."""
    event = CloudEvent(
        id=event_id or uuid.uuid4().hex,
        source="/tests",
        type="test.input",
        priority=priority,
        data=data,
        **attributes,
    )
    headers, payload = envelope.to_binary(event)
    await js.publish(config.inbox_subject(priority), payload, headers=headers)
    return event


async def stored(js: JetStreamContext, stream: str) -> list[RawStreamMsg]:
    """Every message a stream holds now, oldest first."""
    state = (await js.stream_info(stream)).state
    if state.messages == 0:
        return []  # a stream that never held a message reports first_seq 0
    messages = []
    for sequence in range(state.first_seq, state.last_seq + 1):
        try:
            messages.append(await js.get_msg(stream, sequence))
        except NotFoundError:
            continue
    return messages


async def stream_count(js: JetStreamContext, stream: str) -> int:
    return int((await js.stream_info(stream)).state.messages)


async def inbox_empty(js: JetStreamContext, config: RuntimeConfig) -> bool:
    """True once every input was acknowledged (the inbox is a work queue)."""
    return await stream_count(js, config.inbox_stream) == 0


def sample(runtime: Runtime, name: str, **labels: str) -> float:
    return runtime.metrics.registry.get_sample_value(name, labels) or 0.0


async def http_get(port: int, path: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(f"http://127.0.0.1:{port}{path}", timeout=5)


def _record(ctx: Context, what: str) -> None:
    with Path(os.environ[EFFECTS_ENV]).open("a") as effects:
        effects.write(f"{what} {ctx.event.id} {ctx.attempt}\n")


async def publish_then_hang_once(ctx: Context) -> None:
    """Publish the effect, then hang on the first attempt (until the test kills us)."""
    await ctx.publish({"effect": ctx.event.id})
    _record(ctx, "published")
    if ctx.attempt == 1:
        await asyncio.Event().wait()


async def slow_echo(ctx: Context) -> Any:
    """Take a second, long enough for the test to ask the process to stop meanwhile."""
    _record(ctx, "started")
    await asyncio.sleep(1.0)
    return ctx.event.data


def sync_upper(ctx: Context) -> Any:
    """A plain function: the runtime runs it in a thread."""
    return {"upper": str(ctx.event.data).upper()}
