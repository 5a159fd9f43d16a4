"""One workflow engine process: health endpoints, the NATS connection, its
JetStream resources (ensured idempotently at start, like the operator does)
and the engine loop, until ``stop()``."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, Gauge

from troupe_runtime.connection import connect
from troupe_runtime.health import HealthServer
from troupe_runtime.provision import ensure_workflow_resources
from troupe_runtime.workflow.config import EngineConfig
from troupe_runtime.workflow.engine import Engine
from troupe_runtime.workflow.resources import build_workflow_resources
from troupe_runtime.workflow.runlog import RunLog

logger = logging.getLogger(__name__)


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
            resources = build_workflow_resources(self.config)
            await ensure_workflow_resources(js, resources)
            kv = await js.key_value(self.config.runs_bucket)
            self._engine = Engine(nc, js, RunLog(js, kv, self.config), self.config)
            self._active.set_function(lambda: self._engine.active_runs if self._engine else 0)
            if self._stop.is_set():
                return
            logger.info("engine of %s/%s running", self.config.namespace, self.config.workflow)
            await self._engine.run()
        finally:
            await nc.drain()
            await self.health.stop()
