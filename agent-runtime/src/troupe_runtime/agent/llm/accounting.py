"""Where a completion's usage is counted: Prometheus, and the namespace's per-minute KV records.

The KV bucket ``naming.usage_bucket(ns)`` holds one JSON ``Usage`` per agent, provider,
model and UTC minute (``usage_key``); the operator sums the last hour into the Agent's
status. Writing there is off the hot path: completions are summed in memory and a
background task adds each key's sum with compare-and-set about once a second. A shutdown
writes what is pending before the connection drains, a new session what the lost one could
not; a crash loses at most a second's figures for the status (the message's own usage is in
its journal and on its output). Until the operator provisions the bucket, the first flush
creates it (TTL 2h).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from troupe_runtime.agent.llm.types import Completion
from troupe_runtime.contract import naming
from troupe_runtime.contract.usage import Usage
from troupe_runtime.serving.metrics import LlmMetrics

logger = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0
USAGE_TTL_SECONDS = 2 * 3600.0
MAX_CAS_TRIES = 10
MINUTE_FORMAT = "%Y%m%d%H%M"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def usage_key(agent: str, provider: str, model: str, when: datetime) -> str:
    """``<agent>.<provider>.<model-token>.<UTC minute>``; the model's dots and slashes become
    ``_`` so the key has exactly four tokens."""
    minute = when.astimezone(UTC).strftime(MINUTE_FORMAT)
    return f"{agent}.{provider}.{_UNSAFE.sub('_', model)}.{minute}"


def count(metrics: LlmMetrics, agent: str, completion: Completion) -> None:
    """Add one completion to the Prometheus counters."""
    provider, model, usage = completion.provider, completion.model, completion.usage
    metrics.tokens.labels(agent, provider, model, "in").inc(usage.tokens_in)
    metrics.tokens.labels(agent, provider, model, "out").inc(usage.tokens_out)
    metrics.cost.labels(agent, provider, model).inc(usage.cost_usd)
    metrics.requests.labels(agent, provider, model, "succeeded").inc()
    passed = completion.fallbacks
    for index, fallback in enumerate(passed):
        to_model = passed[index + 1].model if index + 1 < len(passed) else model
        metrics.fallbacks.labels(agent, fallback.model, to_model, fallback.reason).inc()


class UsageRecorder:
    """Sums usage per key in memory; a background task adds the sums to the KV bucket."""

    def __init__(
        self,
        namespace: str,
        agent: str,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._js: JetStreamContext | None = None
        self._bucket_name = naming.usage_bucket(namespace)
        self._agent = agent
        self._clock = clock
        self._pending: dict[str, Usage] = {}
        self._kv: KeyValue | None = None
        self._flushing: asyncio.Task[None] | None = None

    def use(self, js: JetStreamContext) -> None:
        """Write through this session from now on (what is pending included)."""
        self._js = js
        self._kv = None

    def add(self, completion: Completion) -> None:
        key = usage_key(self._agent, completion.provider, completion.model, self._clock())
        self._pending[key] = self._pending.get(key, Usage()) + completion.usage
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(FLUSH_SECONDS)
        await self.flush()

    async def flush(self) -> None:
        """Add what is pending to the bucket; what fails stays pending for the next flush."""
        pending, self._pending = self._pending, {}
        for key, usage in pending.items():
            try:
                await self._add(key, usage)
            except Exception as error:
                logger.warning("usage record %s not written (kept for later): %s", key, error)
                self._pending[key] = self._pending.get(key, Usage()) + usage

    async def aclose(self) -> None:
        """Write what is pending now (the runtime closes the handler before it drains)."""
        if self._flushing is not None and not self._flushing.done():
            self._flushing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flushing
        await self.flush()

    async def _bucket(self) -> KeyValue:
        if self._js is None:
            raise RuntimeError("no NATS session yet")
        if self._kv is None:
            try:
                self._kv = await self._js.key_value(self._bucket_name)
            except BucketNotFoundError:
                logger.info("creating the usage bucket %s", self._bucket_name)
                self._kv = await self._js.create_key_value(
                    KeyValueConfig(
                        bucket=self._bucket_name, ttl=USAGE_TTL_SECONDS, storage=StorageType.FILE
                    )
                )
        return self._kv

    async def _add(self, key: str, usage: Usage) -> None:
        kv = await self._bucket()
        for _ in range(MAX_CAS_TRIES):
            try:
                entry = await kv.get(key)
            except NotFoundError:
                try:
                    await kv.create(key, usage.model_dump_json(by_alias=True).encode())
                    return
                except KeyWrongLastSequenceError:
                    continue
            total = Usage.model_validate_json(entry.value or b"{}") + usage
            try:
                await kv.update(key, total.model_dump_json(by_alias=True).encode(), entry.revision)
                return
            except KeyWrongLastSequenceError:
                continue
        raise RuntimeError(f"{MAX_CAS_TRIES} compare-and-set conflicts in a row")
