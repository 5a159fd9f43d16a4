"""One agent replica: connect, bind the consumers, run the loop, shut down cleanly.

The operator creates the streams and consumers; the runtime only binds to
them, and waits (not ready) until they exist. Shutdown is ordered so that
nothing is lost: stop fetching, let in-flight handlers finish within the
grace period (hand the rest back to JetStream), then drain the connection.

A connection nats-py closed for good (after the server reported a protocol
error) or a fetch loop that ended is not the end of the replica: the session
is torn down and a new connection is opened and bound again
(``troupe_nats_reopened``). Messages in flight on the old connection cannot
be acknowledged any more; JetStream redelivers them after ``ackWait``. While
the replica cannot process messages, for longer than the liveness bound,
``/healthz`` fails, so Kubernetes restarts it.

Chaos (``agent.chaos``): each session watches the agent's key in the namespace's chaos
bucket before the first message, and cuts its own connection while a ChaosExperiment says
so; the one ``Chaos`` outlives the sessions, so what it knows survives a reopening.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from enum import Enum
from typing import TypeVar

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry

from troupe_runtime.agent.chaos import Chaos
from troupe_runtime.agent.deadletter import DeadLetters
from troupe_runtime.agent.handlers import LoadedHandler, load_handler
from troupe_runtime.agent.ratelimit import GlobalLimiter, Limiter, LocalLimiter
from troupe_runtime.agent.schemas import ContractChecker
from troupe_runtime.agent.worker import Worker
from troupe_runtime.contract import naming
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.policies import PUBLISH_TIMEOUT
from troupe_runtime.nats.connection import connect
from troupe_runtime.serving.health import HealthServer, Liveness
from troupe_runtime.serving.metrics import RuntimeMetrics
from troupe_runtime.state import StateStore

logger = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_GRACE_SECONDS = 25.0
BIND_RETRY_SECONDS = 2.0
REOPEN_WAIT_SECONDS = 1.0
DEFAULT_LIVENESS_BOUND_SECONDS = 60.0
"""How long the replica may be unable to process messages before ``/healthz`` fails: longer
than a NATS restart takes, so a restart of NATS does not restart every agent too."""


class Phase(Enum):
    """Where a replica is; only ``BINDING`` and ``SERVING`` count as able to work."""

    CONNECTING = "connecting"
    BINDING = "binding"
    SERVING = "serving"
    REOPENING = "reopening"


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
        liveness_bound: float = DEFAULT_LIVENESS_BOUND_SECONDS,
        chaos: Chaos | None = None,
    ) -> None:
        self.config = config
        # Compiled here, not on connecting: a schema the runtime cannot run stops it at once.
        self._checker = ContractChecker(config.contract)
        self.metrics = RuntimeMetrics(registry)
        self.chaos = chaos or Chaos(config.namespace, config.agent, self.metrics.chaos)
        """The faults in force for this agent; a given one (a test's, shared with the LLM
        agent's model and tool calls) counts in its own metrics."""
        self.metrics.chaos.active.set_function(lambda: float(self.chaos.in_force()))
        self.liveness = Liveness(self.able, liveness_bound)
        self.metrics.unable_seconds.set_function(self.liveness.unable_for)
        self.health = HealthServer(self.metrics.registry, self.ready, self.liveness)
        self._handler = handler or load_handler(
            config.handler,
            threads=config.messaging.max_in_flight,
            config=config,
            metrics=self.metrics,
            chaos=self.chaos,
        )
        self.metrics.handler_stuck_threads.set_function(self._handler.stuck_threads)
        self._host = host
        self._port = config.health_port if port is None else port
        self._grace = grace
        self._stop = asyncio.Event()
        self._nc: Client | None = None
        self._phase = Phase.CONNECTING
        self._fetching: asyncio.Task[None] | None = None

    def ready(self) -> bool:
        return (
            self._phase is Phase.SERVING
            and self._nc is not None
            and self._nc.is_connected
            and not self._stop.is_set()
        )

    def able(self) -> bool:
        """Whether the replica can process messages (or wait for its consumers) now."""
        if self._stop.is_set():
            return True  # shutting down within the grace period is its work now
        if self._handler.wedged():
            return False  # every sync-handler thread is stuck: only a restart frees them
        if self._phase not in (Phase.BINDING, Phase.SERVING):
            return False
        if self._nc is None or not self._nc.is_connected:
            return False
        return self._phase is Phase.BINDING or (
            self._fetching is not None and not self._fetching.done()
        )

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        await self.health.start(self._host, self._port)
        try:
            while not self._stop.is_set():
                cause = await self._session()
                if cause is None or self._stop.is_set():
                    break
                self._phase = Phase.REOPENING
                self.metrics.reopened.labels(cause).inc()
                logger.warning("opening a new NATS connection (%s)", cause)
                await self._stopped_within(REOPEN_WAIT_SECONDS)
        finally:
            await self._handler.close()
            await self.health.stop()

    async def _session(self) -> str | None:
        """One connection, bound and served; why it ended when not stopped, else None."""
        self._phase = Phase.CONNECTING
        closed = asyncio.Event()

        async def on_closed() -> None:
            closed.set()

        nc = await self._unless_stopped(
            connect(self.config.nats, name=f"troupe-{self.config.agent}", closed_cb=on_closed)
        )
        if nc is None:
            return None
        self._nc = nc
        try:
            return await self._serve(nc, closed)
        except Exception:
            logger.exception("serving on the NATS connection failed")
            return "failed"
        finally:
            self._fetching = None
            if not nc.is_closed:
                with contextlib.suppress(Exception):
                    await nc.close()

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

    async def _stopped_within(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _serve(self, nc: Client, closed: asyncio.Event) -> str | None:
        js = nc.jetstream(timeout=PUBLISH_TIMEOUT.total_seconds())
        self._phase = Phase.BINDING
        binding = asyncio.create_task(self._bind(js))
        stopping = asyncio.create_task(self._stop.wait())
        ending = asyncio.create_task(closed.wait())
        await asyncio.wait([binding, stopping, ending], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        ending.cancel()
        if not binding.done():  # stopped, or the connection closed, first
            binding.cancel()
            await asyncio.gather(binding, return_exceptions=True)
            return None if self._stop.is_set() else "closed"
        binding.result()
        await self.chaos.start(js)
        await self._handler.bind(nc, js)
        dead_letters = DeadLetters(nc, js, self.config, self.metrics)
        await dead_letters.watch_max_deliveries()
        worker = Worker(
            nc=nc,
            js=js,
            config=self.config,
            handler=self._handler.call,
            checker=self._checker,
            state=StateStore(js, self.config, on_conflict=self._count_conflict),
            metrics=self.metrics,
            dead_letters=dead_letters,
            limiter=await self._limiter(js),
            intake=self._handler.intake,
            chaos=self.chaos,
        )
        await worker.start()
        self._fetching = fetching = asyncio.create_task(worker.run())
        self._phase = Phase.SERVING
        logger.info("bound to %s; handling messages", self.config.inbox_stream)
        dropping = asyncio.create_task(self.chaos.drop_connections(nc), name="chaos-drops")
        try:
            stopping = asyncio.create_task(self._stop.wait())
            ending = asyncio.create_task(closed.wait())
            await asyncio.wait([stopping, ending, fetching], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            ending.cancel()
        finally:
            dropping.cancel()
            await asyncio.gather(dropping, return_exceptions=True)
            await self.chaos.stop()
        if self._stop.is_set():
            await self._shut_down(nc, worker, fetching, dead_letters)
            return None
        cause = "closed" if closed.is_set() or nc.is_closed else "fetch_loop"
        await self._abandon(nc, worker, fetching, dead_letters, cause)
        return cause

    async def _shut_down(
        self, nc: Client, worker: Worker, fetching: asyncio.Task[None], dead_letters: DeadLetters
    ) -> None:
        logger.info("stopping: finishing in-flight messages within %gs", self._grace)
        worker.stop()
        await fetching
        await worker.finish(self._grace)
        await dead_letters.stop()
        await self._handler.close()  # while connected: an LLM agent writes its usage records
        await nc.drain()
        logger.info("stopped")

    async def _abandon(
        self,
        nc: Client,
        worker: Worker,
        fetching: asyncio.Task[None],
        dead_letters: DeadLetters,
        cause: str,
    ) -> None:
        """Tear down a session that cannot go on; whatever it held, JetStream redelivers."""
        if cause == "fetch_loop" and fetching.done() and not fetching.cancelled():
            logger.error("the fetch loop ended: %r", fetching.exception())
        else:
            logger.error("the NATS connection was closed: %s", nc.last_error or "unknown cause")
        self._phase = Phase.REOPENING
        worker.stop()
        fetching.cancel()
        await asyncio.gather(fetching, return_exceptions=True)
        # On a closed connection no message in flight can be settled any more.
        grace = self._grace if nc.is_connected else 0.0
        for step in (worker.finish(grace), dead_letters.stop()):
            try:
                await step
            except Exception as error:
                logger.info("tearing down the session: %s", error)

    def _count_conflict(self, bucket: str) -> None:
        self.metrics.state_conflicts.labels(bucket).inc()

    async def _bind(self, js: JetStreamContext) -> None:
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

    async def _limiter(self, js: JetStreamContext) -> Limiter | None:
        limit = self.config.rate_limit
        if limit is None:
            return None
        if limit.scope == "replica":
            return LocalLimiter(limit)
        bucket = naming.rate_limit_bucket(self.config.namespace)
        conflicts = self.metrics.state_conflicts.labels(bucket)
        return GlobalLimiter(await js.key_value(bucket), self.config.agent, limit, conflicts.inc)
