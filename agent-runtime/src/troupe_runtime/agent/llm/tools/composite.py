"""One ToolBox over all of an agent's tools: functions, Agents, remote A2A agents, then MCP
servers.

Tool names are unique across kinds, since the model calls a tool by name alone: two tools
with one name are a start-up error naming both. An MCP server reached only later that lists
a taken name has that tool skipped, with an error in the log.

``build_toolbox`` runs once per process (MCP sessions and A2A clients are shared by every
message); ``for_message`` binds the result to the message being answered, which Agent and
A2A tools need for their requests' ids. Every call that reaches a tool is counted in
``troupe_llm_tool_calls`` by kind and outcome.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from troupe_runtime.agent.handlers.threads import HandlerThreads
from troupe_runtime.agent.llm.tools.a2a import A2aToolBox
from troupe_runtime.agent.llm.tools.agents import AgentToolBox, Callee
from troupe_runtime.agent.llm.tools.base import ToolNameClash, error_result
from troupe_runtime.agent.llm.tools.functions import FunctionToolBox, PythonTool
from troupe_runtime.agent.llm.tools.mcp import DEFAULT_BACKOFF, Backoff, McpToolBox
from troupe_runtime.agent.llm.types import ToolBox, ToolCall, ToolResult, ToolSpec
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.llm import LlmRuntime
from troupe_runtime.serving.metrics import LlmMetrics

logger = logging.getLogger(__name__)


class _Kind(Protocol):
    async def specs(self) -> list[ToolSpec]: ...

    def has(self, name: str) -> bool: ...

    async def call(self, call: ToolCall, arguments: dict[str, Any]) -> ToolResult: ...

    async def aclose(self) -> None: ...


class CompositeToolBox:
    """Every tool of one agent; the first kind that has a name answers for it."""

    def __init__(
        self,
        functions: FunctionToolBox,
        agents: AgentToolBox | None,
        mcp: McpToolBox,
        a2a: A2aToolBox | None = None,
        *,
        owner: bool = True,
        reported: set[str] | None = None,
        metrics: LlmMetrics | None = None,
        agent: str = "",
    ) -> None:
        self._functions = functions
        self._agents = agents
        self._mcp = mcp
        self._a2a = a2a
        self._owner = owner
        self._reported = set() if reported is None else reported
        """Skipped names already logged, shared with the views ``for_message`` makes."""
        self._metrics = metrics
        self._agent = agent

    def _kinds(self) -> list[_Kind]:
        kinds: list[_Kind] = [self._functions]
        if self._agents is not None:
            kinds.append(self._agents)
        if self._a2a is not None:
            kinds.append(self._a2a)
        kinds.append(self._mcp)
        return kinds

    def for_message(self, cause: CloudEvent) -> CompositeToolBox:
        """The same tools, calling Agents on behalf of ``cause``; its ``aclose`` closes nothing."""
        agents = None if self._agents is None else self._agents.bound(cause)
        a2a = None if self._a2a is None else self._a2a.bound(cause)
        return CompositeToolBox(
            self._functions,
            agents,
            self._mcp,
            a2a,
            owner=False,
            reported=self._reported,
            metrics=self._metrics,
            agent=self._agent,
        )

    async def check_names(self) -> None:
        """``ToolNameClash`` when two tools answer to one name."""
        seen: dict[str, str] = {}
        for kind in self._kinds():
            for spec in await kind.specs():
                if spec.name in seen:
                    raise ToolNameClash(
                        f"two tools are named {spec.name!r} ({seen[spec.name]} and "
                        f"{_label(kind)}); rename one in spec.llm.tools (name) or leave it off "
                        "the MCP server's allow list"
                    )
                seen[spec.name] = _label(kind)

    async def specs(self) -> list[ToolSpec]:
        specs: list[ToolSpec] = []
        taken: set[str] = set()
        for kind in self._kinds():
            for spec in await kind.specs():
                if spec.name in taken:
                    if (skipped := f"{spec.name} {_label(kind)}") not in self._reported:
                        self._reported.add(skipped)
                        logger.error(
                            "tool %r of %s is skipped: the name is taken", spec.name, _label(kind)
                        )
                    continue
                taken.add(spec.name)
                specs.append(spec)
        return specs

    async def call(self, call: ToolCall, arguments: dict[str, Any]) -> ToolResult:
        raw: object = arguments  # the model's: typed as a dict, not trusted to be one
        if not isinstance(raw, dict):
            return error_result(f"{call.name}: arguments must be a JSON object")
        for kind in self._kinds():
            if kind.has(call.name):
                try:
                    result = await kind.call(call, arguments)
                except Exception:
                    self._count(kind, "failed")
                    raise
                self._count(kind, "error" if result.is_error else "succeeded")
                return result
        return error_result(f"{call.name!r} is not a tool of this agent")

    def _count(self, kind: _Kind, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.tool_calls.labels(self._agent, _KIND_LABELS[type(kind)], outcome).inc()

    async def aclose(self) -> None:
        if self._owner:
            for kind in self._kinds():
                await kind.aclose()


def bound(toolbox: ToolBox, cause: CloudEvent) -> ToolBox:
    """``toolbox`` calling on behalf of ``cause`` (``for_message``), or as it is when it has
    no tools that need the message: what the loop hands each message's conversation."""
    return toolbox.for_message(cause) if isinstance(toolbox, CompositeToolBox) else toolbox


def _label(kind: _Kind) -> str:
    if isinstance(kind, FunctionToolBox):
        return "a function"
    if isinstance(kind, AgentToolBox):
        return "an Agent"
    if isinstance(kind, A2aToolBox):
        return "a remote A2A agent"
    return "an MCP server"


_KIND_LABELS: dict[type, str] = {
    FunctionToolBox: "function",
    AgentToolBox: "agent",
    A2aToolBox: "a2a",
    McpToolBox: "mcp",
}


async def build_toolbox(
    runtime: LlmRuntime,
    *,
    config: RuntimeConfig,
    nc: NATS | None,
    js: JetStreamContext | None,
    threads: HandlerThreads | None = None,
    backoff: Backoff = DEFAULT_BACKOFF,
    env: Mapping[str, str] | None = None,
    metrics: LlmMetrics | None = None,
) -> CompositeToolBox:
    """The agent's tools, once per process: functions loaded, MCP servers and A2A agents'
    cards tried once.

    Raises ``ValueError`` (``ToolNameClash`` among them) naming what is wrong: a function
    that cannot be loaded, an Agent with no resolved inbox, an A2A token variable unset,
    two tools with one name. An unreachable MCP server or A2A agent is only a warning.
    ``nc``/``js`` may be None when the agent calls no Agents. ``threads`` run plain
    functions (default: ``maxInFlight`` of them). ``env`` holds the A2A tokens (default
    the process's); ``metrics`` counts the tool calls.
    """
    tools = runtime.policy.tools
    functions = FunctionToolBox(
        [PythonTool.load(policy) for policy in tools.functions],
        threads or HandlerThreads(config.messaging.max_in_flight),
    )
    agents = None
    if tools.agents:
        if nc is None or js is None:
            raise ValueError("spec.llm.tools.agents needs a NATS connection to call the Agents")
        resolved = {tool.name: tool for tool in runtime.agents}
        callees = [
            Callee.resolve(
                policy, resolved.get(policy.name or policy.agent) or resolved.get(policy.agent)
            )
            for policy in tools.agents
        ]
        agents = AgentToolBox(callees, nc=nc, js=js, config=config)
    mcp = McpToolBox.from_policy(tools.mcp, runtime.mcp, backoff)
    a2a = None
    if tools.a2a:
        a2a = A2aToolBox.from_policy(tools.a2a, runtime.a2a, os.environ if env is None else env)
    toolbox = CompositeToolBox(functions, agents, mcp, a2a, metrics=metrics, agent=config.agent)
    try:
        await mcp.start()
        if a2a is not None:
            await a2a.start()
        await toolbox.check_names()
    except BaseException:
        await toolbox.aclose()
        raise
    return toolbox


def toolbox_factory(
    config: RuntimeConfig,
    backoff: Backoff = DEFAULT_BACKOFF,
    *,
    env: Mapping[str, str] | None = None,
    metrics: LlmMetrics | None = None,
) -> Callable[[NATS, JetStreamContext], Awaitable[CompositeToolBox]]:
    """``build_toolbox`` for ``config.llm``, called with each NATS session the agent binds."""
    runtime = config.llm
    if runtime is None:
        raise ValueError("tools need spec.llm (RuntimeConfig.llm)")

    async def build(nc: NATS, js: JetStreamContext) -> CompositeToolBox:
        return await build_toolbox(
            runtime, config=config, nc=nc, js=js, backoff=backoff, env=env, metrics=metrics
        )

    return build
