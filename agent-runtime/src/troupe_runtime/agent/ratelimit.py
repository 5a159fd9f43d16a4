"""Rate limits as GCRA, kept in memory (one replica) or in KV (all replicas).

GCRA (the generic cell rate algorithm) is a token bucket stored as a single
number, the theoretical arrival time (TAT) of the next message. A single
number is what makes the ``global`` scope cheap: replicas share it in a KV
key and advance it with compare-and-set, so no update is lost under races.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from troupe_runtime.contract.policies import RateLimit

Clock = Callable[[], float]


@dataclass(frozen=True)
class Decision:
    """Whether a message may pass now, else how long to wait; and the next TAT."""

    allowed: bool
    wait: float
    tat: float


def gcra(tat: float, now: float, rate: float, burst: int, cost: float = 1.0) -> Decision:
    """One GCRA step: ``burst`` tokens at once, then ``rate`` per second; this takes ``cost``.

    A cost above ``burst`` could never pass, so it takes the whole bucket instead.
    """
    interval = 1.0 / rate
    cost = min(cost, burst)
    start = max(tat, now)
    allow_at = start - (burst - cost) * interval
    if now < allow_at:
        return Decision(allowed=False, wait=allow_at - now, tat=tat)
    return Decision(allowed=True, wait=0.0, tat=start + cost * interval)


def debit(tat: float, now: float, rate: float, burst: int, cost: float) -> float:
    """The TAT after ``cost`` tokens already spent: never refused, at most a burst ahead."""
    interval = 1.0 / rate
    return min(max(tat, now) + cost * interval, now + burst * interval)


def unpaid(tat: float, now: float, rate: float, burst: int, cost: float) -> float:
    """The tokens of a ``debit`` of ``cost`` that did not fit below its ceiling (a bucket is
    never emptier than empty): owed, and taken by the next ``acquire`` on top of its cost.

    Without this, a bucket kept empty by waiting callers forgives every overage: a
    provider's tokens per minute would be passed by as much as completions use beyond their
    estimate (tool schemas the estimate does not count, say)."""
    interval = 1.0 / rate
    room = (now + burst * interval - max(tat, now)) / interval
    return cost - max(0.0, min(cost, room))


MAX_DEBT_BUCKETS = 6
"""Buckets a limiter may owe: a minute of a per-minute limit's ten-second bursts."""


def owed_after(owed: float, unpaid_now: float, burst: int) -> float:
    """The debt after ``unpaid_now`` more, at most ``MAX_DEBT_BUCKETS`` buckets: an overage
    is paid back, but one absurd usage figure (a provider may report anything) must not
    throttle for years."""
    return min(owed + unpaid_now, float(MAX_DEBT_BUCKETS * burst))


def next_take(cost: float, owed: float, burst: int) -> tuple[float, bool]:
    """What an ``acquire`` of ``cost`` takes next, owing ``owed``: the cost and the debt at
    once when they fit one bucket (True: the acquire is then done), else a bucket's worth
    of the debt first (each take must fit a bucket, or GCRA never lets it through)."""
    if owed <= 0 or cost + owed <= burst:
        return cost + max(owed, 0.0), True
    return min(owed, float(burst)), False


def credit(tat: float, now: float, rate: float, burst: int, cost: float) -> float:
    """The TAT with ``cost`` tokens an ``acquire`` took given back (the call they were for
    was not made): what ``gcra`` added, ``min(cost, burst)`` intervals, comes off again,
    never below ``now`` (a full bucket holds no more)."""
    interval = 1.0 / rate
    return max(tat - min(cost, burst) * interval, now)


class Limiter(Protocol):
    async def acquire(self, cost: float = 1.0, max_wait: float | None = None) -> bool:
        """Wait for ``cost`` tokens; True when the caller had to wait (was throttled).

        A shared limiter raises ``RateLimitUnavailable`` rather than wait forever; a wait
        longer than ``max_wait`` raises ``Throttled`` at once instead of sleeping.
        """
        ...

    async def charge(self, cost: float) -> None:
        """Count ``cost`` tokens spent beyond what ``acquire`` took (best effort, no wait);
        what the bucket has no room for now is owed, and taken by the next ``acquire``."""
        ...

    async def refund(self, cost: float) -> None:
        """Give back ``cost`` tokens ``acquire`` took for something that did not happen."""
        ...


class Throttled(Exception):
    """The tokens come later than the caller will wait: in ``wait`` seconds."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"rate limited for {wait:.3f}s")
        self.wait = wait


class LocalLimiter:
    """The per-replica token bucket."""

    def __init__(self, limit: RateLimit, clock: Clock = time.monotonic) -> None:
        self._limit = limit
        self._clock = clock
        self._tat = 0.0
        self._owed = 0.0
        """Tokens charged that the bucket had no room for (``unpaid``)."""

    async def acquire(self, cost: float = 1.0, max_wait: float | None = None) -> bool:
        throttled = False
        while True:
            rate, burst = self._limit.rate, self._limit.burst
            take, done = next_take(cost, self._owed, burst)
            decision = gcra(self._tat, self._clock(), rate, burst, take)
            if decision.allowed:
                self._tat = decision.tat
                self._owed = 0.0 if done else self._owed - take
                if done:
                    return throttled
                continue
            if max_wait is not None and decision.wait > max_wait:
                raise Throttled(decision.wait)
            throttled = True
            await asyncio.sleep(decision.wait)

    async def charge(self, cost: float) -> None:
        now, rate, burst = self._clock(), self._limit.rate, self._limit.burst
        self._owed = owed_after(self._owed, unpaid(self._tat, now, rate, burst, cost), burst)
        self._tat = debit(self._tat, now, rate, burst, cost)

    async def refund(self, cost: float) -> None:
        self._tat = credit(self._tat, self._clock(), self._limit.rate, self._limit.burst, cost)


class RateLimitUnavailable(Exception):
    """The shared rate-limit key could not be advanced in time; the message goes back."""


MAX_CONFLICTS = 32
"""Compare-and-set races one ``acquire`` may lose before it gives up."""
CONFLICT_BACKOFF_BASE = 0.002
CONFLICT_BACKOFF_CAP = 0.2
MIN_DEADLINE_SECONDS = 30.0
"""One ``acquire`` waits at most this long, or four token intervals if longer."""
CLOCK_SKEW_SECONDS = 1.0
"""How far ahead another replica's wall clock may plausibly be."""


def conflict_backoff(conflicts: int, rng: random.Random) -> float:
    """Full jitter, uniform in [0, min(cap, base·2^conflicts)], so racing replicas spread out."""
    return rng.uniform(
        0, min(CONFLICT_BACKOFF_CAP, CONFLICT_BACKOFF_BASE * 2.0 ** min(conflicts, 32))
    )


def plausible_tat(tat: float, now: float, rate: float, burst: int) -> float:
    """The stored TAT, or ``now`` when no replica could have written it.

    GCRA never moves the TAT further than ``burst`` intervals past the writer's
    clock; a value beyond that (plus clock skew), or one that is not a finite
    number, is junk and would otherwise throttle every replica for good.
    """
    if not math.isfinite(tat) or tat > now + burst / rate + CLOCK_SKEW_SECONDS:
        return now
    return tat


def acquire_deadline(limit: RateLimit) -> float:
    """Seconds one ``acquire`` may take: long enough for any fair wait, never forever."""
    return max(MIN_DEADLINE_SECONDS, 4.0 / limit.rate)


class GlobalLimiter:
    """One token bucket shared by every replica, in a KV key updated with compare-and-set.

    The TAT is wall-clock time, the only clock replicas share; NTP-level skew
    between nodes shifts the shared rate by the skew, not more. A lost race is
    retried after a jittered backoff, at most ``MAX_CONFLICTS`` times, and one
    ``acquire`` never takes longer than ``acquire_deadline``: then it raises
    ``RateLimitUnavailable`` and the worker hands the message back.
    """

    def __init__(
        self,
        kv: KeyValue,
        key: str,
        limit: RateLimit,
        on_conflict: Callable[[], None],
        clock: Clock = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._kv = kv
        self._key = key
        self._limit = limit
        self._on_conflict = on_conflict
        self._clock = clock
        self._rng = rng or random.Random()
        self._owed = 0.0
        """Tokens this replica charged that the shared bucket had no room for (``unpaid``):
        its next ``acquire`` takes them too."""

    async def _read(self) -> tuple[float, int]:
        try:
            entry = await self._kv.get(self._key)
        except KeyNotFoundError:
            return 0.0, 0
        try:
            tat = float(entry.value or b"0")
        except ValueError:
            tat = math.nan  # junk: plausible_tat replaces it
        return tat, entry.revision or 0

    async def _write(self, tat: float, revision: int) -> bool:
        value = repr(tat).encode()
        try:
            # Revision 0 means "only if the key does not exist yet".
            await self._kv.update(self._key, value, last=revision)
        except KeyWrongLastSequenceError:
            self._on_conflict()
            return False
        return True

    async def acquire(self, cost: float = 1.0, max_wait: float | None = None) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + acquire_deadline(self._limit)
        rate, burst = self._limit.rate, self._limit.burst
        throttled, conflicts = False, 0
        while True:
            stored, revision = await self._read()
            now = self._clock()
            take, done = next_take(cost, self._owed, burst)
            decision = gcra(plausible_tat(stored, now, rate, burst), now, rate, burst, take)
            if decision.allowed:
                if await self._write(decision.tat, revision):
                    self._owed = 0.0 if done else self._owed - take
                    if done:
                        return throttled
                    continue
                conflicts += 1
                pause = conflict_backoff(conflicts, self._rng)
            else:
                if max_wait is not None and decision.wait > max_wait:
                    raise Throttled(decision.wait)
                throttled = True
                pause = decision.wait
            if conflicts >= MAX_CONFLICTS or loop.time() + pause > deadline:
                raise RateLimitUnavailable(
                    f"global rate limit key {self._key!r}: no token after {conflicts} lost "
                    f"compare-and-set races within {acquire_deadline(self._limit):g}s; the "
                    "message is handed back (check the rate-limit KV bucket and its load)"
                )
            await asyncio.sleep(pause)

    async def charge(self, cost: float) -> None:
        owed: list[float] = []

        def step(tat: float, now: float, rate: float, burst: int, cost: float) -> float:
            owed[:] = [unpaid(tat, now, rate, burst, cost)]
            return debit(tat, now, rate, burst, cost)

        written = await self._advance(step, cost)
        burst = self._limit.burst
        self._owed = owed_after(self._owed, owed[0] if written else cost, burst)

    async def refund(self, cost: float) -> None:
        await self._advance(credit, cost)

    async def _advance(
        self, step: Callable[[float, float, float, int, float], float], cost: float
    ) -> bool:
        """Apply ``step`` (``debit`` or ``credit``) to the shared TAT, by compare-and-set;
        False when every race was lost."""
        rate, burst = self._limit.rate, self._limit.burst
        for conflicts in range(1, MAX_CONFLICTS + 1):
            stored, revision = await self._read()
            now = self._clock()
            if await self._write(
                step(plausible_tat(stored, now, rate, burst), now, rate, burst, cost), revision
            ):
                return True
            await asyncio.sleep(conflict_backoff(conflicts, self._rng))
        return False
