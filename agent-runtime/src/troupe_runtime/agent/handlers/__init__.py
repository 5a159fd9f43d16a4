"""Handlers: what processes each message, chosen by the Agent's ``handler.type``."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import httpx
from nats.aio.client import Client
from nats.js import JetStreamContext

from troupe_runtime.agent.chaos import Chaos
from troupe_runtime.agent.context import DecisionIntake, HandlerFn
from troupe_runtime.agent.handlers.echo import echo
from troupe_runtime.agent.handlers.http import HttpHandler
from troupe_runtime.agent.handlers.llm import LlmHandler, LlmSettings
from troupe_runtime.agent.handlers.python import SyncHandler, load_callable
from troupe_runtime.agent.handlers.threads import HandlerThreads
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.policies import Handler
from troupe_runtime.serving.metrics import RuntimeMetrics


async def _nothing_to_close() -> None:
    return None


async def _nothing_to_bind(nc: Client, js: JetStreamContext) -> None:
    return None


@dataclass(frozen=True)
class LoadedHandler:
    """A ready handler and how to release what it holds (HTTP connections)."""

    call: HandlerFn
    close: Callable[[], Awaitable[None]] = _nothing_to_close
    bind: Callable[[Client, JetStreamContext], Awaitable[None]] = _nothing_to_bind
    """Called with each NATS session the runtime opens (an LLM agent's journal needs it)."""
    intake: DecisionIntake | None = None
    """Takes the decisions that resume parked messages (an LLM agent's approvals)."""

    @property
    def threads(self) -> HandlerThreads | None:
        """The threads a plain Python function runs on; None for every other handler."""
        return self.call.threads if isinstance(self.call, SyncHandler) else None

    def stuck_threads(self) -> int:
        """Handler threads still running after their call timed out (a gauge's value)."""
        return 0 if self.threads is None else self.threads.stuck

    def wedged(self) -> bool:
        """True when every thread a sync handler may use is stuck: only a restart helps."""
        return self.threads is not None and self.threads.wedged()


def _http_client() -> httpx.AsyncClient:
    # No client timeout: the runtime's per-message timeout is the one bound.
    return httpx.AsyncClient(timeout=None)


def load_handler(
    handler: Handler,
    env: Mapping[str, str] = os.environ,
    *,
    threads: int = 1,
    config: RuntimeConfig | None = None,
    metrics: RuntimeMetrics | None = None,
    chaos: Chaos | None = None,
) -> LoadedHandler:
    """Build the handler the Agent declares; a bad declaration fails here, at start-up.

    ``threads`` is how many calls of a plain Python function may run at once
    (the Agent's ``maxInFlight``). An ``llm`` handler with ``config.llm`` (``spec.llm``)
    is the LLM agent; without, the legacy single call. ``chaos`` reaches the LLM agent's
    model and tool calls (every handler's own faults are the processor's).
    """
    if handler.type == "echo":
        return LoadedHandler(echo)
    if handler.type == "python":
        if handler.entrypoint is None:
            raise ValueError("handler.entrypoint (module:function) is required for type python")
        return LoadedHandler(load_callable(handler.entrypoint, threads))
    if handler.type == "http":
        if handler.url is None:
            raise ValueError("handler.url is required for type http")
        client = _http_client()
        return LoadedHandler(HttpHandler(handler.url, client), client.aclose)
    if config is not None and config.llm is not None:
        # Imported here: the LLM agent's tools use this package's threads, so a module-level
        # import would make importing either package first a cycle.
        from troupe_runtime.agent.llm.handler import NamespaceBudgets, llm_agent

        metrics = metrics or RuntimeMetrics()
        budgets = NamespaceBudgets(config.namespace, metrics.budget)
        agent = llm_agent(config, metrics.llm, env, budgets=budgets, chaos=chaos)
        return LoadedHandler(agent, agent.close, agent.bind, agent.approvals)
    settings = LlmSettings.from_env(env, model=handler.model)
    client = _http_client()
    return LoadedHandler(LlmHandler(settings, client), client.aclose)
