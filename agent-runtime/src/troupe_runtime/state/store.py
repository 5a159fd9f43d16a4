"""The shared-state API handlers use: the KV buckets their Agent declares, and event logs.

``StateStore`` is what the runtime hands a handler; ``Bucket`` enforces the
declared ``access`` and resolves write conflicts with the declared
``conflictPolicy`` (``troupe_runtime.state.policies`` and ``.lock``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError

from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.policies import StateBucket
from troupe_runtime.contract.state_entries import Entry
from troupe_runtime.contract.state_errors import (
    BucketNotProvisionedError,
    ReadOnlyBucketError,
    UnknownBucketError,
)
from troupe_runtime.nats.event_log import EventLog
from troupe_runtime.nats.kv import KeyValueRevisions, Watch
from troupe_runtime.state.lock import update_locked
from troupe_runtime.state.merge import MergeFunction, three_way_merge
from troupe_runtime.state.policies import (
    Tuning,
    UpdateFunction,
    update_last_writer_wins,
    update_merging,
    update_once,
    update_retrying,
)

DEFAULT_TUNING = Tuning()


class Bucket:
    """One declared bucket: JSON values, revision checks, the declared conflict policy."""

    def __init__(
        self,
        kv: KeyValueRevisions,
        spec: StateBucket,
        merges: Mapping[str, MergeFunction],
        tuning: Tuning,
        rng: random.Random,
    ) -> None:
        self._kv = kv
        self._spec = spec
        self._merges = merges
        self._tuning = tuning
        self._rng = rng

    @property
    def name(self) -> str:
        return self._spec.name

    async def get(self, key: str) -> Entry | None:
        return (await self._kv.snapshot(key)).entry

    async def create(self, key: str, value: Any) -> int:
        """Write only if the key is absent (else ``KeyExistsError``); return the revision."""
        self._check_writable(key)
        return await self._kv.create(key, value)

    async def put(self, key: str, value: Any) -> int:
        """Write unconditionally; return the revision."""
        self._check_writable(key)
        return await self._kv.put(key, value)

    async def update(self, key: str, fn: UpdateFunction) -> Entry:
        """Replace the value with ``fn(current)``, resolving races by the conflictPolicy."""
        self._check_writable(key)
        kv, tuning, rng = self._kv, self._tuning, self._rng
        match self._spec.conflict_policy:
            case "retry":
                return await update_retrying(kv, key, fn, tuning, rng)
            case "fail":
                return await update_once(kv, key, fn)
            case "lastWriterWins":
                return await update_last_writer_wins(kv, key, fn)
            case "merge":
                merge = self._merges.get(self.name, three_way_merge)
                return await update_merging(kv, key, fn, merge, tuning, rng)
            case "lock":
                return await update_locked(kv, key, fn, tuning, rng)

    async def delete(self, key: str) -> None:
        self._check_writable(key)
        await self._kv.delete(key)

    def watch(self, key_or_pattern: str = ">") -> Watch:
        """Changes to a key, or to keys matching a NATS wildcard (``orders.*``, ``>``)."""
        return self._kv.watch(key_or_pattern)

    def _check_writable(self, key: str) -> None:
        if self._spec.access == "ReadOnly":
            raise ReadOnlyBucketError(self.name, key)


class StateStore:
    """A handler's view of its Agent's shared state. Constructing it does no I/O."""

    def __init__(
        self,
        js: JetStreamContext,
        config: RuntimeConfig,
        on_conflict: Callable[[str], None] | None = None,
        *,
        tuning: Tuning = DEFAULT_TUNING,
        rng: random.Random | None = None,
    ) -> None:
        """``on_conflict(bucket)`` is called for every compare-and-set that lost a race."""
        self._js = js
        self._config = config
        self._on_conflict = on_conflict
        self._tuning = tuning
        self._rng = rng or random.Random()
        self._declared = {spec.name: spec for spec in config.state}
        self._bound: dict[str, Bucket] = {}
        self._merges: dict[str, MergeFunction] = {}

    async def bucket(self, name: str) -> Bucket:
        """The declared bucket ``name``, bound to JetStream on first use."""
        bound = self._bound.get(name)
        if bound is not None:
            return bound
        spec = self._declared_bucket(name)
        stream_bucket = self._config.bucket(name)
        try:
            kv = await self._js.key_value(stream_bucket)
        except BucketNotFoundError as err:
            raise BucketNotProvisionedError(name, stream_bucket) from err
        revisions = KeyValueRevisions(kv, name, self._on_conflict)
        bucket = Bucket(revisions, spec, self._merges, self._tuning, self._rng)
        return self._bound.setdefault(name, bucket)

    def register_merge(self, bucket: str, fn: MergeFunction) -> None:
        """Resolve merge conflicts in ``bucket`` with ``fn(base, ours, theirs)``."""
        policy = self._declared_bucket(bucket).conflict_policy
        if policy != "merge":
            raise ValueError(
                f"state bucket {bucket!r} has conflictPolicy {policy}; a merge function "
                f"applies only to conflictPolicy merge"
            )
        self._merges[bucket] = fn

    def events(self, correlation_id: str) -> EventLog:
        """The append-only event log of one correlation id."""
        return EventLog(self._js, self._config.namespace, correlation_id)

    def _declared_bucket(self, name: str) -> StateBucket:
        spec = self._declared.get(name)
        if spec is None:
            agent = f"{self._config.namespace}/{self._config.agent}"
            raise UnknownBucketError(name, agent, self._declared)
        return spec
