"""Rate limits as GCRA, kept in memory (one replica) or in KV (all replicas).

GCRA (the generic cell rate algorithm) is a token bucket stored as a single
number, the theoretical arrival time (TAT) of the next message. A single
number is what makes the ``global`` scope cheap: replicas share it in a KV
key and advance it with compare-and-set, so no update is lost under races.
"""

from __future__ import annotations

import asyncio
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


def gcra(tat: float, now: float, rate: float, burst: int) -> Decision:
    """One GCRA step: ``burst`` messages at once, then ``rate`` per second."""
    interval = 1.0 / rate
    start = max(tat, now)
    allow_at = start - (burst - 1) * interval
    if now < allow_at:
        return Decision(allowed=False, wait=allow_at - now, tat=tat)
    return Decision(allowed=True, wait=0.0, tat=start + interval)


class Limiter(Protocol):
    async def acquire(self) -> bool:
        """Wait for a token; True when the caller had to wait (was throttled)."""
        ...


class LocalLimiter:
    """The per-replica token bucket."""

    def __init__(self, limit: RateLimit, clock: Clock = time.monotonic) -> None:
        self._limit = limit
        self._clock = clock
        self._tat = 0.0

    async def acquire(self) -> bool:
        throttled = False
        while True:
            decision = gcra(self._tat, self._clock(), self._limit.rate, self._limit.burst)
            if decision.allowed:
                self._tat = decision.tat
                return throttled
            throttled = True
            await asyncio.sleep(decision.wait)


class GlobalLimiter:
    """One token bucket shared by every replica, in a KV key updated with compare-and-set.

    The TAT is wall-clock time, the only clock replicas share; NTP-level skew
    between nodes shifts the shared rate by the skew, not more.
    """

    def __init__(
        self,
        kv: KeyValue,
        key: str,
        limit: RateLimit,
        on_conflict: Callable[[], None],
        clock: Clock = time.time,
    ) -> None:
        self._kv = kv
        self._key = key
        self._limit = limit
        self._on_conflict = on_conflict
        self._clock = clock

    async def _read(self) -> tuple[float, int]:
        try:
            entry = await self._kv.get(self._key)
        except KeyNotFoundError:
            return 0.0, 0
        return float(entry.value or b"0"), entry.revision or 0

    async def _write(self, tat: float, revision: int) -> bool:
        value = repr(tat).encode()
        try:
            # Revision 0 means "only if the key does not exist yet".
            await self._kv.update(self._key, value, last=revision)
        except KeyWrongLastSequenceError:
            self._on_conflict()
            return False
        return True

    async def acquire(self) -> bool:
        throttled = False
        while True:
            tat, revision = await self._read()
            decision = gcra(tat, self._clock(), self._limit.rate, self._limit.burst)
            if not decision.allowed:
                throttled = True
                await asyncio.sleep(decision.wait)
            elif await self._write(decision.tat, revision):
                return throttled
