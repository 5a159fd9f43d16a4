"""What a webhook delivery and a subject message share once they are admitted: the
Trigger's rate limit, its target, the fire itself (a task filed and published by
``Calls.submit``) and the fire ledger.

The rate limit is a token bucket per Trigger shared by the replicas in the namespace's
rate-limit bucket (``RateLimiter``), so N replicas together fire at most ``perMinute``.
The ledger (``triggers.FireLedger`` under the Trigger's name in
``naming.trigger_fires_bucket``) is written with a revision check and retried on conflict,
so replicas and the operator's cron never lose each other's counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import (
    BadRequestError,
    BucketNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KeyValue
from prometheus_client import Counter
from pydantic import ValidationError

from troupe_gateway.calls import CallRefused, Calls
from troupe_gateway.directory import Directory
from troupe_runtime.contract import naming
from troupe_runtime.contract.agent_resources import rate_limit_bucket_config
from troupe_runtime.contract.gateway import DirectoryEntry, TaskRecord
from troupe_runtime.contract.triggers import (
    FireLedger,
    TriggerDefinition,
    TriggerRateLimit,
    recorded_failure,
    recorded_fire,
)

logger = logging.getLogger(__name__)

LEDGER_ATTEMPTS = 20
"""Revision conflicts tolerated before a ledger update is given up (and logged)."""
MAX_BUCKETS = 4096
"""Rate-limit buckets kept in process; the least recently used is forgotten past this."""
CLOCK_SKEW_SECONDS = 5.0


DELIVERIES = Counter(
    "troupe_gateway_trigger_deliveries",
    "Webhook requests and captured subject messages by what became of them: fired, "
    "duplicate (fired before), the HTTP status a webhook was refused with, or never "
    "(terminated) and later (retried) for the relay",
    ["source", "outcome"],
)


def caller_of(trigger: TriggerDefinition) -> str:
    return f"trigger:{trigger.name}"


def gcra(tat: float, now: float, limit: TriggerRateLimit) -> tuple[float, float]:
    """One GCRA step (a token bucket as one number, the theoretical arrival time):
    ``(wait, new tat)``; ``wait`` 0 means the fire may go and ``new tat`` is to be kept."""
    interval = 60.0 / limit.per_minute
    if not math.isfinite(tat) or tat > now + limit.burst * interval + CLOCK_SKEW_SECONDS:
        tat = now  # junk, or written by no clock near ours
    start = max(tat, now)
    allow_at = start - (limit.burst - 1) * interval
    if now < allow_at:
        return allow_at - now, tat
    return 0.0, start + interval


class RateLimiter:
    """A token bucket per Trigger, ``burst`` deep, refilled at ``perMinute``: shared by the
    replicas in ``naming.rate_limit_bucket`` under ``naming.trigger_limit_key`` (wall-clock
    GCRA, advanced by compare-and-set), kept in this process when NATS cannot be asked."""

    def __init__(
        self, js: JetStreamContext | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self._js = js
        self._clock = clock
        self._local: OrderedDict[str, float] = OrderedDict()
        self._buckets: dict[str, KeyValue] = {}

    async def take(self, trigger: TriggerDefinition) -> float:
        """0 when a fire may go now (and counts it), else the seconds until one may."""
        limit = trigger.spec.rate_limit
        if limit is None:
            return 0.0
        if self._js is not None:
            try:
                return await self._shared(trigger, limit, take=True)
            except Exception as error:  # NATS: the limit is kept here meanwhile
                logger.warning("the shared rate limit is unavailable: %s", type(error).__name__)
        return self._take_local(trigger.uid, limit)

    async def give_back(self, trigger: TriggerDefinition) -> None:
        """Return the token of a fire that did not happen after all (best effort)."""
        limit = trigger.spec.rate_limit
        if limit is None:
            return
        if self._js is not None:
            with contextlib.suppress(Exception):
                await self._shared(trigger, limit, take=False)
                return
        if trigger.uid in self._local:
            self._local[trigger.uid] -= 60.0 / limit.per_minute

    def _take_local(self, uid: str, limit: TriggerRateLimit) -> float:
        wait, tat = gcra(self._local.get(uid, 0.0), self._clock(), limit)
        if wait == 0:
            self._local[uid] = tat
            self._local.move_to_end(uid)
        while len(self._local) > MAX_BUCKETS:
            self._local.popitem(last=False)
        return wait

    async def _shared(
        self, trigger: TriggerDefinition, limit: TriggerRateLimit, take: bool
    ) -> float:
        kv = await self._bucket(trigger.namespace)
        key = naming.trigger_limit_key(trigger.name)
        for _ in range(LEDGER_ATTEMPTS):
            try:
                stored = await kv.get(key)
                revision = stored.revision or 0
                try:
                    tat = float(stored.value or b"0")
                except ValueError:
                    tat = math.nan
            except NotFoundError:
                tat, revision = 0.0, 0
            now = self._clock()
            if take:
                wait, tat = gcra(tat, now, limit)
                if wait > 0:
                    return wait
            else:
                tat = (tat if math.isfinite(tat) else now) - 60.0 / limit.per_minute
            try:
                # Revision 0: only if the key does not exist yet.
                await kv.update(key, repr(tat).encode(), last=revision)
                return 0.0
            except KeyWrongLastSequenceError:
                await asyncio.sleep(0)
        return 1.0  # lost every race: a fire may try again in a second

    async def _bucket(self, namespace: str) -> KeyValue:
        if (kv := self._buckets.get(namespace)) is not None:
            return kv
        assert self._js is not None
        bucket = naming.rate_limit_bucket(namespace)
        try:
            kv = await self._js.key_value(bucket)
        except BucketNotFoundError:
            try:
                kv = await self._js.create_key_value(rate_limit_bucket_config(namespace))
            except BadRequestError:  # made meanwhile
                kv = await self._js.key_value(bucket)
        self._buckets[namespace] = kv
        return kv


class Firing:
    """One per gateway process, shared by the webhook front end and the relay."""

    def __init__(self, js: JetStreamContext, calls: Calls, directory: Directory) -> None:
        self._js = js
        self._calls = calls
        self._directory = directory
        self.limiter = RateLimiter(js)
        self._buckets: dict[str, KeyValue] = {}

    async def target(self, trigger: TriggerDefinition) -> DirectoryEntry:
        """The target's directory entry; ``CallRefused(503)`` while the directory has none
        (the operator may not have written it yet)."""
        target = trigger.spec.target
        entry = await self._directory.entry(trigger.namespace, target.kind, target.name)
        if entry is None:
            raise CallRefused(
                503,
                f"the target {target.kind} {target.name} of Trigger {trigger.name} is not in "
                f"the directory of namespace {trigger.namespace}",
            )
        return entry

    async def existing(self, entry: DirectoryEntry, task_id: str) -> TaskRecord | None:
        """The task already filed under ``task_id`` (an earlier fire), or None."""
        try:
            kv = await self._js.key_value(naming.tasks_bucket(entry.namespace))
            stored = await kv.get(naming.task_key(entry.kind, entry.name, task_id))
            record = TaskRecord.model_validate_json(stored.value or b"")
        except (BucketNotFoundError, NotFoundError, ValidationError):
            return None
        return record if record.task_id == task_id else None

    async def fire(
        self, trigger: TriggerDefinition, entry: DirectoryEntry, data: object, task_id: str
    ) -> TaskRecord:
        """Submit the fire; count it in the ledger. ``CallRefused`` when it could not go
        (the caller records the failure: it knows whether it will retry)."""
        record = await self._calls.submit(entry, data, caller=caller_of(trigger), task_id=task_id)
        now = datetime.now(UTC)
        await self.record(trigger, lambda ledger: recorded_fire(ledger, now, record.task_id))
        return record

    async def failed(self, trigger: TriggerDefinition, reason: str) -> None:
        now = datetime.now(UTC)
        await self.record(trigger, lambda ledger: recorded_failure(ledger, now, reason))

    async def ledger(self, namespace: str, name: str) -> FireLedger | None:
        kv = await self._ledgers(namespace)
        try:
            stored = await kv.get(name)
        except NotFoundError:
            return None
        try:
            return FireLedger.model_validate_json(stored.value or b"")
        except ValidationError:
            return None

    async def record(
        self, trigger: TriggerDefinition, change: Callable[[FireLedger], FireLedger]
    ) -> None:
        """Apply ``change`` to the Trigger's ledger with a revision check, retried on
        conflict. A ledger that cannot be written is logged, never fails the fire."""
        try:
            kv = await self._ledgers(trigger.namespace)
            for _ in range(LEDGER_ATTEMPTS):
                try:
                    stored = await kv.get(trigger.name)
                except NotFoundError:
                    stored = None
                ledger = FireLedger()
                if stored is not None and stored.value:
                    with contextlib.suppress(ValidationError):  # junk: counted afresh
                        ledger = FireLedger.model_validate_json(stored.value)
                encoded = change(ledger).model_dump_json(by_alias=True).encode()
                try:
                    if stored is None:
                        await kv.create(trigger.name, encoded)
                    else:
                        await kv.update(trigger.name, encoded, last=stored.revision)
                    return
                except KeyWrongLastSequenceError:
                    await asyncio.sleep(0)
                    continue
            logger.warning("the fire ledger of Trigger %s kept changing; not updated", trigger.name)
        except Exception as error:  # NATS down: the fire stands, its count is lost
            logger.warning(
                "the fire ledger of Trigger %s was not updated: %s",
                trigger.name,
                type(error).__name__,
            )

    async def _ledgers(self, namespace: str) -> KeyValue:
        if (kv := self._buckets.get(namespace)) is not None:
            return kv
        bucket = naming.trigger_fires_bucket(namespace)
        try:
            kv = await self._js.key_value(bucket)
        except BucketNotFoundError:
            try:
                kv = await self._js.create_key_value(
                    KeyValueConfig(
                        bucket=bucket,
                        history=1,
                        storage=StorageType.FILE,
                        description=f"The fire ledgers of the Triggers of namespace {namespace}",
                    )
                )
            except BadRequestError:  # made meanwhile by another replica or the operator
                kv = await self._js.key_value(bucket)
        self._buckets[namespace] = kv
        return kv
