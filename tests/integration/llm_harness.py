"""Helpers for the LLM loop's integration tests: configs over the scripted model, tools of
plain Python callables, and a runtime process (``python -m tests.integration.llm_harness``)
whose tools record what they did in the file named by ``TROUPE_TEST_EFFECTS``."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from tests.integration.runtime_harness import EFFECTS_ENV, eventually, make_config
from troupe_runtime.agent.chaos import Chaos
from troupe_runtime.agent.handlers import LoadedHandler
from troupe_runtime.agent.llm.approvals import SCAN_SECONDS
from troupe_runtime.agent.llm.handler import LlmAgent, ToolBoxFactory, llm_agent
from troupe_runtime.agent.llm.types import ToolBox, ToolCall, ToolResult, ToolSpec
from troupe_runtime.agent.runtime import Runtime
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.serving.metrics import LlmMetrics

PROVIDER = "scripted"
MODEL = "scripted-model"
PRICING = {"inputPerMillion": 2.0, "outputPerMillion": 10.0}

ToolFn = Callable[[dict[str, Any]], Awaitable[str]]


def llm_config(
    nats_url: str, base_url: str, *, context_window: int = 8192, **policy: Any
) -> RuntimeConfig:
    """An LLM agent asking the scripted model; ``policy`` adds to ``spec.llm``."""
    llm = {
        "policy": {"model": {"provider": PROVIDER, "model": MODEL}, **policy},
        "providers": [
            {
                "name": PROVIDER,
                "spec": {
                    "baseUrl": base_url,
                    "models": [
                        {"name": MODEL, "contextWindow": context_window, "pricing": PRICING}
                    ],
                },
            }
        ],
    }
    return make_config(
        nats_url,
        handler={"type": "llm"},
        llm=llm,
        timeout="2s",
        messaging={"ackWait": "20s"},
    )


@dataclass(frozen=True)
class Tool:
    spec: ToolSpec
    run: ToolFn


class CallableTools:
    """A ToolBox of Python coroutines (what the tools helper's functions box will do)."""

    def __init__(self, *tools: Tool) -> None:
        self._tools = {tool.spec.name: tool for tool in tools}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.ids: list[str] = []

    async def specs(self) -> list[ToolSpec]:
        return [tool.spec for tool in self._tools.values()]

    async def call(self, call: ToolCall, arguments: dict[str, Any]) -> ToolResult:
        self.calls.append((call.name, arguments))
        self.ids.append(call.id)
        return ToolResult(await self._tools[call.name].run(arguments))

    async def aclose(self) -> None:
        return None


def tool(name: str, run: ToolFn, *, idempotent: bool = False) -> Tool:
    parameters = {"type": "object", "properties": {}, "additionalProperties": True}
    return Tool(ToolSpec(name, f"the {name} tool", parameters, idempotent), run)


def toolbox_of(box: ToolBox) -> ToolBoxFactory:
    async def build(nc: Client, js: JetStreamContext) -> ToolBox:
        return box

    return build


@asynccontextmanager
async def running_llm(
    config: RuntimeConfig,
    toolbox: ToolBox | None = None,
    *,
    declared_tools: bool = False,
    approval_scan_seconds: float = SCAN_SECONDS,
    chaos: Chaos | None = None,
) -> AsyncIterator[tuple[Runtime, LlmMetrics]]:
    """The runtime with the real LLM agent (model router included) in this process; its
    tools are ``toolbox``, or with ``declared_tools`` those the config declares (MCP);
    ``chaos`` is the runtime's, given to the agent's model and tool calls as well."""
    metrics = LlmMetrics(CollectorRegistry())
    agent: LlmAgent = llm_agent(
        config,
        metrics,
        os.environ,
        toolboxes=None if declared_tools else toolbox_of(toolbox or CallableTools()),
        approval_scan_seconds=approval_scan_seconds,
        chaos=chaos,
    )
    handler = LoadedHandler(agent, agent.close, agent.bind, agent.approvals)
    runtime = Runtime(config, handler=handler, host="127.0.0.1", port=0, grace=2.0, chaos=chaos)
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


# The crash test's tools, loaded by the runtime process as spec.llm.tools.functions.


def _effect(what: str) -> None:
    with Path(os.environ[EFFECTS_ENV]).open("a") as effects:
        effects.write(what + "\n")


def effects(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def count() -> str:
    """Counts a call in the effects file."""
    _effect("count")
    return "counted"


async def hang() -> str:
    """Hangs until the test kills the process."""
    await asyncio.to_thread(_effect, "hang")
    await asyncio.Event().wait()
    return "never"
