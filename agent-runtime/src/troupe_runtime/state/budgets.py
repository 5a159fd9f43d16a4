"""Budgets at run time: the definitions the operator writes, watched; the ledgers, advanced
by compare-and-set; and the guard every model call passes first.

``BudgetGuard.reserve`` takes a hold on the ledger of every budget that applies to the call
(``BudgetDefinition.applies``), in parallel; one refusal releases the others and raises
``BudgetExceeded``. The returned ``Reservation`` is committed with the call's actual usage or
released. The planning is ``contract.budget``'s; this module is its I/O.

Each ledger write is one ``kv.update(key, value, last=revision)``. The guard remembers the
revision it last wrote or read of each ledger, so an uncontended hold is one round trip. The
holds, commits and releases of one guard on one ledger queue up and go in shared writes (the
first caller writes for whoever queues behind it), so one replica's calls never race each
other; a race lost to another replica re-reads and plans again after a jittered backoff,
within a bounded deadline, then ``BudgetUnavailable``: the call is never made unchecked.
Every plan is idempotent (``contract.budget``), which is what makes retrying a write whose
reply was lost safe.

A hold is awaited: it is granted by compare-and-set before the model call. A commit or
release is not: it is queued and written in the background, at once by default (so it goes
out before anything the call's answer leads to: a workflow's next step, on another agent,
finds the actual spending, not the hold), or after ``linger`` seconds if the guard is given
one, to let the next hold on the ledger carry it. Queued behind a write in flight, it goes
in the next write with whatever else queued (commit, then hold: the hold sees the room the
commit freed). Until it is written the ledger shows the call's hold, which is at least
what it spent: other replicas see too much spent, never too little, and a crash meanwhile
leaves the hold, charged in full at expiry. ``BudgetGuard.settled`` waits for what is
queued (tests); ``aclose`` writes it (shutdown, while still connected).

Junk in the bucket is survived, never obeyed:

- a definition that does not parse is logged and the last good one (if any) kept;
- a ledger that does not parse (or names another window) is logged loudly and replaced by
  a fresh one, by compare-and-set at its revision: what it counted is lost, but refusing
  every call of the window for good (a Run window never ends) would be worse;
- a hold expiring later than any guard holds is dropped uncharged (``contract.budget``).

A commit or release is tried for ``SETTLE_DEADLINE_SECONDS``, then logged and dropped: the
hold expires and is charged in full, so the ledger errs on the side of counting too much. A
hold that timed out or whose caller was cancelled is taken back in the background, in case
its write landed after all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_MARKER_REASON, KV_OP, KV_PURGE, KeyValue
from prometheus_client import Counter
from pydantic import ValidationError

from troupe_runtime.contract import budget as ledger_plan
from troupe_runtime.contract import naming
from troupe_runtime.contract.budget import (
    Amount,
    BudgetDefinition,
    BudgetExceeded,
    BudgetUnavailable,
    Ledger,
    Refused,
    SpendContext,
)
from troupe_runtime.nats.provision import budget_bucket_config
from troupe_runtime.serving.metrics import BudgetMetrics

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

DEFAULT_HOLD_TTL_SECONDS = 600.0
"""How long a hold lives without its holder: past the longest model call, then charged."""
RESERVE_DEADLINE_SECONDS = 10.0
"""One hold (per budget) is granted or refused within this, else ``BudgetUnavailable``."""
SETTLE_DEADLINE_SECONDS = 120.0
"""How long a commit or release (or the taking back of a hold that timed out) is tried, in
the background, before it is dropped (the hold is then charged in full at expiry)."""
SETTLE_LINGER_SECONDS = 0.0
"""How long a queued commit or release waits for the next hold on its ledger to carry it in
the same write, before it is written alone. None by default: meanwhile the ledger shows the
hold, and another agent acting on this call's answer could be refused by it."""
REFUSAL_RELEASE_WAIT_SECONDS = 10.0
"""How long a refused call waits for the other budgets' holds to be released (then they go
on in the background)."""
LATE_RELEASE_PAUSE_SECONDS = 2.0
CLOSE_GRACE_SECONDS = 5.0
"""How long ``BudgetGuard.aclose`` lets queued commits and releases finish."""
READY_WAIT_SECONDS = 5.0
"""How long a call waits for the definitions' initial values before it is handed back."""
START_DEADLINE_SECONDS = 30.0
"""How long ``Definitions.start`` waits for the initial values."""
CONFLICT_BACKOFF_BASE = 0.001
CONFLICT_BACKOFF_CAP = 0.1
ERROR_BACKOFF_SECONDS = 0.2
"""Pause after a KV error (server restarting, no responders) before trying again."""
MAX_CACHED_LEDGERS = 1024
"""Ledger revisions the guard remembers (Run windows make one ledger per run)."""

_TRANSIENT = (nats.errors.Error, OSError, asyncio.TimeoutError)


def conflict_backoff(conflicts: int, rng: random.Random) -> float:
    """Full jitter, uniform in [0, min(cap, base·2^conflicts)], so racing replicas spread out."""
    return rng.uniform(
        0, min(CONFLICT_BACKOFF_CAP, CONFLICT_BACKOFF_BASE * 2.0 ** min(conflicts, 32))
    )


async def open_budget_bucket(js: JetStreamContext, namespace: str) -> KeyValue:
    """The namespace's budget bucket, created (with the operator's config) if missing."""
    try:
        return await js.key_value(naming.budget_bucket(namespace))
    except BucketNotFoundError:
        logger.info("creating the budget bucket %s", naming.budget_bucket(namespace))
        return await js.create_key_value(budget_bucket_config(namespace))


def encode(ledger: Ledger) -> bytes:
    """A ledger's KV value: compact JSON, defaults left out (it is rewritten on every hold)."""
    return ledger.model_dump_json(by_alias=True, exclude_defaults=True).encode()


def decode(raw: bytes | None, wid: str) -> Ledger | None:
    """The ledger in ``raw``, or None when it is junk (does not parse, or is of another
    window than its key says)."""
    try:
        ledger = Ledger.model_validate_json(raw or b"")
    except ValidationError:
        return None
    return ledger if ledger.window == wid else None


class Definitions:
    """The namespace's budget definitions, kept current by a KV watch on ``def.*``.

    ``ready`` is set once the watch has delivered every existing definition: no call is
    checked against a partial set. A definition that does not parse is logged and ignored
    (it is the operator's to write; the watch goes on), and the last good one is kept.
    ``start`` on a new session replaces the watch; the old set serves until the new one's
    initial values are in.

    The watch is an ordered consumer of the bucket's stream, last value per key, read
    here rather than through nats-py's ``KeyValue.watch``: that marks the end of the
    initial values too early when some are still on the wire (nats-io/nats.py#842). Here
    the end is counted: the consumer's delivered plus pending messages when it was made."""

    def __init__(self, namespace: str, metrics: BudgetMetrics | None = None) -> None:
        self.namespace = namespace
        self.ready = asyncio.Event()
        self._metrics = metrics
        self._by_key: dict[str, BudgetDefinition] = {}
        self._all: tuple[BudgetDefinition, ...] = ()
        self._sub: JetStreamContext.PushSubscription | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, js: JetStreamContext) -> None:
        """(Re)start the watch on this session; returns once the initial values are in."""
        await self.stop()
        bucket = naming.budget_bucket(self.namespace)
        await open_budget_bucket(js, self.namespace)
        prefix = f"$KV.{bucket}."
        sub = await js.subscribe(
            f"{prefix}{naming.BUDGET_DEFINITION_PREFIX}.*",
            stream=naming.kv_stream(bucket),
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        )
        initial: dict[str, BudgetDefinition] = {}
        try:
            async with asyncio.timeout(START_DEADLINE_SECONDS):
                info = await sub.consumer_info()
                delivered = (info.delivered.consumer_seq if info.delivered else 0) or 0
                for _ in range(delivered + (info.num_pending or 0)):
                    self._apply(initial, prefix, await anext(sub.messages))
        except BaseException:
            await _unsubscribe(sub)
            raise
        self._sub = sub
        self._set(initial)
        self.ready.set()
        self._task = asyncio.create_task(self._follow(sub, prefix), name="budget-definitions")

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        task, self._task = self._task, None
        if sub is not None:
            await _unsubscribe(sub)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def applicable(self, spend: SpendContext) -> list[BudgetDefinition]:
        return [definition for definition in self._all if definition.applies(spend)]

    def get(self, name: str) -> BudgetDefinition | None:
        return self._by_key.get(naming.budget_definition_key(name))

    def all(self) -> tuple[BudgetDefinition, ...]:
        return self._all

    async def _follow(self, sub: JetStreamContext.PushSubscription, prefix: str) -> None:
        try:
            async for msg in sub.messages:
                by_key = dict(self._by_key)
                self._apply(by_key, prefix, msg)
                self._set(by_key)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("the budget definitions' watch ended; definitions are kept as are")

    def _set(self, by_key: dict[str, BudgetDefinition]) -> None:
        self._by_key = by_key
        self._all = tuple(by_key.values())

    def _apply(self, by_key: dict[str, BudgetDefinition], prefix: str, msg: Msg) -> None:
        key = msg.subject[len(prefix) :]
        headers = msg.headers or {}
        if headers.get(KV_OP) in (KV_DEL, KV_PURGE) or KV_MARKER_REASON in headers:
            if by_key.pop(key, None) is not None:
                logger.info("budget definition %s removed", key)
            return
        try:
            definition = BudgetDefinition.model_validate_json(msg.data or b"")
        except ValidationError as error:
            if self._metrics is not None:
                self._metrics.junk.labels("definition").inc()
            kept = "the last good one is kept" if key in by_key else "no budget from it"
            logger.error(
                "budget definition %s (revision %s) does not parse, ignored (%s): %s",
                key,
                msg.metadata.sequence.stream,
                kept,
                error.errors(include_url=False, include_input=False)[:3],
            )
            return
        if naming.budget_definition_key(definition.name) != key:
            # Commits and releases find a budget by its name: one filed under another's key
            # would take holds nobody settles.
            if self._metrics is not None:
                self._metrics.junk.labels("definition").inc()
            logger.error("budget definition %s names another budget, ignored", key)
            return
        by_key[key] = definition
        logger.info(
            "budget definition %s: generation %d, scope %s, window %s",
            key,
            definition.generation,
            definition.scope,
            definition.window.type,
        )


async def _unsubscribe(sub: JetStreamContext.PushSubscription) -> None:
    with contextlib.suppress(*_TRANSIENT):
        await sub.unsubscribe()


@dataclass(frozen=True)
class _Held:
    """One hold granted: on which budget's ledger, under which key."""

    definition: BudgetDefinition
    key: str
    window: str


Plan = Callable[[Ledger, float], "Ledger | Refused"]


@dataclass
class _Op:
    """One plan waiting to be written to a ledger; ``lingers``: a commit or release, which
    may wait for the next hold to carry it."""

    plan: Plan
    future: asyncio.Future[tuple[Ledger, Ledger | Refused]]
    deadline: float
    seconds: float
    lingers: bool = False


@dataclass
class _Writer:
    """What is queued for one ledger, and the task writing it."""

    target: _Held
    ops: list[_Op] = field(default_factory=list)
    batch: list[_Op] = field(default_factory=list)
    draining: bool = False
    timer: asyncio.TimerHandle | None = None


class Reservation:
    """The holds one model call took; commit or release exactly once (more is a no-op)."""

    def __init__(self, guard: BudgetGuard | None, hold_id: str, holds: list[_Held]) -> None:
        self._guard = guard
        self._hold_id = hold_id
        self._holds = holds
        self._settled = not holds

    @property
    def budgets(self) -> list[str]:
        """The budgets this call holds on (empty: none applied)."""
        return [held.definition.name for held in self._holds]

    async def commit(self, actual: Amount) -> None:
        """Queue the hold's replacement by ``actual``; returns without waiting for the write
        (``BudgetGuard.settled`` does)."""
        if self._settled:
            return
        self._settled = True
        assert self._guard is not None
        for held in self._holds:
            self._guard.commit(held, self._hold_id, actual)

    async def release(self) -> None:
        """Queue the hold's release (nothing spent); returns without waiting for the write."""
        if self._settled:
            return
        self._settled = True
        assert self._guard is not None
        for held in self._holds:
            self._guard.release(held, self._hold_id)


async def _all(
    work: list[Coroutine[None, None, None]], return_exceptions: bool = False
) -> list[BaseException | None]:
    """``asyncio.gather``, minus its tasks when there is one budget (the common case)."""
    if len(work) != 1:
        return await asyncio.gather(*work, return_exceptions=return_exceptions)
    try:
        await work[0]
    except Exception as error:
        if not return_exceptions:
            raise
        return [error]
    return [None]


NO_RESERVATION = Reservation(None, "", [])
"""What a call that no budget applies to holds: nothing, and settling it does nothing."""


class BudgetGuard:
    """What every model call passes first; cheap (no I/O at all) when no budget applies."""

    def __init__(
        self,
        namespace: str,
        definitions: Definitions,
        hold_ttl: float = DEFAULT_HOLD_TTL_SECONDS,
        metrics: BudgetMetrics | None = None,
        clock: Clock = time.time,
        rng: random.Random | None = None,
        reserve_deadline: float = RESERVE_DEADLINE_SECONDS,
        settle_deadline: float = SETTLE_DEADLINE_SECONDS,
        linger: float = SETTLE_LINGER_SECONDS,
    ) -> None:
        self.namespace = namespace
        self.definitions = definitions
        self.hold_ttl = hold_ttl
        self.metrics = metrics
        self._clock = clock
        self._rng = rng or random.Random()
        self._reserve_deadline = reserve_deadline
        self._settle_deadline = settle_deadline
        self._linger = linger
        self._closing = False
        self._unsettled: set[asyncio.Future[tuple[Ledger, Ledger | Refused]]] = set()
        self._children: dict[tuple[int, tuple[str, ...]], Counter] = {}
        self._js: JetStreamContext | None = None
        self._kv: KeyValue | None = None
        self._opening: asyncio.Lock | None = None
        self._cache: OrderedDict[str, tuple[int, Ledger]] = OrderedDict()
        self._background: set[asyncio.Task[None]] = set()
        self._writers: dict[str, _Writer] = {}

    def use(self, js: JetStreamContext) -> None:
        """Write ledgers through this session from now on."""
        self._js = js
        self._kv = None
        self._cache.clear()

    async def reserve(self, spend: SpendContext, amount: Amount) -> Reservation:
        """Hold ``amount`` on every applicable budget; raises ``BudgetExceeded`` (a hard
        limit) or ``BudgetUnavailable`` (the ledger could not be advanced in time)."""
        if not self.definitions.ready.is_set():
            try:
                async with asyncio.timeout(READY_WAIT_SECONDS):
                    await self.definitions.ready.wait()
            except TimeoutError:
                raise BudgetUnavailable(
                    f"the budget definitions of namespace {self.namespace!r} are not loaded "
                    f"yet after {READY_WAIT_SECONDS:g}s; the call is handed back"
                ) from None
        budgets = self.definitions.applicable(spend)
        if not budgets:
            return NO_RESERVATION
        started = time.perf_counter()
        now = self._clock()
        targets = []
        for definition in budgets:
            wid = ledger_plan.window_id(definition.window, now, spend.run)
            if wid is not None:
                key = naming.budget_ledger_key(definition.name, wid)
                targets.append(_Held(definition, key, wid))
        taken: list[_Held] = []
        try:
            outcomes = await _all(
                [self._hold(target, spend.hold_id, amount, taken) for target in targets],
                return_exceptions=True,
            )
        except asyncio.CancelledError:  # the call is not made: give back what was held
            for held in taken:
                self.release(held, spend.hold_id, now=True)
            raise
        granted = [t for t, outcome in zip(targets, outcomes, strict=True) if outcome is None]
        failures = [outcome for outcome in outcomes if outcome is not None]
        if self.metrics is not None:
            self.metrics.check_seconds.observe(time.perf_counter() - started)  # no labels
        if not failures:
            return Reservation(self, spend.hold_id, granted)
        await self._give_back(granted, spend.hold_id)
        # A refusal is final, whatever else failed; anything else is for a later attempt.
        for failure in failures:
            if isinstance(failure, BudgetExceeded):
                raise failure
        for failure in failures:
            if isinstance(failure, BudgetUnavailable):
                raise failure
        raise failures[0]

    async def _give_back(self, granted: list[_Held], hold_id: str) -> None:
        """Release the holds of a call another budget refused: written at once, and waited
        for (a while), so the ledgers are clean when the refusal is seen."""
        releases = [self.release(held, hold_id, now=True) for held in granted]
        if written := [release for release in releases if release is not None]:
            await asyncio.wait(written, timeout=REFUSAL_RELEASE_WAIT_SECONDS)

    async def _hold(self, target: _Held, hold_id: str, amount: Amount, taken: list[_Held]) -> None:
        """Take one hold (added to ``taken``), else raise."""
        definition = target.definition

        def plan(ledger: Ledger, now: float) -> Ledger | Refused:
            return ledger_plan.reserve(definition, ledger, hold_id, amount, now, self.hold_ttl)

        try:
            _, outcome = await self._advance(target, plan, self._reserve_deadline)
        except asyncio.CancelledError:
            self._later(self._take_back(target, hold_id))  # its write may have gone out
            raise
        except BudgetUnavailable:
            self._count(definition.name, "unavailable")
            # A write sent while the server was away may still land (the client buffers
            # it for the reconnect): take it back then, or it would be charged at expiry.
            self._later(self._take_back(target, hold_id))
            raise
        if isinstance(outcome, Refused):
            self._count(definition.name, "refused")
            raise outcome.error
        self._count(definition.name, "granted")
        taken.append(target)

    def commit(self, target: _Held, hold_id: str, actual: Amount) -> None:
        """Queue the replacement of one hold by the actual usage, written in the background
        (at once, or after the guard's linger unless a hold carries it first). Not written
        within the settle deadline, it is dropped (logged): the hold is charged in full when
        it expires."""
        definition = target.definition
        if self.definitions.get(definition.name) is None:
            logger.info("budget %s is gone; its hold %s is not committed", definition.name, hold_id)
            return
        window = definition.window

        def plan(ledger: Ledger, now: float) -> Ledger | Refused:
            return ledger_plan.commit(ledger, window, hold_id, actual, now)

        future = self._queue(target, plan, now=False)

        def written(done: asyncio.Future[tuple[Ledger, Ledger | Refused]]) -> None:
            if done.cancelled():
                return
            error = done.exception()
            if error is not None:
                logger.warning(
                    "budget %s: hold %s not committed, it will be charged in full when it "
                    "expires: %s",
                    definition.name,
                    hold_id,
                    error,
                )
                return
            before, after = done.result()
            assert isinstance(after, Ledger)
            if self.metrics is not None and after is not before:
                self._count_spent(definition, before, after, actual)

        future.add_done_callback(written)

    def _count_spent(
        self, definition: BudgetDefinition, before: Ledger, after: Ledger, actual: Amount
    ) -> None:
        metrics = self.metrics
        assert metrics is not None
        name = definition.name
        self._child(metrics.spent_tokens, name).inc(actual.tokens)
        self._child(metrics.spent_usd, name).inc(actual.cost_usd)
        window = definition.window
        now = self._clock()
        was = ledger_plan.spent(before, window, now)
        is_now = ledger_plan.spent(after, window, now)
        for level, unit in ledger_plan.crossed(was, is_now, definition.limits):
            self._child(metrics.crossings, name, level, unit).inc()
            logger.warning("budget %s passed its %s %s limit", definition.name, level, unit)

    def release(
        self, target: _Held, hold_id: str, now: bool = False
    ) -> asyncio.Future[tuple[Ledger, Ledger | Refused]] | None:
        """Queue the drop of one hold (nothing spent), like ``commit``; ``now``: written at
        once rather than after the linger. The write's future (None: the budget is gone)."""
        if self.definitions.get(target.definition.name) is None:
            return None

        def plan(ledger: Ledger, at: float) -> Ledger | Refused:
            return ledger_plan.release(ledger, hold_id)

        future = self._queue(target, plan, now=now)

        def written(done: asyncio.Future[tuple[Ledger, Ledger | Refused]]) -> None:
            if not done.cancelled() and done.exception() is not None:
                logger.warning(
                    "budget %s: hold %s not released, it will be charged in full when it "
                    "expires: %s",
                    target.definition.name,
                    hold_id,
                    done.exception(),
                )

        future.add_done_callback(written)
        return future

    async def _take_back(self, target: _Held, hold_id: str) -> None:
        """Release a hold that may or may not have been written, twice: a write the client
        buffered while disconnected is flushed at the reconnect, and has been seen to land
        after the first release had read the ledger."""
        for pause in (LATE_RELEASE_PAUSE_SECONDS, None):
            future = self.release(target, hold_id, now=True)
            if future is not None:
                await asyncio.wait([future])
            if pause is not None:
                await asyncio.sleep(pause)

    def _later(self, work: Coroutine[None, None, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _queue(
        self, target: _Held, plan: Plan, now: bool
    ) -> asyncio.Future[tuple[Ledger, Ledger | Refused]]:
        """Queue a commit or release on its ledger's writer, without waiting for it."""
        loop = asyncio.get_running_loop()
        seconds = self._settle_deadline
        op = _Op(plan, loop.create_future(), loop.time() + seconds, seconds, lingers=not now)
        self._unsettled.add(op.future)
        op.future.add_done_callback(self._unsettled.discard)
        writer = self._writers.get(target.key)
        if writer is None:
            writer = self._writers[target.key] = _Writer(target)
        writer.ops.append(op)
        if not writer.draining:
            if now or self._linger <= 0:
                self._flush(target, writer)
            elif writer.timer is None:
                writer.timer = loop.call_later(self._linger, self._flush, target, writer)
        return op.future

    def _flush(self, target: _Held, writer: _Writer) -> None:
        """Write what is queued for one ledger now, in the background."""
        if writer.timer is not None:
            writer.timer.cancel()
            writer.timer = None
        if writer.draining or not writer.ops:
            return
        writer.draining = True  # before the task runs: no caller may start a second drain
        self._later(self._drain(target, writer))

    async def settled(self) -> None:
        """Wait until every commit and release queued so far is written (or dropped)."""
        pending = list(self._unsettled)
        for writer in list(self._writers.values()):
            self._flush(writer.target, writer)
        if pending:
            await asyncio.wait(pending)

    async def aclose(self, grace: float = CLOSE_GRACE_SECONDS) -> None:
        """Write what is queued and give what runs in the background ``grace`` seconds to
        finish, then stop it (a commit not written leaves its hold, charged at expiry)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self.settled()
        self._closing = True  # a drain cancelled now hands nothing on
        try:
            writers = list(self._writers.values())
            for writer in writers:
                if writer.timer is not None:
                    writer.timer.cancel()
                    writer.timer = None
            for task in list(self._background):
                task.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
            gone = BudgetUnavailable("the budget guard closed before this was written")
            for writer in writers:
                for op in writer.batch + writer.ops:
                    if not op.future.done():
                        op.future.set_exception(gone)
                if self._writers.get(writer.target.key) is writer:
                    del self._writers[writer.target.key]
        finally:
            self._closing = False

    def _count(self, budget: str, outcome: str) -> None:
        if self.metrics is not None:
            self._child(self.metrics.holds, budget, outcome).inc()

    def _child(self, family: Counter, *labels: str) -> Counter:
        """A metric's labelled child, remembered: ``labels()`` is a lock and a lookup, on
        every call."""
        key = (id(family), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*labels)
        return child

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            js = self._js
            if js is None:
                raise BudgetUnavailable("the budget guard has no NATS session yet")
            if self._opening is None:
                self._opening = asyncio.Lock()
            async with self._opening:
                if self._kv is None:
                    self._kv = await open_budget_bucket(js, self.namespace)
        return self._kv

    async def _read(self, kv: KeyValue, target: _Held, now: float) -> tuple[int, Ledger]:
        """The ledger and its revision (0 or the tombstone's when absent); junk reads fresh."""
        try:
            entry = await kv.get(target.key)
        except KeyNotFoundError as missing:
            tombstone: KeyValue.Entry | None = missing.entry  # set when the key was deleted
            revision = (tombstone and tombstone.revision) or 0
            return revision, ledger_plan.fresh_ledger(target.definition.window, target.window, now)
        revision = entry.revision or 0
        ledger = decode(entry.value, target.window)
        if ledger is None:
            if self.metrics is not None:
                self.metrics.junk.labels("ledger").inc()
            logger.error(
                "budget ledger %s (revision %d) is junk (does not parse as this window's "
                "ledger): REPLACED by a fresh ledger, what it counted is lost: %r",
                target.key,
                revision,
                (entry.value or b"")[:200],
            )
            ledger = ledger_plan.fresh_ledger(target.definition.window, target.window, now)
        return revision, ledger

    async def _advance(
        self, target: _Held, plan: Plan, deadline_seconds: float
    ) -> tuple[Ledger, Ledger | Refused]:
        """Apply ``plan`` to the ledger by compare-and-set, within ``deadline_seconds``: the
        ledger before it and the plan's outcome (a refusal is written as its ledger,
        refusals + 1). Plans for one ledger queue up and go in one write together, so the
        calls of one replica never race each other, only other replicas; a commit or release
        queued before it goes in the same write."""
        loop = asyncio.get_running_loop()
        op = _Op(plan, loop.create_future(), loop.time() + deadline_seconds, deadline_seconds)
        writer = self._writers.get(target.key)
        if writer is None:
            writer = self._writers[target.key] = _Writer(target)
        writer.ops.append(op)
        if not writer.draining:
            # No one writes this ledger now: this caller does, with whatever queues up
            # meanwhile (no task to hop to when there is no contention).
            await self._drain(target, writer, until=op)
        return await op.future

    async def _drain(self, target: _Held, writer: _Writer, until: _Op | None = None) -> None:
        """Write what is queued for one ledger, a batch at a time: until ``until`` is
        written (a caller writing for itself), then a task goes on with the rest, or, when
        the rest is commits and releases, the linger timer."""
        writer.draining = True
        if writer.timer is not None:  # this drain takes what the timer would have
            writer.timer.cancel()
            writer.timer = None
        handed_off = False
        try:
            while writer.ops and (until is None or not until.future.done()):
                writer.batch, writer.ops = writer.ops, []
                await self._write(target, writer.batch, until)
                writer.ops = [op for op in writer.batch if not op.future.done()] + writer.ops
                writer.batch = []
        except asyncio.CancelledError:
            # The caller that was writing went away: the others' plans go on without it.
            if until is not None:
                until.future.cancel()
            writer.ops = [op for op in writer.batch + writer.ops if not op.future.done()]
            writer.batch = []
            raise
        except Exception as error:  # a bug: no caller may wait forever
            logger.exception("budget ledger %s: the writer failed", target.key)
            for op in writer.batch + writer.ops:
                if not op.future.done():
                    op.future.set_exception(BudgetUnavailable(f"budget ledger writer: {error!r}"))
            writer.ops, writer.batch = [], []
        finally:
            if self._closing:
                pass  # ``aclose`` fails what is left
            elif writer.ops and self._linger > 0 and all(op.lingers for op in writer.ops):
                writer.draining = False  # commits queued meanwhile: they wait for a hold
                if writer.timer is None:
                    loop = asyncio.get_running_loop()
                    writer.timer = loop.call_later(self._linger, self._flush, target, writer)
                handed_off = True
            elif writer.ops:
                self._later(self._drain(target, writer))
                handed_off = True
            if not handed_off:
                writer.draining = False
                if self._writers.get(target.key) is writer:
                    del self._writers[target.key]

    async def _write(self, target: _Held, batch: list[_Op], until: _Op | None = None) -> None:
        """Read, plan every op in turn, compare-and-set, until written (or, with ``until``,
        until that op is done: a caller does not wait for others' ops past its own); an op
        whose deadline passes fails alone (``BudgetUnavailable``), the rest go on. Retrying a
        batch whose
        write may have landed is safe: every plan is idempotent (a hold taken twice is one
        hold, a commit or release of a settled hold changes nothing)."""
        loop = asyncio.get_running_loop()
        key = target.key
        conflicts = errors = 0
        last_error: BaseException | None = None
        try:
            while True:
                batch = [op for op in batch if not op.future.done()]  # callers gone: dropped
                now_loop = loop.time()
                for op in batch:
                    if now_loop >= op.deadline:
                        op.future.set_exception(
                            BudgetUnavailable(
                                f"budget ledger {key!r} in bucket "
                                f"{naming.budget_bucket(self.namespace)!r} not advanced within "
                                f"{op.seconds:g}s ({conflicts} lost compare-and-set races, "
                                f"{errors} errors, last: {last_error!r}); the call is handed back"
                            )
                        )
                batch = [op for op in batch if not op.future.done()]
                if not batch or (until is not None and until.future.done()):
                    return
                soonest = min(op.deadline for op in batch)
                try:
                    async with asyncio.timeout(soonest - now_loop):
                        if await self._write_once(target, batch):
                            return
                        continue  # what was remembered may be stale: read it afresh
                except KeyWrongLastSequenceError:
                    self._forget(key)
                    conflicts += 1
                    if self.metrics is not None:
                        self.metrics.conflicts.labels(target.definition.name).inc()
                    pause = conflict_backoff(conflicts, self._rng)
                except _TRANSIENT as error:
                    self._forget(key)
                    errors += 1
                    last_error = error
                    pause = ERROR_BACKOFF_SECONDS * self._rng.uniform(0.5, 1.5)
                await asyncio.sleep(min(pause, max(0.0, soonest - loop.time())))
        except BudgetUnavailable as error:  # no session: nothing to wait for
            for op in batch:
                if not op.future.done():
                    op.future.set_exception(error)

    async def _write_once(self, target: _Held, batch: list[_Op]) -> bool:
        """One read-plan-write; False when nothing changed from a remembered value (to be
        read afresh). Raises on a lost race or a KV error."""
        kv = await self._bucket()
        key = target.key
        now = self._clock()
        cached = self._cache.get(key)
        if cached is None:
            revision, ledger = await self._read(kv, target, now)
        else:
            revision, ledger = cached
        results: list[tuple[_Op, tuple[Ledger, Ledger | Refused] | BaseException]] = []
        current = ledger
        for op in batch:
            try:
                outcome = op.plan(current, now)
            except BudgetUnavailable as error:  # too many holds: this op only
                results.append((op, error))
                continue
            results.append((op, (current, outcome)))
            current = outcome.ledger if isinstance(outcome, Refused) else outcome
        if current is ledger:
            if cached is not None:
                self._forget(key)
                return False
        else:
            written = await kv.update(key, encode(current), last=revision)
            self._remember(key, written, current)
        for op, result in results:
            if op.future.done():
                continue
            if isinstance(result, BaseException):
                op.future.set_exception(result)
            else:
                op.future.set_result(result)
        return True

    def _remember(self, key: str, revision: int, ledger: Ledger) -> None:
        self._cache[key] = (revision, ledger)
        self._cache.move_to_end(key)
        while len(self._cache) > MAX_CACHED_LEDGERS:
            self._cache.popitem(last=False)

    def _forget(self, key: str) -> None:
        self._cache.pop(key, None)
