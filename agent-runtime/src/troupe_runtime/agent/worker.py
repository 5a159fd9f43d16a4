"""The message loop: take messages by priority, enforce the Agent's policies, run the handler.

One fetch loop feeds at most ``maxInFlight`` handler tasks. Each round asks
the priority levels for what they hold now, in the shares the scheduler
allots; only when every level is empty does it wait, on all levels at once.

Each message is processed and settled by ``processing.Processor`` (what to do
about how it ended is ``settle.decide``'s, a pure function). A message whose
task is cancelled, or whose settling itself fails, is handed back to JetStream;
so is every fetched message not yet started when dispatching fails or stops.
A message waiting for a rate-limit token is reported in progress meanwhile, so
JetStream does not redeliver it elsewhere when the wait exceeds ``ackWait``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from troupe_runtime.agent.chaos import Chaos
from troupe_runtime.agent.context import DecisionIntake, HandlerFn
from troupe_runtime.agent.deadletter import DeadLetters
from troupe_runtime.agent.processing import Processor, describe
from troupe_runtime.agent.ratelimit import Limiter
from troupe_runtime.agent.scheduling import PriorityScheduler
from troupe_runtime.agent.schemas import ContractChecker
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.policies import PROGRESS_SHARE
from troupe_runtime.nats.pull import Puller
from troupe_runtime.serving.metrics import RuntimeMetrics
from troupe_runtime.state import StateStore

logger = logging.getLogger(__name__)

IDLE_WAIT_SECONDS = 1.0
ERROR_BACKOFF_SECONDS = 1.0


async def _hand_back(msg: Msg, delay: float | None = None) -> None:
    """NAK, if the connection still allows; else JetStream redelivers after ack_wait."""
    with contextlib.suppress(nats.errors.Error):
        await msg.nak(delay=delay)


class Worker:
    """Fetches and dispatches the messages of one agent replica; the processor settles each."""

    def __init__(
        self,
        *,
        nc: Client,
        js: JetStreamContext,
        config: RuntimeConfig,
        handler: HandlerFn,
        checker: ContractChecker,
        state: StateStore,
        metrics: RuntimeMetrics,
        dead_letters: DeadLetters,
        limiter: Limiter | None,
        intake: DecisionIntake | None = None,
        chaos: Chaos | None = None,
    ) -> None:
        self._metrics = metrics
        self._limiter = limiter
        self._processor = Processor(
            js=js,
            config=config,
            handler=handler,
            checker=checker,
            state=state,
            metrics=metrics,
            dead_letters=dead_letters,
            intake=intake,
            chaos=chaos,
        )
        levels = config.messaging.priority_levels
        self._pullers = [
            Puller(nc, config.inbox_stream, config.consumer_name(priority))
            for priority in range(levels)
        ]
        self._scheduler = PriorityScheduler(levels)
        self._max_in_flight = config.messaging.max_in_flight
        # Part of the bound the Agent CRD's timeout rule rests on (policies.fits_ack_wait).
        self._progress_every = config.messaging.ack_wait.total_seconds() * float(PROGRESS_SHARE)
        self._slots = asyncio.Semaphore(self._max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._task_done = asyncio.Event()
        self._waiting: dict[int, asyncio.Task[list[Msg]]] = {}
        self._stopping = asyncio.Event()

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
        try:
            await self._dispatch(self._collect_waiting())
        except Exception:
            logger.exception("dispatching the last messages failed; they were handed back")

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
        """Start one task per message; hand back, at once, every message not started.

        A message is only ever handled or handed back: if waiting for the rate
        limit fails (the KV bucket unreachable, say) or the worker is stopped
        meanwhile, the messages not yet started are NAKed instead of waiting
        out ``ackWait``.
        """
        for index, msg in enumerate(messages):
            try:
                started = self._limiter is None or await self._throttle(messages[index:])
            except BaseException:
                await asyncio.gather(
                    *(_hand_back(rest, ERROR_BACKOFF_SECONDS) for rest in messages[index:])
                )
                raise
            if not started:
                await asyncio.gather(*(_hand_back(rest) for rest in messages[index:]))
                return
            task = asyncio.create_task(self._handle(msg))
            self._tasks.add(task)
            task.add_done_callback(self._forget)

    async def _throttle(self, pending: list[Msg]) -> bool:
        """Wait for a rate-limit token; False when the worker is stopped first.

        Meanwhile every pending message is reported in progress, so one that waits
        longer than ``ackWait`` is not redelivered (to another replica).
        """
        assert self._limiter is not None
        acquiring = asyncio.ensure_future(self._limiter.acquire())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                done, _ = await asyncio.wait(
                    {acquiring, stopping},
                    timeout=self._progress_every,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if acquiring in done:
                    if acquiring.result():
                        self._metrics.throttled.inc()
                    return True
                if stopping in done:
                    return False
                for msg in pending:
                    await msg.in_progress()
        finally:
            stopping.cancel()
            if not acquiring.done():
                acquiring.cancel()
                await asyncio.gather(acquiring, return_exceptions=True)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._task_done.set()

    async def _handle(self, msg: Msg) -> None:
        async with self._slots:
            self._metrics.in_flight.inc()
            try:
                label = await self._processor.process(msg)
            except asyncio.CancelledError:
                await _hand_back(msg)
                self._metrics.messages.labels("requeued").inc()
                raise
            except Exception:
                # The safety net: whatever failed (a lost connection while
                # dead-lettering, say), the message comes back later.
                logger.exception("could not settle message; it will be redelivered")
                await _hand_back(msg, ERROR_BACKOFF_SECONDS)
                label = "retried"
            finally:
                self._metrics.in_flight.dec()
            self._metrics.messages.labels(label).inc()
