"""The LLM agent's handler: ``handler.type: llm`` with ``spec.llm``, one loop per message.

It is built at start-up (``load_handler``) and bound to each NATS session as the runtime
opens it (``bind``): the journal, the Object Store, the usage bucket and the token stream
need the connection, and so do Agents called as tools. A redelivered message replays its
journal and resumes; the first delivery reads nothing. The message's usage so far is in
``ctx.attributes`` after every turn, so a failure reply carries it too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue

from troupe_runtime.agent.context import Context
from troupe_runtime.agent.llm.accounting import UsageRecorder, count
from troupe_runtime.agent.llm.history import Offloader
from troupe_runtime.agent.llm.journal import Journal, ResumeState
from troupe_runtime.agent.llm.loop import Conversation, LoopSettings
from troupe_runtime.agent.llm.prompt import opening
from troupe_runtime.agent.llm.router import ModelRouter
from troupe_runtime.agent.llm.streaming import TokenStream
from troupe_runtime.agent.llm.tools import bound, toolbox_factory
from troupe_runtime.agent.llm.types import (
    ChatRequest,
    Completion,
    DeltaSink,
    ModelCaller,
    ModelError,
    ModelRejected,
    ModelUnavailable,
    RateLimited,
    ToolBox,
)
from troupe_runtime.agent.schemas import ContractChecker
from troupe_runtime.contract import naming
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.llm import LlmRuntime
from troupe_runtime.contract.model_provider import ServedModel
from troupe_runtime.contract.usage import Usage
from troupe_runtime.serving.metrics import LlmMetrics

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT_WINDOW = ServedModel.model_fields["context_window"].default


class ClosableCaller(ModelCaller, Protocol):
    """A model chain holding connections (the router's HTTP clients)."""

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class Session:
    """What one NATS session gives the handler."""

    nc: Client
    js: JetStreamContext
    caller: ClosableCaller
    toolbox: ToolBox
    offloader: Offloader


CallerFactory = Callable[[JetStreamContext], Awaitable[ClosableCaller]]
"""Builds the model chain for a session (the router, with its rate-limit bucket)."""
ToolBoxFactory = Callable[[Client, JetStreamContext], Awaitable[ToolBox]]


def context_window(runtime: LlmRuntime) -> int:
    """The smallest window of the chain's models: the history must fit whichever answers."""
    windows = []
    for ref in runtime.policy.chain():
        provider = runtime.provider(ref.provider)
        served = provider.model(ref.model) if provider is not None else None
        windows.append(served.context_window if served is not None else DEFAULT_CONTEXT_WINDOW)
    return min(windows)


def wait_budget(timeout: float, deadline: datetime | None) -> Callable[[], float]:
    """Seconds a 429 may be waited out in place: half the handler's timeout (the rest is the
    call's), never past the event's deadline."""

    def budget() -> float:
        left = timeout / 2
        if deadline is not None:
            left = min(left, (deadline - datetime.now(UTC)).total_seconds() - timeout / 2)
        return left

    return budget


class _CountedCaller:
    """Counts each failed model call in ``troupe_llm_requests`` (on the chain's first model)."""

    def __init__(
        self, caller: ClosableCaller, metrics: LlmMetrics, agent: str, runtime: LlmRuntime
    ):
        self._caller = caller
        self._metrics = metrics
        first = runtime.policy.model
        self._labels = (agent, first.provider, first.model)

    async def complete(self, request: ChatRequest, on_delta: DeltaSink | None) -> Completion:
        try:
            return await self._caller.complete(request, on_delta)
        except ModelError as error:
            outcome = {
                RateLimited: "rate_limited",
                ModelUnavailable: "unavailable",
                ModelRejected: "rejected",
            }.get(type(error), "failed")
            self._metrics.requests.labels(*self._labels, outcome).inc()
            raise

    async def aclose(self) -> None:
        await self._caller.aclose()


class LlmAgent:
    """The handler of an LLM agent: a ``Conversation`` per message, sessions bound by NATS."""

    def __init__(
        self,
        config: RuntimeConfig,
        metrics: LlmMetrics,
        callers: CallerFactory,
        toolboxes: ToolBoxFactory,
    ) -> None:
        if config.llm is None:
            raise ValueError("an LLM agent needs spec.llm (RuntimeConfig.llm)")
        self._config = config
        self._runtime = config.llm
        self._metrics = metrics
        self._callers = callers
        self._toolboxes = toolboxes
        self._checker = ContractChecker(config.contract)
        self._settings = LoopSettings(
            agent=config.agent,
            policy=config.llm.policy,
            output_schema=config.contract.output_schema,
            context_window=context_window(config.llm),
        )
        self._session: Session | None = None
        self._usage = UsageRecorder(config.namespace, config.agent)
        """One per process: what a lost session could not write is written by the next."""

    async def bind(self, nc: Client, js: JetStreamContext) -> None:
        """Use this NATS session from now on (a new one after a reconnect)."""
        await self.close()
        agent, namespace = self._config.agent, self._config.namespace
        caller = _CountedCaller(await self._callers(js), self._metrics, agent, self._runtime)
        toolbox = await self._toolboxes(nc, js)
        self._usage.use(js)
        limit = self._runtime.policy.history.max_tool_result_bytes
        self._session = Session(nc, js, caller, toolbox, Offloader(js, namespace, limit))

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await asyncio.gather(
                session.toolbox.aclose(),
                self._usage.aclose(),
                session.caller.aclose(),
                return_exceptions=True,
            )

    async def __call__(self, ctx: Context) -> Any:
        session = self._session
        if session is None:
            raise RuntimeError("the LLM agent is not bound to a NATS session yet")
        event = ctx.event
        journal = Journal(session.js, self._config.namespace, self._config.agent, event.id)
        state = ResumeState() if ctx.deliveries == 1 else await journal.replay()
        if ctx.deliveries > 1:  # on every redelivery: it stops one whose attempts are spent
            ctx.set_deferrals(min(state.deferrals, ctx.deliveries - 1))
        if not state.fresh:
            ctx.attributes.update(state.usage.attributes())
            ctx.logger.info("resuming at turn %d from the journal", state.next_turn)

        def on_completion(completion: Completion, total: Usage) -> None:
            ctx.attributes.update(total.attributes())
            count(self._metrics, self._config.agent, completion)
            self._usage.add(completion)

        policy = self._runtime.policy
        conversation = Conversation(
            self._settings,
            caller=session.caller,
            toolbox=bound(session.toolbox, event),
            journal=journal,
            offloader=session.offloader,
            stream=TokenStream.of(session.nc, self._config.namespace, event, policy.stream),
            checker=self._checker,
            on_completion=on_completion,
            progress=ctx.progress,
            wait_budget=wait_budget(self._config.timeout.total_seconds(), event.deadline),
        )
        first = (
            opening(self._runtime, event.data, agent=self._config.agent, role=self._config.role)
            if state.fresh
            else []
        )
        answer = await conversation.run(first, state)
        return answer.data


def model_router(config: RuntimeConfig, env: Mapping[str, str]) -> CallerFactory:
    """The router over the agent's chain; provider limits in the namespace's rate-limit
    bucket when it exists (every replica shares them), else in memory."""
    runtime = config.llm
    assert runtime is not None

    async def build(js: JetStreamContext) -> ClosableCaller:
        kv: KeyValue | None = None
        limits = [p.spec.limits for p in runtime.providers]
        if any(lim.requests_per_minute or lim.tokens_per_minute for lim in limits):
            bucket = naming.rate_limit_bucket(config.namespace)
            try:
                kv = await js.key_value(bucket)
            except BucketNotFoundError:
                logger.warning("no bucket %s: provider limits are kept per replica", bucket)
        return ModelRouter(runtime, env, kv)

    return build


def llm_agent(
    config: RuntimeConfig,
    metrics: LlmMetrics,
    env: Mapping[str, str],
    callers: CallerFactory | None = None,
    toolboxes: ToolBoxFactory | None = None,
) -> LlmAgent:
    """The LLM agent of ``config``: by default the model router and the declared tools."""
    return LlmAgent(
        config,
        metrics,
        callers or model_router(config, env),
        toolboxes or toolbox_factory(config),
    )
