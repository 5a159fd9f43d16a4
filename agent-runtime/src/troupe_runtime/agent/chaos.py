"""Chaos at run time: the faults a ChaosExperiment injects into this agent, held and rolled.

The operator writes one ``AgentFaults`` per targeted Agent into the namespace's chaos bucket
(``contract.chaos``); each replica watches its own key (``naming.chaos_faults_key``) and keeps
the entry in memory. No message pays any I/O for chaos: with no experiment naming the agent,
an injection point costs one attribute check (``Chaos.armed``). An entry in force is checked
against the clock at every roll, so its ``until`` ends it even when nobody removes it (an
operator that died mid-experiment).

What is watched is survived, never obeyed blindly: an entry that does not parse injects
nothing and is logged (once per revision); a bucket that does not exist is created with the
operator's config (``provision.chaos_bucket_config``) so the watch can start before any
experiment; a watch that cannot start (no permission, NATS in trouble) leaves the agent with
no faults, logged, never unable to serve.

The injection points, and why each is the one it is:

- handler (``before_handler``, in ``processing``): a wait, then ``InjectedFault``, which the
  runtime takes as any handler exception, so the Agent's retries and dead letters apply and
  the letter's error says ``INJECTED_ERROR``; the wait runs under the handler's timeout, as a
  slow handler would;
- messages (``processing``): a delay before handling (reporting progress, so JetStream does
  not redeliver it meanwhile) and duplication: once settled, the message is published to the
  inbox again with the same envelope (same event id) but without ``Nats-Msg-Id``, so
  JetStream stores it as a new message, the way a producer's retry past the duplicate window
  arrives. The copy carries ``DUPLICATE_HEADER`` and is never duplicated again. Whatever the
  handler publishes has ids derived from the event's, so the copy's outputs and reply are
  dropped by JetStream's deduplication: that is what an experiment proves;
- model calls and tool calls (``agent.llm.chaos``): per model of the chain, so an injected
  error takes the breaker and the fallback; a tool's error is the error result the model reads;
- the NATS connection (``drop_connections``): its socket is cut, as a network cut would, and
  nats-py reconnects.

Every injected fault counts in ``troupe_chaos_injected_total{point,kind}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Literal

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KV_DEL, KV_MARKER_REASON, KV_OP, KV_PURGE

from troupe_runtime.contract import naming
from troupe_runtime.contract.chaos import (
    CALM,
    INJECTED_ERROR,
    AgentFaults,
    Point,
    Roll,
    roll_call,
    roll_message,
)
from troupe_runtime.nats.provision import chaos_bucket_config
from troupe_runtime.serving.metrics import ChaosMetrics

logger = logging.getLogger(__name__)

DUPLICATE_HEADER = "Troupe-Chaos-Duplicate"
"""Marks the copy of a message chaos duplicated (its value: the experiment's name): a copy
is not duplicated again, or a duplicate ratio of 1 would never stop."""
START_DEADLINE_SECONDS = 10.0
"""How long starting the watch may take; past it the session serves without faults."""

Kind = Literal["latency", "error", "delay", "duplicate", "drop"]
Sleep = Callable[[float], Awaitable[None]]


def _now() -> datetime:
    return datetime.now(UTC)


class InjectedFault(Exception):
    """A failure chaos injected in place of the handler: an ordinary failed attempt."""


class Chaos:
    """The faults in force for one agent, kept current by a watch on its key.

    ``rng`` and ``clock`` are injectable so tests decide the draws and the time; ``sleep``
    too, so a unit test sees the latency asked for without waiting it out.
    """

    def __init__(
        self,
        namespace: str,
        agent: str,
        metrics: ChaosMetrics | None = None,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], datetime] = _now,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.namespace = namespace
        self.agent = agent
        self.key = naming.chaos_faults_key(agent)
        self.entry: AgentFaults | None = None
        """The last entry that parsed and was in force when it arrived; cleared at the
        first roll past its ``until``."""
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._clock = clock
        self.sleep = sleep
        self._changed = asyncio.Event()
        self._sub: JetStreamContext.PushSubscription | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def armed(self) -> bool:
        """Whether any fault may be in force: the one check every message pays."""
        return self.entry is not None

    def in_force(self) -> bool:
        """Whether faults apply now, changing nothing (the ``troupe_chaos_active`` gauge's
        value: a scrape may come from anywhere)."""
        entry = self.entry
        return entry is not None and entry.active(self._clock())

    def current(self) -> AgentFaults | None:
        """The entry in force now, or None (an expired one is forgotten here)."""
        entry = self.entry
        if entry is None:
            return None
        if not entry.active(self._clock()):
            self.entry = None
            self._changed.set()
            logger.info("ChaosExperiment %s's faults ended at %s", entry.experiment, entry.until)
            return None
        return entry

    def update(self, raw: bytes | None, revision: int = 0) -> None:
        """Take one value of the key (None: deleted or purged); never raises."""
        if raw is None:
            if self.entry is not None:
                logger.info("the faults of ChaosExperiment %s were removed", self.entry.experiment)
            self._set(None)
            return
        try:
            entry = AgentFaults.model_validate_json(raw)
        except ValueError as error:  # pydantic's ValidationError, bad UTF-8, anything
            logger.error(
                "chaos entry %s (revision %d) does not parse; no faults are injected: %s",
                self.key,
                revision,
                str(error).splitlines()[0][:200],
            )
            self._set(None)
            return
        if not entry.active(self._clock()):
            logger.info(
                "chaos entry %s (revision %d, ChaosExperiment %s) is not in force (ended, or "
                "ends later than any run can, at %s; or injects nothing)",
                self.key,
                revision,
                entry.experiment,
                entry.until,
            )
            self._set(None)
            return
        logger.warning(
            "ChaosExperiment %s (run %s) injects faults into this agent until %s: %s",
            entry.experiment,
            entry.run,
            entry.until,
            entry.faults.model_dump_json(by_alias=True, exclude_none=True),
        )
        self._set(entry)

    def _set(self, entry: AgentFaults | None) -> None:
        self.entry = entry
        self._changed.set()

    def count(self, point: str, kind: Kind) -> None:
        if self._metrics is not None:
            self._metrics.injected.labels(point, kind).inc()

    def reason(self, point: str) -> str:
        """The text of an injected error: ``INJECTED_ERROR``, the point and the experiment."""
        entry = self.entry
        experiment = f", ChaosExperiment {entry.experiment}" if entry is not None else ""
        return f"{INJECTED_ERROR} ({point}{experiment})"

    # Rolls.

    def roll(self, point: Point) -> Roll:
        """One call's fate at ``point`` (counted); ``CALM`` when nothing is in force."""
        entry = self.current()
        if entry is None:
            return CALM
        fault = entry.faults.call(point)
        if fault is None:
            return CALM
        roll = roll_call(fault, self._rng.random(), self._rng.random())
        if roll.delay > timedelta(0):
            self.count(point, "latency")
        if roll.fail:
            self.count(point, "error")
        return roll

    def roll_message(self) -> Roll:
        """One message's fate: ``delay`` first, ``fail`` meaning "deliver it again"."""
        entry = self.current()
        if entry is None or entry.faults.messages is None:
            return CALM
        return roll_message(entry.faults.messages, self._rng.random(), self._rng.random())

    async def before_handler(self) -> None:
        """The handler's injected latency, then its injected failure (``InjectedFault``)."""
        roll = self.roll("handler")
        if roll.delay > timedelta(0):
            await self.sleep(roll.delay.total_seconds())
        if roll.fail:
            raise InjectedFault(self.reason("handler"))

    # Messages.

    async def delay_message(self, msg: Msg, delay: timedelta, progress_every: float) -> None:
        """Hold ``msg`` for ``delay`` before its handler runs, telling JetStream it is in
        progress every ``progress_every`` seconds (the worker's share of ``ackWait``), so a
        delay longer than ``ackWait`` is not redelivered meanwhile."""
        self.count("messages", "delay")
        left = delay.total_seconds()
        while left > 0:
            step = min(left, max(progress_every, 0.1))
            await self.sleep(step)
            left -= step
            if left > 0:
                with contextlib.suppress(nats.errors.Error):
                    await msg.in_progress()

    async def duplicate(self, js: JetStreamContext, msg: Msg) -> None:
        """Publish ``msg`` to its subject again as a new message of the same event.

        Best effort: a copy that cannot be published is logged, never the message's failure
        (it was settled already)."""
        entry = self.entry
        headers = {
            name: value
            for name, value in (msg.headers or {}).items()
            if not name.startswith("Nats-")  # Nats-Msg-Id above all: JetStream would drop it
        }
        headers[DUPLICATE_HEADER] = entry.experiment if entry is not None else "chaos"
        try:
            await js.publish(msg.subject, msg.data, headers=headers)
        except Exception as error:
            logger.warning("chaos could not duplicate a message: %s", error)
            return
        self.count("messages", "duplicate")

    # The connection.

    def _drop_every(self) -> float | None:
        entry = self.current()
        if entry is None or entry.faults.connection is None:
            return None
        return max(entry.faults.connection.drop_every.total_seconds(), 0.1)

    async def drop_connections(self, nc: Client) -> None:
        """Cut ``nc``'s socket every ``dropEvery`` while a connection fault is in force.

        Waits on changes of the entry (and its ``until``) otherwise, so an agent no
        experiment names has one sleeping task per session and nothing else."""
        while True:
            self._changed.clear()
            every = self._drop_every()
            entry = self.entry
            if every is None or entry is None:
                await self._changed.wait()
                continue
            left = (entry.until - self._clock()).total_seconds()
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that
            # lands as the event is set, and the session's teardown would wait for ever.
            try:
                async with asyncio.timeout(min(every, max(left, 0.0))):
                    await self._changed.wait()
                continue  # the entry changed: start over with the new one
            except TimeoutError:
                pass
            if self._drop_every() is None or not nc.is_connected:
                continue
            logger.warning("chaos: cutting the NATS connection (%s)", self.reason("connection"))
            if cut(nc):
                self.count("connection", "drop")

    # The watch.

    async def start(self, js: JetStreamContext) -> None:
        """(Re)start the watch on this session; best effort, within a deadline.

        Returns once the key's current value is in, so the first message already sees it.
        Any failure leaves the last entry as it was (its ``until`` still ends it) and the
        session serving."""
        await self.stop()
        try:
            async with asyncio.timeout(START_DEADLINE_SECONDS):
                await self._start(js)
        except Exception as error:
            logger.warning(
                "chaos faults are not watched on this NATS session (%s); none are injected "
                "but those already known",
                error or type(error).__name__,
            )

    async def _start(self, js: JetStreamContext) -> None:
        bucket = naming.chaos_bucket(self.namespace)
        try:
            await js.key_value(bucket)
        except BucketNotFoundError:
            logger.info("creating the chaos bucket %s", bucket)
            await js.create_key_value(chaos_bucket_config(self.namespace))
        subject = f"$KV.{bucket}.{self.key}"
        sub = await js.subscribe(
            subject,
            stream=naming.kv_stream(bucket),
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        )
        try:
            info = await sub.consumer_info()
            delivered = (info.delivered.consumer_seq if info.delivered else 0) or 0
            if delivered + (info.num_pending or 0) == 0:
                self._set(None)
            for _ in range(delivered + (info.num_pending or 0)):
                self._take(await anext(sub.messages))
        except BaseException:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            raise
        self._sub = sub
        self._task = asyncio.create_task(self._follow(sub), name="chaos-faults")

    async def stop(self) -> None:
        """Stop watching (the entry stays until ``until`` or the next watch's value)."""
        sub, self._sub = self._sub, None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _follow(self, sub: JetStreamContext.PushSubscription) -> None:
        try:
            async for msg in sub.messages:
                self._take(msg)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("the chaos watch ended; the faults known are kept until they end")

    def _take(self, msg: Msg) -> None:
        headers = msg.headers or {}
        removed = headers.get(KV_OP) in (KV_DEL, KV_PURGE) or KV_MARKER_REASON in headers
        try:
            revision = msg.metadata.sequence.stream
        except Exception:
            revision = 0
        self.update(None if removed else (msg.data or b""), revision)


def cut(nc: Client) -> bool:
    """Abort ``nc``'s socket, as a network cut would: no goodbye, nothing flushed. nats-py
    sees the end of its stream and reconnects. nats-py has no public way to do this, so
    this one function reaches into its transport; False when there is none to cut."""
    transport = getattr(nc, "_transport", None)
    writer = getattr(transport, "_io_writer", None)
    raw = getattr(writer, "transport", None)
    abort = getattr(raw, "abort", None)
    if abort is None:
        return False
    abort()
    return True
