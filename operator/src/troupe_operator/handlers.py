"""Thin kopf glue: which events trigger which reconcile pass, and how failures retry.

Agents and Workflows: create, update and resume run a full pass; a pass blocked
by NATS or a missing Secret is retried with exponential backoff. A background
resync (``reconcile.resync_forever``) repeats every pass periodically. Events of
the agents' and engines' Deployments refresh readiness at once. The finalizer
exists only for Agents and Workflows whose NATS resources must be deleted
(deletionPolicy Delete).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from troupe_operator import metrics
from troupe_operator.api import GROUP, VERSION
from troupe_operator.builders.engine import WORKFLOW_LABEL
from troupe_operator.builders.workload import AGENT_LABEL
from troupe_operator.clients.kube import Kube, new_api_client
from troupe_operator.clients.nats import MessagingUnavailable, NatsPool
from troupe_operator.reconcilers import passes as reconcile
from troupe_operator.settings import OperatorSettings

FINALIZER = "troupe.dev/nats-cleanup"
MAX_RETRY_DELAY_SECONDS = 60.0
ENGINE_STOP_POLL_SECONDS = 1.0
KUBE_THREADS = 32


def retry_delay(retry: int) -> float:
    """Exponential backoff for a pass blocked by NATS or a missing Secret: 1s, 2s, 4s … 60s."""
    return float(min(2**retry, MAX_RETRY_DELAY_SECONDS))


def _deletes_nats_resources(spec: kopf.Spec, **_: Any) -> bool:
    return bool(spec.get("deletionPolicy", "Delete") == "Delete")


def register(registry: kopf.OperatorRegistry, config: OperatorSettings) -> None:
    """Register every handler in ``registry``, bound to the operator's ``config``."""
    agents: dict[str, Any] = {"group": GROUP, "version": VERSION, "plural": "agents"}
    workflows: dict[str, Any] = {"group": GROUP, "version": VERSION, "plural": "workflows"}
    operator: reconcile.Operator | None = None
    resync: asyncio.Task[None] | None = None

    def current() -> reconcile.Operator:
        assert operator is not None, "the startup handler builds the operator first"
        return operator

    @kopf.on.login(registry=registry, id="login")
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # A registry of our own starts empty: kopf's default login must be named here.
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry, id="startup")
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        nonlocal operator, resync
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(KUBE_THREADS))
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
        settings.posting.level = logging.WARNING
        operator = reconcile.Operator(
            Kube(new_api_client()), NatsPool(config.nats_credentials), config
        )
        metrics.serve(config.metrics_port, config.bind_address)
        resync = asyncio.create_task(reconcile.resync_forever(operator))

    @kopf.on.cleanup(registry=registry, id="cleanup")
    async def cleanup(**_: Any) -> None:
        if resync is not None:
            resync.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await resync
        await current().nats.close()

    @kopf.on.resume(registry=registry, id="reconcile", **agents)
    @kopf.on.create(registry=registry, id="reconcile", **agents)
    @kopf.on.update(registry=registry, id="reconcile", **agents)
    async def agent_changed(body: kopf.Body, retry: int, **_: Any) -> None:
        blocked_by = await reconcile.agent_pass(current(), dict(body))
        if blocked_by is not None:
            raise kopf.TemporaryError(blocked_by, delay=retry_delay(retry))

    @kopf.on.event(
        "apps",
        "v1",
        "deployments",
        registry=registry,
        id="readiness",
        labels={AGENT_LABEL: kopf.PRESENT},
    )
    async def deployment_changed(body: kopf.Body, type: str | None, **_: Any) -> None:
        namespace = body.metadata.namespace
        if type == "DELETED" or namespace is None:
            return
        await reconcile.refresh_agent_workload(
            current(), namespace, body.metadata.labels[AGENT_LABEL]
        )

    @kopf.on.delete(registry=registry, id="delete-nats", when=_deletes_nats_resources, **agents)
    async def agent_deleted(body: kopf.Body, retry: int, logger: kopf.Logger, **_: Any) -> None:
        meta = body.metadata
        try:
            deleted = await reconcile.delete_agent_resources(
                current(), str(meta.namespace), str(meta.name), dict(body.spec)
            )
        except MessagingUnavailable as error:
            raise kopf.TemporaryError(
                f"cannot delete the NATS resources yet ({error}); set deletionPolicy: Retain"
                " to keep them and let the Agent go",
                delay=retry_delay(retry),
            ) from error
        logger.info("deleted %s", ", ".join(deleted) or "nothing: already gone")

    @kopf.on.resume(registry=registry, id="reconcile", **workflows)
    @kopf.on.create(registry=registry, id="reconcile", **workflows)
    @kopf.on.update(registry=registry, id="reconcile", **workflows)
    async def workflow_changed(body: kopf.Body, retry: int, **_: Any) -> None:
        blocked_by = await reconcile.workflow_pass(current(), dict(body))
        if blocked_by is not None:
            raise kopf.TemporaryError(blocked_by, delay=retry_delay(retry))

    @kopf.on.event(
        "apps",
        "v1",
        "deployments",
        registry=registry,
        id="engine-readiness",
        labels={WORKFLOW_LABEL: kopf.PRESENT},
    )
    async def engine_changed(body: kopf.Body, type: str | None, **_: Any) -> None:
        namespace = body.metadata.namespace
        if type == "DELETED" or namespace is None or body.metadata.deletion_timestamp:
            return
        await reconcile.refresh_workflow_engine(
            current(), namespace, body.metadata.labels[WORKFLOW_LABEL]
        )

    @kopf.on.delete(registry=registry, id="delete-nats", when=_deletes_nats_resources, **workflows)
    async def workflow_deleted(body: kopf.Body, retry: int, logger: kopf.Logger, **_: Any) -> None:
        meta = body.metadata
        try:
            deleted = await reconcile.delete_workflow_resources(
                current(), str(meta.namespace), str(meta.name), dict(body.spec)
            )
        except MessagingUnavailable as error:
            raise kopf.TemporaryError(
                f"cannot delete the NATS resources yet ({error}); set deletionPolicy: Retain"
                " to keep them and let the Workflow go",
                delay=retry_delay(retry),
            ) from error
        if deleted is None:
            raise kopf.TemporaryError(
                "waiting for the engine to stop before deleting its streams",
                delay=ENGINE_STOP_POLL_SECONDS,
            )
        logger.info("deleted %s", ", ".join(deleted) or "nothing: already gone")
