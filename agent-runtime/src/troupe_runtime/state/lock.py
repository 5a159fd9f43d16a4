"""The lock policy: a lease key with a server-side TTL serialises writers of one key.

The lease ``__lock__.<key>`` is taken with ``create`` (only one writer can) and a
per-message TTL, so JetStream itself removes the lease of a holder that crashed;
no clock of ours is trusted. The write under the lease is still a
compare-and-set, so a holder stalled past its TTL cannot clobber the next one.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from troupe_runtime.contract.state_entries import LEASE_PREFIX, Entry
from troupe_runtime.contract.state_errors import ConflictError, KeyExistsError, LockTimeoutError
from troupe_runtime.state.policies import (
    Revisions,
    Tuning,
    UpdateFunction,
    backoff_delay,
    update_once,
)

HOLDER = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def lease_key(key: str) -> str:
    return f"{LEASE_PREFIX}{key}"


@asynccontextmanager
async def leased(kv: Revisions, key: str, tuning: Tuning, rng: random.Random) -> AsyncIterator[int]:
    """Hold the lease on ``key`` for the block; wait for it up to ``tuning.lock_wait``."""
    name = lease_key(key)
    loop = asyncio.get_running_loop()
    started = loop.time()
    attempt = 0
    while True:
        try:
            lease = await kv.create(name, {"holder": HOLDER}, ttl=tuning.lock_ttl)
            break
        except KeyExistsError as held:
            waited = loop.time() - started
            if waited >= tuning.lock_wait:
                raise LockTimeoutError(kv.bucket, key, held.revision, waited) from held
            attempt += 1
            await asyncio.sleep(min(backoff_delay(attempt, tuning, rng), tuning.lock_wait - waited))
    try:
        yield lease
    finally:
        await _release(kv, name, lease)


async def _release(kv: Revisions, name: str, lease: int) -> None:
    try:
        await kv.delete(name, expected=lease)
    except ConflictError:
        # Our lease expired and another writer may hold the key now: not ours to release.
        return


async def update_locked(
    kv: Revisions, key: str, fn: UpdateFunction, tuning: Tuning, rng: random.Random
) -> Entry:
    """lock: take the lease, read, apply ``fn``, compare-and-set, release."""
    async with leased(kv, key, tuning, rng):
        return await update_once(kv, key, fn)
