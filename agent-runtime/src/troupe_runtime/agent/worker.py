"""The message loop: take messages by priority, enforce the Agent's policies, run the handler.

One fetch loop feeds at most ``maxInFlight`` handler tasks. Each round asks
the priority levels for what they hold now, in the shares the scheduler
allots; only when every level is empty does it wait, on all levels at once.

Per message: parse the envelope and check the input schema (a failure goes
straight to the dead-letter stream), run the handler under the timeout,
publish its outputs with ids derived from the input's and wait for JetStream
to store them, and only then acknowledge the input. A failed attempt is handed
back with the declared backoff; the last failed attempt is dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import Header

from troupe_runtime.agent.context import AgentError, Context, HandlerFn
from troupe_runtime.agent.deadletter import DeadLetters
from troupe_runtime.agent.ratelimit import Limiter
from troupe_runtime.agent.scheduling import PriorityScheduler
from troupe_runtime.agent.schemas import ContractChecker, SchemaViolation
from troupe_runtime.contract import envelope
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.dead_letters import DeadLetterReason, Origin
from troupe_runtime.contract.envelope import (
    ERROR_TYPE,
    OUTPUT_TYPE_SUFFIX,
    RESULT_TYPE_SUFFIX,
    CloudEvent,
    MalformedMessage,
)
from troupe_runtime.contract.policies import retry_delay
from troupe_runtime.nats.pull import Puller
from troupe_runtime.serving import logs, tracing
from troupe_runtime.serving.metrics import RuntimeMetrics
from troupe_runtime.state import StateStore

logger = logging.getLogger(__name__)

IDLE_WAIT_SECONDS = 1.0
ERROR_BACKOFF_SECONDS = 1.0
# Follow-up index of the one reply an event with ``replyto`` gets; outputs count from 0.
REPLY_INDEX = -1


def output_msg_id(event_id: str, subject: str) -> str:
    return f"{event_id}:{subject}"


def describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


async def _hand_back(msg: Msg, delay: float | None = None) -> None:
    """NAK, if the connection still allows; else JetStream redelivers after ack_wait."""
    with contextlib.suppress(nats.errors.Error):
        await msg.nak(delay=delay)


class HandlerTimeout(Exception):
    """The handler ran past its deadline and was cancelled."""


class Outputs:
    """Publishes one input's outputs, numbering them so their ids are deterministic."""

    def __init__(
        self,
        js: JetStreamContext,
        config: RuntimeConfig,
        checker: ContractChecker,
        cause: CloudEvent,
    ) -> None:
        self._js = js
        self._config = config
        self._checker = checker
        self._cause = cause
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    async def publish(self, data: Any, type: str | None, subject: str | None) -> None:
        subjects = self._config.contract.output_subjects
        if subject is not None and subject not in subjects:
            raise ValueError(
                f"subject {subject!r} is not in contract.outputSubjects {subjects}; declare it"
            )
        self._checker.check_output(data)
        event = self._cause.follow_up(
            source=f"/{self._config.namespace}/{self._config.agent}",
            type=type or f"{self._cause.type}.{OUTPUT_TYPE_SUFFIX}",
            data=data,
            index=self._count,
            scope=f"{self._config.namespace}/{self._config.agent}",
            traceparent=tracing.outgoing(self._cause.traceparent),
        )
        self._count += 1
        headers, payload = envelope.to_binary(event)
        targets = [subject] if subject is not None else subjects
        await asyncio.gather(
            *(
                self._js.publish(
                    target,
                    payload,
                    headers={**headers, Header.MSG_ID.value: output_msg_id(event.id, target)},
                )
                for target in targets
            )
        )


async def send_reply(
    js: JetStreamContext, config: RuntimeConfig, cause: CloudEvent, type: str, data: Any
) -> None:
    """Tell whoever set ``replyto`` (a workflow engine) how ``cause`` ended.

    The reply's id is deterministic, so a redelivered input replies once."""
    if cause.replyto is None:
        return
    scope = f"{config.namespace}/{config.agent}"
    reply = cause.follow_up(
        source=f"/{scope}",
        type=type,
        data=data,
        index=REPLY_INDEX,
        scope=scope,
        traceparent=tracing.outgoing(cause.traceparent),
    )
    headers, payload = envelope.to_binary(reply)
    await js.publish(cause.replyto, payload, headers={**headers, Header.MSG_ID.value: reply.id})


class Worker:
    """Fetches, dispatches and settles the messages of one agent replica."""

    def __init__(
        self,
        *,
        nc: Client,
        js: JetStreamContext,
        config: RuntimeConfig,
        handler: HandlerFn,
        state: StateStore,
        metrics: RuntimeMetrics,
        dead_letters: DeadLetters,
        limiter: Limiter | None,
    ) -> None:
        self._js = js
        self._config = config
        self._handler = handler
        self._state = state
        self._metrics = metrics
        self._dead_letters = dead_letters
        self._limiter = limiter
        self._checker = ContractChecker(config.contract)
        levels = config.messaging.priority_levels
        self._pullers = [
            Puller(nc, config.inbox_stream, config.consumer_name(priority))
            for priority in range(levels)
        ]
        self._scheduler = PriorityScheduler(levels)
        self._max_in_flight = config.messaging.max_in_flight
        self._slots = asyncio.Semaphore(self._max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._task_done = asyncio.Event()
        self._waiting: dict[int, asyncio.Task[list[Msg]]] = {}
        self._stopping = asyncio.Event()
        self._retryable = {state.name: state.retryable for state in config.contract.error_states}
        self._timeout = config.timeout.total_seconds()
        self._backoff = [delay.total_seconds() for delay in config.retry.backoff]

    async def start(self) -> None:
        for puller in self._pullers:
            await puller.start()

    def stop(self) -> None:
        """Stop fetching; messages already fetched are still handled."""
        self._stopping.set()
        self._task_done.set()

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._round()
            except Exception:
                logger.exception("fetching failed; trying again")
                await self._stopped_within(ERROR_BACKOFF_SECONDS)
        # Waiting requests may still bring a message; it is handled, not stranded.
        for task in self._waiting.values():
            await asyncio.wait([task])
        await self._dispatch(self._collect_waiting())

    async def finish(self, grace: float) -> None:
        """Let in-flight handlers finish within ``grace``; hand back the rest."""
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        for puller in self._pullers:
            await puller.stop()

    async def _stopped_within(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return

    async def _capacity(self) -> int:
        while len(self._tasks) >= self._max_in_flight and not self._stopping.is_set():
            self._task_done.clear()
            await self._task_done.wait()
        free = self._max_in_flight - len(self._tasks)
        # A rate-limited agent takes one message per token, so none waits long unacknowledged.
        return 1 if self._limiter is not None else free

    async def _round(self) -> None:
        wanted = await self._capacity()
        if self._stopping.is_set():
            return
        messages = self._collect_waiting()
        if len(messages) < wanted:
            messages += await self._pull_now(wanted - len(messages))
        if not messages:
            messages = await self._pull_waiting()
        await self._dispatch(messages)

    async def _pull_now(self, wanted: int) -> list[Msg]:
        """What the levels hold now: first in the scheduler's shares, then highest first."""
        shares = self._scheduler.allot(wanted)
        idle = [p for p in range(len(self._pullers)) if p not in self._waiting]
        asked = [p for p in idle if shares[p]]
        answers = await asyncio.gather(*(self._pullers[p].pull(shares[p]) for p in asked))
        messages = [msg for answer in answers for msg in answer]
        drained = {p for p, answer in zip(asked, answers, strict=True) if len(answer) < shares[p]}
        for priority in sorted(idle, reverse=True):
            if len(messages) >= wanted:
                break
            if priority not in drained:
                messages += await self._pullers[priority].pull(wanted - len(messages))
        return messages

    async def _pull_waiting(self) -> list[Msg]:
        """Wait for the first message on any level (or for the stop)."""
        for priority, puller in enumerate(self._pullers):
            if priority not in self._waiting:
                self._waiting[priority] = asyncio.create_task(puller.pull(1, IDLE_WAIT_SECONDS))
        stopping = asyncio.create_task(self._stopping.wait())
        await asyncio.wait([stopping, *self._waiting.values()], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        return self._collect_waiting()

    def _collect_waiting(self) -> list[Msg]:
        messages: list[Msg] = []
        for priority, task in list(self._waiting.items()):
            if not task.done():
                continue
            del self._waiting[priority]
            if (error := task.exception()) is not None:
                logger.warning("waiting on priority %d failed: %s", priority, describe(error))
            else:
                messages += task.result()
        return messages

    async def _dispatch(self, messages: list[Msg]) -> None:
        for msg in messages:
            if self._limiter is not None and await self._limiter.acquire():
                self._metrics.throttled.inc()
            task = asyncio.create_task(self._handle(msg))
            self._tasks.add(task)
            task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._task_done.set()

    async def _handle(self, msg: Msg) -> None:
        async with self._slots:
            self._metrics.in_flight.inc()
            try:
                outcome = await self._process(msg)
            except asyncio.CancelledError:
                await _hand_back(msg)
                self._metrics.messages.labels("requeued").inc()
                raise
            except Exception:
                # The safety net: whatever failed (a lost connection while
                # dead-lettering, say), the message comes back later.
                logger.exception("could not settle message; it will be redelivered")
                await _hand_back(msg, ERROR_BACKOFF_SECONDS)
                outcome = "retried"
            finally:
                self._metrics.in_flight.dec()
            self._metrics.messages.labels(outcome).inc()

    async def _process(self, msg: Msg) -> str:
        metadata = msg.metadata
        attempt = metadata.num_delivered
        origin = Origin(msg.subject, metadata.stream, metadata.sequence.stream)
        logs.message_id.set(f"{origin.stream}:{origin.sequence}")
        try:
            event = envelope.parse(msg.headers, msg.data)
            logs.message_id.set(event.id)
            logs.correlation_id.set(event.run_id)
            if event.deadline is not None and event.deadline <= datetime.now(UTC):
                return await self._dead_letter(
                    msg, DeadLetterReason.EXPIRED, "deadline passed", attempt, origin, event
                )
            self._checker.check_input(event.data)
        except MalformedMessage as error:
            return await self._dead_letter(
                msg, DeadLetterReason.MALFORMED, error.reason, attempt, origin, None
            )
        except SchemaViolation as error:
            return await self._dead_letter(
                msg, DeadLetterReason.INVALID_INPUT, error.reason, attempt, origin, event
            )
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
            return await self._dead_letter(
                msg, DeadLetterReason.INVALID_OUTPUT, error.reason, attempt, origin, event
            )
        except AgentError as error:
            if not self._retryable.get(error.state, True):
                return await self._dead_letter(
                    msg, DeadLetterReason.REJECTED, describe(error), attempt, origin, event
                )
            return await self._retry_or_dead_letter(msg, error, attempt, origin, event)
        except Exception as error:
            return await self._retry_or_dead_letter(msg, error, attempt, origin, event)
        self._metrics.handler_seconds.observe(time.perf_counter() - started)
        await msg.ack()
        logger.debug("handled with %d outputs", outputs.count)
        return "succeeded"

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
                raise HandlerTimeout(
                    f"handler did not finish within {self._timeout:g}s "
                    "(call ctx.progress() to extend)"
                ) from error
            raise

    async def _retry_or_dead_letter(
        self, msg: Msg, error: Exception, attempt: int, origin: Origin, event: CloudEvent
    ) -> str:
        if attempt >= self._config.retry.max_attempts:
            return await self._dead_letter(
                msg, DeadLetterReason.EXHAUSTED, describe(error), attempt, origin, event
            )
        delay = retry_delay(self._backoff, attempt)
        logger.warning("attempt %d failed (%s); retrying in %gs", attempt, describe(error), delay)
        await msg.nak(delay=delay)
        self._metrics.retries.inc()
        return "retried"

    async def _dead_letter(
        self,
        msg: Msg,
        reason: DeadLetterReason,
        error: str,
        attempt: int,
        origin: Origin,
        event: CloudEvent | None,
    ) -> str:
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
        return "dead_lettered"

    async def _reply_failure(
        self, event: CloudEvent | None, reason: DeadLetterReason, error: str
    ) -> None:
        if event is None:
            return  # without an envelope there is no replyto to answer
        data = {"error": error, "reason": reason.value}
        await send_reply(self._js, self._config, event, ERROR_TYPE, data)
