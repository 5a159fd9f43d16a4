"""The only state code that talks to a NATS KV bucket: revision-checked JSON reads and writes.

It turns nats-py's errors into the typed ones of ``troupe_runtime.contract.state_errors``
and counts every lost compare-and-set through ``on_conflict``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from troupe_runtime.contract import state_codec as codec
from troupe_runtime.contract.state_entries import LEASE_PREFIX, Entry, Snapshot
from troupe_runtime.contract.state_errors import ConflictError, KeyExistsError

WRONG_LAST_SEQUENCE = frozenset({10071, 10164})
"""JetStream's error codes for a failed expected-last-subject-sequence check."""

CREATE_ATTEMPTS = 3
"""How often ``create`` tries a key that is present when written and gone when checked."""

_ACTUAL_REVISION = re.compile(r"wrong last sequence: (\d+)")


def actual_revision(error: Exception) -> int | None:
    """The revision the server found instead of the expected one, from its error text."""
    match = _ACTUAL_REVISION.search(str(getattr(error, "description", None) or ""))
    return int(match.group(1)) if match else None


class KeyValueRevisions:
    """One bucket's JSON values with revision checks; implements ``policies.Revisions``."""

    def __init__(
        self, kv: KeyValue, bucket: str, on_conflict: Callable[[str], None] | None
    ) -> None:
        self.bucket = bucket
        self._kv = kv
        self._on_conflict = on_conflict

    async def snapshot(self, key: str) -> Snapshot:
        try:
            raw = await self._kv.get(key)
        except KeyNotFoundError as missing:
            tombstone: KeyValue.Entry | None = missing.entry  # set when the key was deleted
            return Snapshot(None, (tombstone and tombstone.revision) or 0)
        assert raw.revision is not None
        value = codec.decode(raw.value, f"{self.bucket}/{key}")
        return Snapshot(Entry(key, value, raw.revision), raw.revision)

    async def compare_and_set(self, key: str, value: Any, expected: int) -> int:
        try:
            return await self._kv.update(key, codec.encode(value), last=expected)
        except KeyWrongLastSequenceError as err:
            if self._on_conflict is not None:
                self._on_conflict(self.bucket)
            raise ConflictError(self.bucket, key, expected, actual_revision(err)) from err

    async def put(self, key: str, value: Any) -> int:
        return await self._kv.put(key, codec.encode(value))

    async def create(self, key: str, value: Any, ttl: int | None = None) -> int:
        encoded = codec.encode(value)
        for _ in range(CREATE_ATTEMPTS):
            try:
                return await self._kv.create(key, encoded, msg_ttl=ttl)
            except KeyWrongLastSequenceError as err:
                raise KeyExistsError(self.bucket, key, actual_revision(err)) from err
            except KeyNotFoundError as err:
                # The key expired (a lease's TTL) between nats-py's failed create and its
                # check for a tombstone: it is absent now, so create it again.
                vanished = err
        # Present at every write, absent at every check: to the caller the key exists
        # (a lock waits for it, a handler's attempt fails), never an endless loop.
        raise KeyExistsError(self.bucket, key, None) from vanished

    async def delete(self, key: str, expected: int | None = None) -> None:
        try:
            await self._kv.delete(key, last=expected)
        except APIError as err:
            if err.err_code not in WRONG_LAST_SEQUENCE:
                raise
            raise ConflictError(self.bucket, key, expected or 0, actual_revision(err)) from err

    def watch(self, pattern: str) -> Watch:
        return Watch(self._kv, self.bucket, pattern)


@dataclass(frozen=True)
class Change:
    """One change seen by a watch; ``value`` is None when the key was deleted."""

    key: str
    value: Any
    revision: int
    deleted: bool


class Watch:
    """Each matching key's current value, then every change, in revision order.

    Use ``async with bucket.watch("orders.>") as changes: async for change in changes``
    so the server-side consumer goes away as soon as the block ends.
    """

    def __init__(self, kv: KeyValue, bucket: str, pattern: str) -> None:
        self._kv = kv
        self._bucket = bucket
        self._pattern = pattern
        self._watcher: KeyValue.KeyWatcher | None = None

    async def __aenter__(self) -> Watch:
        self._watcher = await self._kv.watch(self._pattern)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._watcher is not None:
            await self._watcher.stop()  # type: ignore[no-untyped-call]  # nats-py lacks hints

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> Change:
        if self._watcher is None:
            await self.__aenter__()
        assert self._watcher is not None
        while True:
            raw: KeyValue.Entry | None = await anext(self._watcher)
            # None marks the end of the initial values; lease keys are the lock policy's.
            if raw is None or raw.key.startswith(LEASE_PREFIX):
                continue
            assert raw.revision is not None
            deleted = raw.operation in (KV_DEL, KV_PURGE)
            value = None if deleted else codec.decode(raw.value, f"{self._bucket}/{raw.key}")
            return Change(raw.key, value, raw.revision, deleted)
