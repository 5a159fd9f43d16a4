"""One workflow engine process: health endpoints, the NATS connection and the
engine loop, until ``stop()``.

The engine only binds: the operator alone provisions a workflow's JetStream
resources, as it does an agent's, so a Workflow being deleted has nobody
recreating its streams. Until they exist the engine waits, not ready; so it does
while another engine owns the workflow's runs (``lease``).
"""

from __future__ import annotations

import asyncio
import logging

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from prometheus_client import CollectorRegistry, Gauge

from troupe_runtime.contract import naming
from troupe_runtime.contract.engine_config import EngineConfig
from troupe_runtime.nats.connection import connect
from troupe_runtime.serving.health import HealthServer
from troupe_runtime.workflow.engine import Engine
from troupe_runtime.workflow.lease import Lease
from troupe_runtime.workflow.runlog import RunLog

logger = logging.getLogger(__name__)

BIND_RETRY_SECONDS = 1.0


class EngineService:
    def __init__(
        self,
        config: EngineConfig,
        *,
        host: str = "0.0.0.0",
        port: int | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.registry = registry or CollectorRegistry()
        self._active = Gauge(
            "troupe_workflow_active_runs", "Runs started and not finished.", registry=self.registry
        )
        self.health = HealthServer(self.registry, self.ready)
        self._host = host
        self._port = config.health_port if port is None else port
        self._engine: Engine | None = None
        self._stop = asyncio.Event()

    def ready(self) -> bool:
        return self._engine is not None and self._engine.ready

    def stop(self) -> None:
        self._stop.set()
        if self._engine is not None:
            self._engine.stop()

    async def run(self) -> None:
        await self.health.start(self._host, self._port)
        nc = await connect(self.config.nats, name=f"troupe-workflow-{self.config.workflow}")
        try:
            js = nc.jetstream()
            bound = await self._bind(js)
            if bound is None:
                return
            kv, approvals_kv = bound
            lease = Lease(nc, js, self.config)
            self._engine = Engine(
                nc,
                js,
                RunLog(js, kv, self.config, lease),
                lease,
                self.config,
                approvals_kv=approvals_kv,
            )
            self._active.set_function(lambda: self._engine.active_runs if self._engine else 0)
            if self._stop.is_set():
                return
            logger.info("engine of %s/%s running", self.config.namespace, self.config.workflow)
            await self._engine.run()
        finally:
            await nc.drain()
            await self.health.stop()

    async def _bind(self, js: JetStreamContext) -> tuple[KeyValue, KeyValue | None] | None:
        """The runs bucket (and the namespace's approvals bucket, for a workflow with an
        approval step), once the operator has created them and the engine's consumers;
        None when stopped first."""
        stream = self.config.stream
        while not self._stop.is_set():
            try:
                for consumer in (naming.TRIGGERS_CONSUMER, naming.REPLIES_CONSUMER):
                    await js.consumer_info(stream, consumer)
                runs = await js.key_value(self.config.runs_bucket)
                if not self.config.has_approvals:
                    return runs, None
                return runs, await js.key_value(self.config.approvals_bucket)
            except (NotFoundError, BucketNotFoundError):
                logger.warning("the JetStream resources of %s do not exist yet; waiting", stream)
            try:
                await asyncio.wait_for(self._stop.wait(), BIND_RETRY_SECONDS)
            except TimeoutError:
                continue
        return None
