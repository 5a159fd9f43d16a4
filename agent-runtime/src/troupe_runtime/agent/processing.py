"""One message, from delivery to settlement: run it, decide, apply the decision.

Processing parses the envelope and checks the input schema, runs the handler
under the timeout, publishes its outputs and the reply and waits for JetStream
to store them, and describes how that ended as an ``Outcome``. ``settle.decide``
says what to do about it; this module only does it: acknowledge, hand back
with the delay, or dead-letter (answering ``replyto``) and acknowledge.

A model failure that escapes an LLM agent's loop is classified here
(``model_outcome``): a refusal is dead-lettered as ``rejected`` with the
provider's message, an answer still invalid after the repair turn as
``invalid-output``, an unavailable or rate-limited chain retried with
jitter. ``DeferMessage`` is a deferral, which burns no attempt (``settle``).
A Budget's hard limit (``BudgetExceeded``) is dead-lettered as
``budget-exceeded``; a ledger that could not be read or advanced
(``BudgetUnavailable``) hands the message back like an unavailable model,
since no call is ever made unchecked.

A ChaosExperiment's faults (``agent.chaos``) enter here for every handler type: a message's
delay before it is processed, the handler's latency and ``InjectedFault`` under its
deadline (a failed attempt like any other), and a settled first delivery's copy published
to the inbox again. With no experiment naming the agent, one attribute check.

Whatever handler code raises, ``SystemExit``, ``KeyboardInterrupt`` and its own
``CancelledError`` included, is a failed attempt, never the end of the process.
Only our own cancellation of the task (shutdown) passes through, so the worker
hands the message back untouched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, assert_never

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from troupe_runtime.agent.chaos import DUPLICATE_HEADER, Chaos
from troupe_runtime.agent.context import (
    AgentError,
    AttemptsExhausted,
    Context,
    DecisionIntake,
    HandlerFn,
)
from troupe_runtime.agent.deadletter import DeadLetters
from troupe_runtime.agent.llm.types import (
    DeferMessage,
    InvalidModelOutput,
    ModelError,
    ModelRejected,
    ParkMessage,
    RateLimited,
)
from troupe_runtime.agent.outputs import Outputs, Undeliverable, reply_refusal, send_reply
from troupe_runtime.agent.schemas import ContractChecker, SchemaViolation
from troupe_runtime.agent.settle import (
    Ack,
    AgentFailed,
    DeadLetter,
    Deferred,
    Expired,
    Failed,
    InvalidInput,
    InvalidOutput,
    Malformed,
    ModelFailed,
    ModelRefused,
    Nak,
    Outcome,
    OverBudget,
    Overdelivered,
    Parked,
    Policy,
    SessionRefused,
    Settlement,
    Succeeded,
    Undelivered,
    decide,
    effective_attempt,
)
from troupe_runtime.contract import envelope
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.budget import BudgetExceeded, BudgetUnavailable
from troupe_runtime.contract.chaos import CALM
from troupe_runtime.contract.dead_letters import DeadLetterReason, Origin
from troupe_runtime.contract.envelope import ERROR_TYPE, RESULT_TYPE_SUFFIX, CloudEvent
from troupe_runtime.contract.policies import PROGRESS_SHARE
from troupe_runtime.contract.sessions import SessionBusy, SessionStopped
from troupe_runtime.serving import logs, tracing
from troupe_runtime.serving.metrics import RuntimeMetrics
from troupe_runtime.state import StateStore

logger = logging.getLogger(__name__)


def describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def cancelled_by_us() -> bool:
    """Whether the current task is being cancelled (shutdown), not merely seeing a CancelledError.

    A handler may raise ``CancelledError`` itself, or get one from a task it
    awaited; then nobody cancelled *this* task and ``cancelling()`` is 0. The
    timeout's own cancellation is undone (and turned into ``TimeoutError``)
    by ``asyncio.timeout`` before it gets here.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _contained(error: BaseException, attempt: int, why: str) -> Failed:
    """A ``BaseException`` from handler code, as the failed attempt it is."""
    logger.warning(
        "attempt %d: the handler raised %s (%s)", attempt, describe(error), why, exc_info=error
    )
    return Failed(f"{describe(error)} ({why})", attempt)


class HandlerTimeout(Exception):
    """The handler ran past its deadline and was cancelled."""


class _Deadline:
    """The handler's deadline: the timeout from its start, never past the event's own
    deadline; ``progress`` tells JetStream and pushes the timeout back."""

    def __init__(self, msg: Msg, timeout: float, event_deadline: datetime | None) -> None:
        self._msg = msg
        self._timeout = timeout
        self._event_deadline = event_deadline
        self._loop = asyncio.get_running_loop()
        self._latest = float("inf")
        if event_deadline is not None:
            remaining = (event_deadline - datetime.now(UTC)).total_seconds()
            self._latest = self._loop.time() + remaining
        self._scope: asyncio.Timeout | None = None

    def _next(self) -> float:
        return min(self._loop.time() + self._timeout, self._latest)

    async def progress(self) -> None:
        await self._msg.in_progress()
        if self._scope is not None:
            self._scope.reschedule(self._next())

    async def run(self, handling: Awaitable[Any]) -> Any:
        """Await ``handling`` under the deadline; ``HandlerTimeout`` when it passes."""
        try:
            async with asyncio.timeout_at(self._next()) as scope:
                self._scope = scope
                return await handling
        except TimeoutError as error:
            if scope.expired():
                if self._loop.time() >= self._latest:
                    raise HandlerTimeout(
                        f"handler did not finish before the event's deadline {self._event_deadline}"
                    ) from error
                raise HandlerTimeout(
                    f"handler did not finish within {self._timeout:g}s "
                    "(call ctx.progress() to extend)"
                ) from error
            raise
        finally:
            self._scope = None


@dataclass(frozen=True)
class Ended:
    """How processing ended, with what the settlement still needs of it."""

    outcome: Outcome
    event: CloudEvent | None = None
    """The parsed envelope; None when malformed."""
    extensions: dict[str, Any] = field(default_factory=dict)
    """The handler's valid ``ctx.attributes``, for the failure reply."""


def model_outcome(error: ModelError, attempt: int) -> Outcome:
    """A model failure the handler let escape, as the outcome it is."""
    match error:
        case ModelRejected():
            status = f" (HTTP {error.status})" if error.status is not None else ""
            return ModelRefused(f"the model rejected the request{status}: {error}")
        case InvalidModelOutput():
            return InvalidOutput(f"the model's answer is not valid output: {error}")
        case RateLimited(retry_after=retry_after):
            return ModelFailed(describe(error), attempt, not_before=retry_after or 0.0)
        case _:  # ModelUnavailable, or any other model failure: it may pass later
            return ModelFailed(describe(error), attempt)


def budget_outcome(error: BudgetExceeded | BudgetUnavailable, attempt: int) -> Outcome:
    """A budget's refusal, or its ledger's trouble, as the outcome it is: a hard limit is
    final; a ledger that could not be advanced is retried like an unavailable model
    (jittered, so replicas do not come back at once), never the call made unchecked."""
    if isinstance(error, BudgetExceeded):
        return OverBudget(str(error))
    return ModelFailed(describe(error), attempt)


def _paused(error: DeferMessage | ParkMessage, ctx: Context) -> Outcome:
    """A handler that stopped for now, to go on later: deferred, or parked for a decision."""
    if isinstance(error, ParkMessage):
        return Parked(error.approval)
    # This delivery is a deferral, beside the earlier ones; no more than delivered.
    deferrals = min(max(error.deferrals, ctx.deferrals + 1), ctx.deliveries)
    attempt = effective_attempt(ctx.deliveries, deferrals - 1)
    return Deferred(error.delay, deferrals, describe(error), attempt)


class Processor:
    """Processes and settles one message at a time; the worker runs many at once."""

    def __init__(
        self,
        *,
        js: JetStreamContext,
        config: RuntimeConfig,
        handler: HandlerFn,
        checker: ContractChecker,
        state: StateStore,
        metrics: RuntimeMetrics,
        dead_letters: DeadLetters,
        intake: DecisionIntake | None = None,
        chaos: Chaos | None = None,
    ) -> None:
        self._js = js
        self._chaos = chaos
        """The faults a ChaosExperiment injects (``agent.chaos``), if it may name this agent."""
        self._intake = intake
        """Where decisions that resume parked messages are taken (LLM agents), if anywhere."""
        self._config = config
        self._handler = handler
        self._state = state
        self._metrics = metrics
        self._dead_letters = dead_letters
        self._checker = checker
        self._policy = Policy.of(config)
        self._timeout = config.timeout.total_seconds()
        self._progress_every = config.messaging.ack_wait.total_seconds() * float(PROGRESS_SHARE)

    async def process(self, msg: Msg) -> str:
        """Process ``msg`` and settle it; returns the outcome label for the metrics."""
        metadata = msg.metadata
        deliveries = metadata.num_delivered
        origin = Origin(msg.subject, metadata.stream, metadata.sequence.stream)
        logs.message_id.set(f"{origin.stream}:{origin.sequence}")
        if self._intake is not None and msg.subject == self._intake.subject:
            resumed = await self._resumed(msg, self._intake, deliveries)
            if resumed is None:
                await msg.ack()
                return "ignored"
            ended = resumed
        else:
            chaos = self._chaos if self._chaos is not None and self._chaos.armed else None
            roll = CALM if chaos is None else chaos.roll_message()
            if chaos is not None and roll.delay.total_seconds() > 0:
                await chaos.delay_message(msg, roll.delay, self._progress_every)
            ended = await self._outcome(msg, deliveries)
            if chaos is not None and roll.fail and self._duplicable(msg, ended, deliveries):
                label = await self._apply(
                    msg, decide(ended.outcome, self._policy), ended, deliveries, origin
                )
                await chaos.duplicate(self._js, msg)
                return label
        return await self._apply(
            msg, decide(ended.outcome, self._policy), ended, deliveries, origin
        )

    @staticmethod
    def _duplicable(msg: Msg, ended: Ended, deliveries: int) -> bool:
        """Chaos duplicates a message once: on its first delivery, when it is a CloudEvent
        (a malformed one's copy would only be a second dead letter), never a copy."""
        return (
            deliveries == 1
            and ended.event is not None
            and DUPLICATE_HEADER not in (msg.headers or {})
        )

    async def _resumed(self, msg: Msg, intake: DecisionIntake, deliveries: int) -> Ended | None:
        """A decision: the parked message it resumes, run again; None when it changes
        nothing. What fails is the decision's delivery's: handed back, it is taken again
        (the request already final with that decision resumes), and a dead letter holds
        the decision, its failure reply going to the parked message's ``replyto``."""
        try:
            event = await intake.take(msg)
        except Exception as error:  # NATS trouble: the decision is taken again later
            return Ended(Failed(f"the decision could not be taken: {describe(error)}", deliveries))
        if event is None:
            return None
        logs.message_id.set(event.id)
        logs.correlation_id.set(event.run_id)
        if self._policy.overdelivered(deliveries):
            return Ended(Overdelivered(deliveries), event)
        if event.deadline is not None and event.deadline <= datetime.now(UTC):
            return Ended(Expired(), event)
        return await self._handle(msg, event, deliveries, resumed=True)

    async def _outcome(self, msg: Msg, deliveries: int) -> Ended:
        """How processing ended."""
        try:
            event = envelope.parse(msg.headers, msg.data)
        except envelope.MalformedMessage as error:
            return Ended(Malformed(error.reason))
        logs.message_id.set(event.id)
        logs.correlation_id.set(event.run_id)
        if self._policy.overdelivered(deliveries):
            return Ended(Overdelivered(deliveries), event)
        if event.deadline is not None and event.deadline <= datetime.now(UTC):
            return Ended(Expired(), event)
        try:
            self._checker.check_input(event.data)
        except SchemaViolation as error:
            return Ended(InvalidInput(error.reason), event)
        if (refusal := reply_refusal(self._config, event.replyto)) is not None:
            return Ended(InvalidInput(refusal), event)
        return await self._handle(msg, event, deliveries)

    async def _handle(
        self, msg: Msg, event: CloudEvent, deliveries: int, *, resumed: bool = False
    ) -> Ended:
        """Run the handler, publish its outputs and reply; what failed, if anything.

        The attempt is read from the context once the handler is done: only the
        handler knows (``ctx.set_deferrals``) how many earlier deliveries were deferred.
        """
        started = time.perf_counter()
        deadline = _Deadline(msg, self._timeout, event.deadline)
        outputs = Outputs(self._js, self._config, self._checker, event, lambda: ctx.attributes)
        ctx = Context(
            event,
            attempt=deliveries,
            max_attempts=self._policy.max_attempts,
            state=self._state,
            logger=logging.getLogger(f"troupe.agent.{self._config.agent}"),
            publisher=outputs.publish,
            progress=deadline.progress,
            resumed=resumed,
        )
        outcome = await self._run(ctx, outputs, deadline)
        if isinstance(outcome, Succeeded):
            self._metrics.handler_seconds.observe(time.perf_counter() - started)
        return Ended(outcome, event, outputs.extensions())

    async def _run(self, ctx: Context, outputs: Outputs, deadline: _Deadline) -> Outcome:
        event = ctx.event
        try:
            with tracing.handling(event, self._config.agent):
                chaos = self._chaos
                handling = (
                    self._handler(ctx)
                    if chaos is None or not chaos.armed
                    else self._chaotic(chaos, ctx)
                )
                result = await deadline.run(handling)
                if result is not None:
                    await outputs.publish(result, None, None)
                await send_reply(
                    self._js,
                    self._config,
                    event,
                    f"{event.type}.{RESULT_TYPE_SUFFIX}",
                    result,
                    outputs.extensions(),
                )
        except SchemaViolation as error:
            return InvalidOutput(error.reason)
        except Undeliverable as error:
            return Undelivered(error.reason)
        except AgentError as error:
            return AgentFailed(error.state, describe(error), ctx.attempt)
        except AttemptsExhausted as error:
            return Overdelivered(error.deliveries, error.deferrals)
        except (DeferMessage, ParkMessage) as error:
            return _paused(error, ctx)
        except ModelError as error:
            return model_outcome(error, ctx.attempt)
        except (BudgetExceeded, BudgetUnavailable) as error:
            return budget_outcome(error, ctx.attempt)
        except SessionBusy as error:
            return SessionRefused(DeadLetterReason.SESSION_BUSY, str(error))
        except SessionStopped as error:
            return SessionRefused(error.reason, str(error))
        except Exception as error:
            return Failed(describe(error), ctx.attempt)
        except asyncio.CancelledError as error:
            if cancelled_by_us():
                raise  # shutdown: the worker hands the message back untouched
            return _contained(error, ctx.attempt, "raised by the handler, not by a shutdown")
        except BaseException as error:  # SystemExit, KeyboardInterrupt: never the process's end
            return _contained(error, ctx.attempt, "contained; the runtime keeps running")
        return Succeeded(outputs.count)

    async def _chaotic(self, chaos: Chaos, ctx: Context) -> Any:
        """The handler behind the faults injected into it: a wait under the handler's
        timeout, then maybe ``InjectedFault``, a failed attempt like any other."""
        await chaos.before_handler()
        return await self._handler(ctx)

    async def _apply(
        self, msg: Msg, settlement: Settlement, ended: Ended, deliveries: int, origin: Origin
    ) -> str:
        match settlement:
            case Ack():
                await msg.ack()
                if isinstance(ended.outcome, Parked):
                    logger.info("parked until Approval %s is decided", ended.outcome.approval)
                    return "parked"
                if isinstance(ended.outcome, Succeeded):
                    logger.debug("handled with %d outputs", ended.outcome.outputs)
                return "succeeded"
            case Nak(delay, error, counted=False):
                logger.warning(
                    "delivery %d deferred (%s); again in %gs, no attempt burnt",
                    deliveries,
                    error,
                    delay,
                )
                await msg.nak(delay=delay)
                return "deferred"
            case Nak(delay, error):
                logger.warning("delivery %d failed (%s); retrying in %gs", deliveries, error, delay)
                await msg.nak(delay=delay)
                self._metrics.retries.inc()
                return "retried"
            case DeadLetter(reason, error):
                await self._dead_letter(msg, reason, error, deliveries, origin, ended)
                return "dead_lettered"
            case _:
                assert_never(settlement)

    async def _dead_letter(
        self,
        msg: Msg,
        reason: DeadLetterReason,
        error: str,
        deliveries: int,
        origin: Origin,
        ended: Ended,
    ) -> None:
        """Dead-letter ``msg``, telling ``replyto`` first when the envelope parsed."""
        await self._reply_failure(ended, reason, error)
        if self._dead_letters.enabled:
            await self._dead_letters.send(
                msg.data,
                msg.headers,
                reason=reason,
                error=error,
                attempts=deliveries,
                origin=origin,
            )
            self._metrics.dead_lettered.labels(reason.value).inc()
            logger.warning("dead-lettered (%s): %s", reason.value, error)
        else:
            logger.warning("dropped, dead letters are disabled (%s): %s", reason.value, error)
        await msg.ack()

    async def _reply_failure(self, ended: Ended, reason: DeadLetterReason, error: str) -> None:
        event = ended.event
        if event is None:
            return  # without an envelope there is no replyto to answer
        data = {"error": error, "reason": reason.value}
        try:
            await send_reply(self._js, self._config, event, ERROR_TYPE, data, ended.extensions)
        except Undeliverable as refused:  # the letter still matters more than the reply
            logger.warning("the failure reply to %s was not sent: %s", event.replyto, refused)
