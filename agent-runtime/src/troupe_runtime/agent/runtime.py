"""One agent replica: connect, bind the consumers, run the loop, shut down cleanly.

The operator creates the streams and consumers; the runtime only binds to
them, and waits (not ready) until they exist. Shutdown is ordered so that
nothing is lost: stop fetching, let in-flight handlers finish within the
grace period (hand the rest back to JetStream), then drain the connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TypeVar

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry

from troupe_runtime.agent.deadletter import DeadLetters
from troupe_runtime.agent.handlers import LoadedHandler, load_handler
from troupe_runtime.agent.ratelimit import GlobalLimiter, Limiter, LocalLimiter
from troupe_runtime.agent.worker import Worker
from troupe_runtime.contract import naming
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.nats.connection import connect
from troupe_runtime.serving.health import HealthServer
from troupe_runtime.serving.metrics import RuntimeMetrics
from troupe_runtime.state import StateStore

logger = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_GRACE_SECONDS = 25.0
BIND_RETRY_SECONDS = 2.0


class Runtime:
    """Runs one agent replica until ``stop()``."""

    def __init__(
        self,
        config: RuntimeConfig,
        *,
        handler: LoadedHandler | None = None,
        registry: CollectorRegistry | None = None,
        host: str = "0.0.0.0",
        port: int | None = None,
        grace: float = DEFAULT_GRACE_SECONDS,
    ) -> None:
        self.config = config
        self.metrics = RuntimeMetrics(registry)
        self.health = HealthServer(self.metrics.registry, self.ready)
        self._handler = handler or load_handler(
            config.handler, threads=config.messaging.max_in_flight
        )
        self.metrics.handler_stuck_threads.set_function(self._handler.stuck_threads)
        self._host = host
        self._port = config.health_port if port is None else port
        self._grace = grace
        self._stop = asyncio.Event()
        self._nc: Client | None = None
        self._bound = False

    def ready(self) -> bool:
        return (
            self._bound
            and self._nc is not None
            and self._nc.is_connected
            and not self._stop.is_set()
        )

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        await self.health.start(self._host, self._port)
        try:
            self._nc = await self._unless_stopped(
                connect(self.config.nats, name=f"troupe-{self.config.agent}")
            )
            if self._nc is not None:
                await self._serve(self._nc)
        finally:
            if self._nc is not None and not self._nc.is_closed:
                await self._nc.close()
            await self._handler.close()
            await self.health.stop()

    async def _unless_stopped(self, awaitable: Awaitable[T]) -> T | None:
        """The result of ``awaitable``, or None when stopped first (then it is cancelled)."""
        task = asyncio.ensure_future(awaitable)
        stopping = asyncio.create_task(self._stop.wait())
        await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None

    async def _serve(self, nc: Client) -> None:
        js = nc.jetstream()
        if not await self._unless_stopped(self._bind(js)):
            return
        dead_letters = DeadLetters(nc, js, self.config)
        await dead_letters.watch_max_deliveries()
        worker = Worker(
            nc=nc,
            js=js,
            config=self.config,
            handler=self._handler.call,
            state=StateStore(js, self.config, on_conflict=self._count_conflict),
            metrics=self.metrics,
            dead_letters=dead_letters,
            limiter=await self._limiter(js),
        )
        await worker.start()
        self._bound = True
        logger.info("bound to %s; handling messages", self.config.inbox_stream)
        fetching = asyncio.create_task(worker.run())
        await self._stop.wait()
        logger.info("stopping: finishing in-flight messages within %gs", self._grace)
        worker.stop()
        await fetching
        await worker.finish(self._grace)
        await dead_letters.stop()
        await nc.drain()
        logger.info("stopped")

    def _count_conflict(self, bucket: str) -> None:
        self.metrics.state_conflicts.labels(bucket).inc()

    async def _bind(self, js: JetStreamContext) -> bool:
        """Wait until the operator has created every consumer."""
        stream = self.config.inbox_stream
        for priority in range(self.config.messaging.priority_levels):
            name = self.config.consumer_name(priority)
            while True:
                try:
                    await js.consumer_info(stream, name)
                    break
                except NotFoundError:
                    logger.warning("consumer %s/%s does not exist yet; waiting", stream, name)
                    await asyncio.sleep(BIND_RETRY_SECONDS)
        return True

    async def _limiter(self, js: JetStreamContext) -> Limiter | None:
        limit = self.config.rate_limit
        if limit is None:
            return None
        if limit.scope == "replica":
            return LocalLimiter(limit)
        bucket = naming.rate_limit_bucket(self.config.namespace)
        conflicts = self.metrics.state_conflicts.labels(bucket)
        return GlobalLimiter(await js.key_value(bucket), self.config.agent, limit, conflicts.inc)
