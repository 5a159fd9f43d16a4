"""One message, from delivery to settlement: run it, decide, apply the decision.

Processing parses the envelope and checks the input schema, runs the handler
under the timeout, publishes its outputs and the reply and waits for JetStream
to store them, and describes how that ended as an ``Outcome``. ``settle.decide``
says what to do about it; this module only does it: acknowledge, hand back
with the delay, or dead-letter (answering ``replyto``) and acknowledge.

Whatever handler code raises, ``SystemExit``, ``KeyboardInterrupt`` and its own
``CancelledError`` included, is a failed attempt, never the end of the process.
Only our own cancellation of the task (shutdown) passes through, so the worker
hands the message back untouched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any, assert_never

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from troupe_runtime.agent.context import AgentError, Context, HandlerFn
from troupe_runtime.agent.deadletter import DeadLetters
from troupe_runtime.agent.outputs import Outputs, Undeliverable, reply_refusal, send_reply
from troupe_runtime.agent.schemas import ContractChecker, SchemaViolation
from troupe_runtime.agent.settle import (
    Ack,
    AgentFailed,
    DeadLetter,
    Expired,
    Failed,
    InvalidInput,
    InvalidOutput,
    Malformed,
    Nak,
    Outcome,
    Overdelivered,
    Policy,
    Settlement,
    Succeeded,
    Undelivered,
    decide,
)
from troupe_runtime.contract import envelope
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.dead_letters import DeadLetterReason, Origin
from troupe_runtime.contract.envelope import ERROR_TYPE, RESULT_TYPE_SUFFIX, CloudEvent
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
    ) -> None:
        self._js = js
        self._config = config
        self._handler = handler
        self._state = state
        self._metrics = metrics
        self._dead_letters = dead_letters
        self._checker = checker
        self._policy = Policy.of(config)
        self._timeout = config.timeout.total_seconds()

    async def process(self, msg: Msg) -> str:
        """Process ``msg`` and settle it; returns the outcome label for the metrics."""
        metadata = msg.metadata
        attempt = metadata.num_delivered
        origin = Origin(msg.subject, metadata.stream, metadata.sequence.stream)
        logs.message_id.set(f"{origin.stream}:{origin.sequence}")
        event, outcome = await self._outcome(msg, attempt)
        return await self._apply(
            msg, decide(outcome, self._policy), outcome, attempt, origin, event
        )

    async def _outcome(self, msg: Msg, attempt: int) -> tuple[CloudEvent | None, Outcome]:
        """How processing ended, with the parsed envelope (None when malformed)."""
        try:
            event = envelope.parse(msg.headers, msg.data)
        except envelope.MalformedMessage as error:
            return None, Malformed(error.reason)
        logs.message_id.set(event.id)
        logs.correlation_id.set(event.run_id)
        if attempt > self._policy.max_attempts:
            return event, Overdelivered(attempt)
        if event.deadline is not None and event.deadline <= datetime.now(UTC):
            return event, Expired()
        try:
            self._checker.check_input(event.data)
        except SchemaViolation as error:
            return event, InvalidInput(error.reason)
        if (refusal := reply_refusal(self._config, event.replyto)) is not None:
            return event, InvalidInput(refusal)
        return event, await self._handle(msg, event, attempt)

    async def _handle(self, msg: Msg, event: CloudEvent, attempt: int) -> Outcome:
        """Run the handler, publish its outputs and reply; what failed, if anything."""
        started = time.perf_counter()
        outputs = Outputs(self._js, self._config, self._checker, event)
        try:
            with tracing.handling(event, self._config.agent):
                result = await self._run_handler(msg, event, attempt, outputs)
                if result is not None:
                    await outputs.publish(result, None, None)
                await send_reply(
                    self._js, self._config, event, f"{event.type}.{RESULT_TYPE_SUFFIX}", result
                )
        except SchemaViolation as error:
            return InvalidOutput(error.reason)
        except Undeliverable as error:
            return Undelivered(error.reason)
        except AgentError as error:
            return AgentFailed(error.state, describe(error), attempt)
        except Exception as error:
            return Failed(describe(error), attempt)
        except asyncio.CancelledError as error:
            if cancelled_by_us():
                raise  # shutdown: the worker hands the message back untouched
            return _contained(error, attempt, "raised by the handler, not by a shutdown")
        except BaseException as error:  # SystemExit, KeyboardInterrupt: never the process's end
            return _contained(error, attempt, "contained; the runtime keeps running")
        self._metrics.handler_seconds.observe(time.perf_counter() - started)
        return Succeeded(outputs.count)

    async def _run_handler(
        self, msg: Msg, event: CloudEvent, attempt: int, outputs: Outputs
    ) -> Any:
        loop = asyncio.get_running_loop()
        latest = float("inf")
        if event.deadline is not None:
            latest = loop.time() + (event.deadline - datetime.now(UTC)).total_seconds()
        try:
            async with asyncio.timeout_at(min(loop.time() + self._timeout, latest)) as scope:

                async def progress() -> None:
                    await msg.in_progress()
                    scope.reschedule(min(loop.time() + self._timeout, latest))

                ctx = Context(
                    event,
                    attempt=attempt,
                    state=self._state,
                    logger=logging.getLogger(f"troupe.agent.{self._config.agent}"),
                    publisher=outputs.publish,
                    progress=progress,
                )
                return await self._handler(ctx)
        except TimeoutError as error:
            if scope.expired():
                if loop.time() >= latest:
                    raise HandlerTimeout(
                        f"handler did not finish before the event's deadline {event.deadline}"
                    ) from error
                raise HandlerTimeout(
                    f"handler did not finish within {self._timeout:g}s "
                    "(call ctx.progress() to extend)"
                ) from error
            raise

    async def _apply(
        self,
        msg: Msg,
        settlement: Settlement,
        outcome: Outcome,
        attempt: int,
        origin: Origin,
        event: CloudEvent | None,
    ) -> str:
        match settlement:
            case Ack():
                await msg.ack()
                if isinstance(outcome, Succeeded):
                    logger.debug("handled with %d outputs", outcome.outputs)
                return "succeeded"
            case Nak(delay, error):
                logger.warning("attempt %d failed (%s); retrying in %gs", attempt, error, delay)
                await msg.nak(delay=delay)
                self._metrics.retries.inc()
                return "retried"
            case DeadLetter(reason, error):
                await self._dead_letter(msg, reason, error, attempt, origin, event)
                return "dead_lettered"
            case _:
                assert_never(settlement)

    async def _dead_letter(
        self,
        msg: Msg,
        reason: DeadLetterReason,
        error: str,
        attempt: int,
        origin: Origin,
        event: CloudEvent | None,
    ) -> None:
        """Dead-letter ``msg``; ``event`` is its parsed envelope, None when malformed."""
        await self._reply_failure(event, reason, error)
        if self._dead_letters.enabled:
            await self._dead_letters.send(
                msg.data, msg.headers, reason=reason, error=error, attempts=attempt, origin=origin
            )
            self._metrics.dead_lettered.labels(reason.value).inc()
            logger.warning("dead-lettered (%s): %s", reason.value, error)
        else:
            logger.warning("dropped, dead letters are disabled (%s): %s", reason.value, error)
        await msg.ack()

    async def _reply_failure(
        self, event: CloudEvent | None, reason: DeadLetterReason, error: str
    ) -> None:
        if event is None:
            return  # without an envelope there is no replyto to answer
        data = {"error": error, "reason": reason.value}
        try:
            await send_reply(self._js, self._config, event, ERROR_TYPE, data)
        except Undeliverable as refused:  # the letter still matters more than the reply
            logger.warning("the failure reply to %s was not sent: %s", event.replyto, refused)
