"""How ``Bucket.update`` resolves write conflicts, one function per conflictPolicy.

The strategies see the bucket only through ``Revisions`` (read a snapshot,
compare-and-set, blind put), so they hold the policy logic and no NATS details.
The lock policy, which needs leases, lives in ``troupe_runtime.state.lock``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from troupe_runtime.contract.state_entries import Entry, Snapshot
from troupe_runtime.contract.state_errors import ConflictError
from troupe_runtime.state.merge import MergeFunction

UpdateFunction = Callable[[Any], Any]
"""``fn(current) -> new``: current is the key's JSON value, or None when it is absent."""


@dataclass(frozen=True)
class Tuning:
    """How hard ``update`` tries on a contended key before it gives up."""

    attempts: int = 20
    backoff_base: float = 0.002
    backoff_cap: float = 0.2
    lock_ttl: int = 10
    lock_wait: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("Tuning.attempts must be at least 1")
        if self.lock_ttl < 1:
            # JetStream message TTLs are whole seconds.
            raise ValueError("Tuning.lock_ttl must be at least 1 second")


def backoff_delay(attempt: int, tuning: Tuning, rng: random.Random) -> float:
    """Full jitter, uniform in [0, min(cap, base·2^attempt)], so racing writers spread out."""
    return rng.uniform(0, min(tuning.backoff_cap, tuning.backoff_base * 2**attempt))


class Revisions(Protocol):
    """The revision-checked operations the strategies need from a bucket."""

    bucket: str

    async def snapshot(self, key: str) -> Snapshot: ...

    async def compare_and_set(self, key: str, value: Any, expected: int) -> int:
        """Write if the key is still at ``expected``; raise ``ConflictError`` otherwise."""
        ...

    async def put(self, key: str, value: Any) -> int: ...

    async def create(self, key: str, value: Any, ttl: int | None = None) -> int:
        """Write if the key is absent; raise ``KeyExistsError`` otherwise."""
        ...

    async def delete(self, key: str, expected: int | None = None) -> None:
        """Tombstone the key, if still at ``expected`` when given (else ``ConflictError``)."""
        ...


async def update_retrying(
    kv: Revisions, key: str, fn: UpdateFunction, tuning: Tuning, rng: random.Random
) -> Entry:
    """retry: re-read and re-apply ``fn`` until a compare-and-set wins, or give up."""
    attempt = 0
    while True:
        try:
            return await update_once(kv, key, fn)
        except ConflictError as conflict:
            attempt += 1
            if attempt == tuning.attempts:
                raise _exhausted(conflict, attempt) from conflict
        await asyncio.sleep(backoff_delay(attempt, tuning, rng))


async def update_once(kv: Revisions, key: str, fn: UpdateFunction) -> Entry:
    """fail: one compare-and-set; a stale read surfaces as ``ConflictError``."""
    current = await kv.snapshot(key)
    value = fn(current.value)
    return Entry(key, value, await kv.compare_and_set(key, value, current.revision))


async def update_last_writer_wins(kv: Revisions, key: str, fn: UpdateFunction) -> Entry:
    """lastWriterWins: no revision check; a concurrent write may be overwritten."""
    value = fn((await kv.snapshot(key)).value)
    return Entry(key, value, await kv.put(key, value))


async def update_merging(
    kv: Revisions,
    key: str,
    fn: UpdateFunction,
    merge: MergeFunction,
    tuning: Tuning,
    rng: random.Random,
) -> Entry:
    """merge: apply ``fn`` once; on conflict merge our result into what was committed."""
    current = await kv.snapshot(key)
    base, ours, expected = current.value, fn(current.value), current.revision
    attempt = 0
    while True:
        try:
            return Entry(key, ours, await kv.compare_and_set(key, ours, expected))
        except ConflictError as conflict:
            attempt += 1
            if attempt == tuning.attempts:
                raise _exhausted(conflict, attempt) from conflict
        await asyncio.sleep(backoff_delay(attempt, tuning, rng))
        theirs = await kv.snapshot(key)
        base, ours, expected = theirs.value, merge(base, ours, theirs.value), theirs.revision


def _exhausted(conflict: ConflictError, attempts: int) -> ConflictError:
    return ConflictError(
        conflict.bucket, conflict.key, conflict.expected, conflict.actual, attempts
    )
