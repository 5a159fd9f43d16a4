"""The LLM agent's handler: ``handler.type: llm`` with ``spec.llm``, one loop per message.

It is built at start-up (``load_handler``) and bound to each NATS session as the runtime
opens it (``bind``): the journal, the Object Store, the usage bucket and the token stream
need the connection, and so do Agents called as tools. A redelivered message replays its
journal and resumes; the first delivery reads nothing. The message's usage so far is in
``ctx.attributes`` after every turn, so a failure reply carries it too.

Budgets: the namespace's definitions are watched from ``bind`` on (restarted on each new
session, ready before the first call), and each turn's request carries its
``SpendContext``: the agent, the Workflow of the event (``troupeworkflow``), the run (its
correlation id) and a hold id that digests the agent, the event, the delivery and the turn,
so a crashed attempt's holds are never taken for the redelivery's.

Sessions (``spec.llm.session``, ``sessions.py``): a message carrying a ``sessionid`` enters
its session's queue (the double-texting policy), has the session's history put between the
system prompt and its input, and, answered, appends its exchange (the input and the final
answer's text) to the history, the cap enforced; it leaves the queue however it ends. A
redelivered message resumes from its journal, whose opening already holds the history it
was given. Without sessions on, or without a ``sessionid``, nothing of this runs: not one
read.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue

from troupe_runtime.agent.chaos import Chaos
from troupe_runtime.agent.context import Context
from troupe_runtime.agent.llm.accounting import UsageRecorder, count
from troupe_runtime.agent.llm.approvals import SCAN_SECONDS, ApprovalDesk
from troupe_runtime.agent.llm.chaos import ChaoticToolBox
from troupe_runtime.agent.llm.history import Offloader
from troupe_runtime.agent.llm.journal import Journal, ResumeState
from troupe_runtime.agent.llm.loop import Conversation, LoopSettings
from troupe_runtime.agent.llm.prompt import as_text, opening
from troupe_runtime.agent.llm.router import Budgets, Held, ModelRouter, agent_token_limiter
from troupe_runtime.agent.llm.sessions import SUMMARY_PROMPT, SessionStore, with_history
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
    content_text,
)
from troupe_runtime.agent.schemas import ContractChecker
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.agent_resources import (
    rate_limit_bucket_config,
    session_bucket_config,
)
from troupe_runtime.contract.budget import Amount, SpendContext
from troupe_runtime.contract.dead_letters import DeadLetterReason
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.llm import LlmRuntime
from troupe_runtime.contract.model_provider import ServedModel
from troupe_runtime.contract.sessions import (
    ROLLED_BACK,
    Exchange,
    SessionHistory,
    SessionPolicy,
    SessionStopped,
    StopMark,
    event_marker,
)
from troupe_runtime.contract.usage import Usage
from troupe_runtime.serving.metrics import BudgetMetrics, LlmMetrics
from troupe_runtime.state.budgets import BudgetGuard, Definitions

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT_WINDOW = ServedModel.model_fields["context_window"].default


STOPPABLE = ("interrupt", "rollback")
"""The double-texting policies under which a newer message may stop a running one: only
then does the loop look at the session's slot at each turn boundary (a KV write, as it
renews the slot). Under reject and enqueue nothing can ask it to stop, so it does not
look, and ``progress`` keeps the slot (``SessionStore.renew``)."""


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
    sessions: SessionStore | None = None
    """The Agent's session bucket, when ``spec.llm.session`` is on."""


CallerFactory = Callable[[JetStreamContext, Budgets | None], Awaitable[ClosableCaller]]
"""Builds the model chain for a session (the router, with its rate-limit bucket and the
namespace's budgets)."""


class SessionBudgets(Budgets, Protocol):
    """Budgets the handler binds to each NATS session (``NamespaceBudgets``, or a fake)."""

    async def use(self, js: JetStreamContext) -> None: ...

    async def stop(self) -> None: ...

    async def aclose(self) -> None:
        """Write the commits and releases still queued (for good: the runtime is stopping)."""
        ...


class NamespaceBudgets:
    """The namespace's budgets: definitions watched, ledgers advanced through one session."""

    def __init__(self, namespace: str, metrics: BudgetMetrics | None = None) -> None:
        self._definitions = Definitions(namespace, metrics)
        self._guard = BudgetGuard(namespace, self._definitions, metrics=metrics)

    async def use(self, js: JetStreamContext) -> None:
        """Watch and write through ``js`` from now on; returns once every definition is in."""
        await self._definitions.start(js)
        self._guard.use(js)

    async def stop(self) -> None:
        """Stop watching; commits still queued go on through the next session's ``use``."""
        await self._definitions.stop()

    async def aclose(self) -> None:
        await self._guard.aclose()

    async def settled(self) -> None:
        """Wait until the commits and releases queued so far are written (tests)."""
        await self._guard.settled()

    def applies(self, spend: SpendContext) -> bool:
        return bool(self._definitions.applicable(spend))

    async def reserve(self, spend: SpendContext, amount: Amount) -> Held:
        return await self._guard.reserve(spend, amount)


def hold_id(agent: str, event_id: str, delivery: int, turn: int) -> str:
    """The ``SpendContext.hold_id`` of one turn of one delivery: deterministic, and unique per
    attempt, so a crashed attempt's hold (reaped in full) is not the redelivery's."""
    return hashlib.sha256(f"{agent}\n{event_id}\n{delivery}\n{turn}".encode()).hexdigest()[:32]


def spending(agent: str, event: CloudEvent, delivery: int) -> Callable[[int], SpendContext]:
    """Each turn's ``SpendContext`` for ``event``'s ``delivery``-th delivery."""
    workflow = envelope.workflow_of(event)

    def spend(turn: int) -> SpendContext:
        return SpendContext(
            agent=agent,
            workflow=workflow,
            run=event.correlationid,
            hold_id=hold_id(agent, event.id, delivery, turn),
        )

    return spend


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
        budgets: SessionBudgets | None = None,
        approval_scan_seconds: float = SCAN_SECONDS,
        chaos: Chaos | None = None,
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
        self._session_policy = config.llm.policy.sessions()
        self._stoppable = (
            self._session_policy is not None and self._session_policy.double_texting in STOPPABLE
        )
        self._lease = config.timeout.total_seconds() + config.messaging.ack_wait.total_seconds()
        """How long a session's slot outlives a replica that stopped renewing it."""
        self._budgets = budgets
        """One per process, like the usage recorder; bound to each session."""
        self._usage = UsageRecorder(config.namespace, config.agent)
        """One per process: what a lost session could not write is written by the next."""
        self.approvals = ApprovalDesk(config, scan_seconds=approval_scan_seconds)
        """Parks guarded tool calls and takes their decisions (``approvals.py``)."""
        self._chaos = chaos
        """A ChaosExperiment's tool faults, in front of each message's tools."""

    async def bind(self, nc: Client, js: JetStreamContext) -> None:
        """Use this NATS session from now on (a new one after a reconnect)."""
        await self._unbind()
        agent, namespace = self._config.agent, self._config.namespace
        if self._budgets is not None:  # every definition in before the first call
            await self._budgets.use(js)
        callers = await self._callers(js, self._budgets)
        caller = _CountedCaller(callers, self._metrics, agent, self._runtime)
        toolbox = await self._toolboxes(nc, js)
        self._usage.use(js)
        limit = self._runtime.policy.history.max_tool_result_bytes
        sessions = await self._sessions(js, self._session_policy)
        offloader = Offloader(js, namespace, limit)
        self.approvals.use(js)
        self._session = Session(nc, js, caller, toolbox, offloader, sessions)

    async def _sessions(
        self, js: JetStreamContext, policy: SessionPolicy | None
    ) -> SessionStore | None:
        """The session bucket (created when the operator has not yet), when sessions are on."""
        config = session_bucket_config(self._config)
        if policy is None or config is None:
            return None
        try:
            kv = await js.key_value(config.bucket)
        except BucketNotFoundError:
            logger.info("creating the session bucket %s", config.bucket)
            kv = await js.create_key_value(config)
        return SessionStore(kv, policy, self._lease)

    async def close(self) -> None:
        """For good: the budgets' queued commits are written first, while still connected
        (the runtime closes the handler before it drains the connection)."""
        if self._budgets is not None:
            try:
                await self._budgets.aclose()
            except Exception as error:  # a commit not written: its hold is charged at expiry
                logger.warning("the budgets' queued commits were not all written: %s", error)
        await self._unbind()

    async def _unbind(self) -> None:
        """Let the session go (a rebind keeps the budgets' queued commits: the next session
        writes them)."""
        session, self._session = self._session, None
        await self.approvals.stop()
        if session is not None:
            await asyncio.gather(
                session.toolbox.aclose(),
                self._usage.aclose(),
                session.caller.aclose(),
                return_exceptions=True,
            )
        if self._budgets is not None:
            try:
                await self._budgets.stop()
            except Exception as error:  # the session is going anyway
                logger.warning("the budget definitions' watch did not stop cleanly: %s", error)

    async def __call__(self, ctx: Context) -> Any:
        session = self._session
        if session is None:
            raise RuntimeError("the LLM agent is not bound to a NATS session yet")
        event = ctx.event
        journal = Journal(session.js, self._config.namespace, self._config.agent, event.id)
        fresh = ctx.deliveries == 1 and not ctx.resumed
        state = ResumeState() if fresh else await journal.replay()
        if ctx.deliveries > 1:  # on every redelivery: it stops one whose attempts are spent
            ctx.set_deferrals(min(state.deferrals, ctx.deliveries - 1))
        if not state.fresh:
            ctx.attributes.update(state.usage.attributes())
            ctx.logger.info("resuming at turn %d from the journal", state.next_turn)

        def on_completion(completion: Completion, total: Usage) -> None:
            ctx.attributes.update(total.attributes())
            count(self._metrics, self._config.agent, completion)
            self._usage.add(completion)

        spend = spending(self._config.agent, event, ctx.deliveries)
        sessions, session_id = session.sessions, event.sessionid
        if sessions is None or session_id is None:
            return await self._converse(ctx, session, state, on_completion, spend, None)
        marker = event_marker(event.id)
        try:
            await sessions.enter(session_id, marker, ctx.progress)
            history = await sessions.history(session_id) if state.fresh else None

            async def progress() -> None:
                await ctx.progress()
                await sessions.renew(session_id, marker)

            async def stop() -> StopMark | None:
                return await sessions.stop(session_id, marker)

            answer = await self._converse(
                ctx,
                session,
                state,
                on_completion,
                spend,
                history,
                stop=stop if self._stoppable else None,
                progress=progress,
            )
            if await sessions.stop(session_id, marker) == "rollback":
                raise SessionStopped(DeadLetterReason.SESSION_ROLLED_BACK, ROLLED_BACK)
            exchange = Exchange(event=marker, user=as_text(event.data), assistant=_text(answer))

            async def summarize(text: str) -> str:
                return await self._summary(session, text, spend, on_completion)

            await sessions.record(session_id, exchange, summarize)
            return answer
        finally:  # however it ended, waiting included: the next message's turn
            await sessions.leave(session_id, marker)

    async def _converse(
        self,
        ctx: Context,
        session: Session,
        state: ResumeState,
        on_completion: Callable[[Completion, Usage], None],
        spend: Callable[[int], SpendContext],
        history: SessionHistory | None,
        stop: Callable[[], Awaitable[StopMark | None]] | None = None,
        progress: Callable[[], Awaitable[None]] | None = None,
    ) -> Any:
        """One message's loop: ``history`` (a session's, on a first delivery) between the
        system prompt and the input."""
        event = ctx.event
        journal = Journal(session.js, self._config.namespace, self._config.agent, event.id)
        policy = self._runtime.policy
        toolbox = bound(session.toolbox, event)
        if self._chaos is not None:
            toolbox = ChaoticToolBox(toolbox, self._chaos)
        conversation = Conversation(
            self._settings,
            caller=session.caller,
            toolbox=toolbox,
            journal=journal,
            offloader=session.offloader,
            stream=TokenStream.of(session.nc, self._config.namespace, event, policy.stream),
            checker=self._checker,
            on_completion=on_completion,
            progress=progress or ctx.progress,
            wait_budget=wait_budget(self._config.timeout.total_seconds(), event.deadline),
            spend=spend,
            stop=stop,
            gate=self.approvals.gate(event, journal),
        )
        first = (
            opening(self._runtime, event.data, agent=self._config.agent, role=self._config.role)
            if state.fresh
            else []
        )
        if history is not None:
            first = with_history(first, history)
        answer = await conversation.run(first, state)
        return answer.data

    async def _summary(
        self,
        session: Session,
        text: str,
        spend: Callable[[int], SpendContext],
        on_completion: Callable[[Completion, Usage], None],
    ) -> str:
        """The agent's own model's summary of ``text`` (older exchanges leaving the cap);
        its usage counts like a turn's, held on the budgets as the turn after the last."""
        request = ChatRequest(
            messages=[
                {"role": "system", "content": SUMMARY_PROMPT},
                {"role": "user", "content": text},
            ],
            temperature=0.0,
            max_tokens=self._runtime.policy.max_tokens,
            spend=spend(self._runtime.policy.max_turns),
        )
        completion = await session.caller.complete(request, None)
        on_completion(completion, completion.usage)
        return content_text(completion.message.get("content")) or ""


def _text(answer: Any) -> str:
    """An answer as the session keeps it: the content of a text answer, else its JSON."""
    if isinstance(answer, dict) and isinstance(answer.get("content"), str):
        return str(answer["content"])
    return as_text(answer)


def model_router(
    config: RuntimeConfig, env: Mapping[str, str], chaos: Chaos | None = None
) -> CallerFactory:
    """The router over the agent's chain; provider limits in the namespace's rate-limit
    bucket when it exists (every replica shares them), else in memory. The Agent's own
    global token rate limit needs the bucket: it is created when missing (the config the
    operator gives it, ``agent_resources.rate_limit_bucket_config``)."""
    runtime = config.llm
    assert runtime is not None
    own = runtime.policy.rate_limit

    async def build(js: JetStreamContext, budgets: Budgets | None) -> ClosableCaller:
        kv: KeyValue | None = None
        limits = [p.spec.limits for p in runtime.providers]
        shared_own = own is not None and own.scope == "global"
        if shared_own or any(lim.requests_per_minute or lim.tokens_per_minute for lim in limits):
            bucket = naming.rate_limit_bucket(config.namespace)
            try:
                kv = await js.key_value(bucket)
            except BucketNotFoundError:
                if shared_own:
                    logger.info("creating the rate-limit bucket %s", bucket)
                    kv = await js.create_key_value(rate_limit_bucket_config(config.namespace))
                else:
                    logger.warning("no bucket %s: provider limits are kept per replica", bucket)
        return ModelRouter(
            runtime,
            env,
            kv,
            budgets=budgets,
            token_limit=agent_token_limiter(own, config.agent, kv),
            chaos=chaos,
        )

    return build


def llm_agent(
    config: RuntimeConfig,
    metrics: LlmMetrics,
    env: Mapping[str, str],
    callers: CallerFactory | None = None,
    toolboxes: ToolBoxFactory | None = None,
    budgets: SessionBudgets | None = None,
    approval_scan_seconds: float = SCAN_SECONDS,
    chaos: Chaos | None = None,
) -> LlmAgent:
    """The LLM agent of ``config``: by default the model router and the declared tools;
    budgets checked when ``budgets`` is given (the runtime gives ``NamespaceBudgets``);
    a ChaosExperiment's model and tool faults injected when ``chaos`` is given (the
    runtime's)."""
    return LlmAgent(
        config,
        metrics,
        callers or model_router(config, env, chaos),
        toolboxes or toolbox_factory(config, env=env, metrics=metrics),
        budgets,
        approval_scan_seconds,
        chaos,
    )
