"""Thin kopf glue: which events trigger which reconcile pass, and how failures retry.

Agents and Workflows get the same handlers, registered by one helper: they differ
only in their ``Kind`` (``reconcilers.agent``, ``reconcilers.workflow``), found from
the event's resource. Create, update and resume run a full pass; a pass blocked by
NATS or a missing Secret is retried with exponential backoff. A background resync
(``reconcilers.resync``) repeats every pass periodically. Events of the agents' and
engines' Deployments refresh readiness at once. The finalizer exists only for objects
whose NATS resources must be deleted (deletionPolicy Delete).

The startup handler builds the ``Operator`` from the settings in kopf's memo (put
there by ``__main__``) and keeps it in the memo, which kopf hands to every handler;
the module holds no state.
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
from troupe_operator.clients.kube import Kube, new_api_client
from troupe_operator.clients.nats import MessagingUnavailable, NatsPool
from troupe_operator.reconcilers.agent import AGENT
from troupe_operator.reconcilers.common import Kind, Operator, refresh, run_pass
from troupe_operator.reconcilers.resync import resync_forever
from troupe_operator.reconcilers.workflow import WORKFLOW
from troupe_operator.settings import OperatorSettings

FINALIZER = "troupe.dev/nats-cleanup"
MAX_RETRY_DELAY_SECONDS = 60.0
KUBE_THREADS = 32
KINDS: dict[str, Kind[Any, Any]] = {kind.plural: kind for kind in (AGENT, WORKFLOW)}


def retry_delay(retry: int) -> float:
    """Exponential backoff for a pass blocked by NATS or a missing Secret: 1s, 2s, 4s … 60s."""
    return float(min(2**retry, MAX_RETRY_DELAY_SECONDS))


def new_memo(config: OperatorSettings) -> kopf.Memo:
    """The memo to run the operator with: its settings, for the startup handler."""
    memo = kopf.Memo()
    memo.settings = config
    return memo


def operator_of(memo: kopf.Memo) -> Operator:
    operator = memo.get("operator")
    assert isinstance(operator, Operator), "the startup handler builds the operator first"
    return operator


def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # A registry of our own starts empty: kopf's default login must be named here.
    return kopf.login_via_client(**kwargs)


async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config = memo.get("settings")
    assert isinstance(config, OperatorSettings), "run the operator with new_memo(settings)"
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(KUBE_THREADS))
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.posting.level = logging.WARNING
    operator = Operator(Kube(new_api_client()), NatsPool(config.nats_credentials), config)
    memo.operator = operator
    metrics.serve(config.metrics_port, config.bind_address)
    memo.resync = asyncio.create_task(resync_forever(operator))


async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    resync = memo.get("resync")
    if isinstance(resync, asyncio.Task):
        resync.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await resync
    await operator_of(memo).nats.close()


async def changed(
    body: kopf.Body, retry: int, resource: kopf.Resource, memo: kopf.Memo, **_: Any
) -> None:
    blocked_by = await run_pass(operator_of(memo), KINDS[resource.plural], dict(body))
    if blocked_by is not None:
        raise kopf.TemporaryError(blocked_by, delay=retry_delay(retry))


def _deletes_nats_resources(spec: kopf.Spec, resource: kopf.Resource, **_: Any) -> bool:
    policy: str = KINDS[resource.plural].spec(dict(spec)).deletion_policy
    return policy == "Delete"


async def deleted(
    body: kopf.Body,
    retry: int,
    resource: kopf.Resource,
    logger: kopf.Logger,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    kind = KINDS[resource.plural]
    meta = body.metadata
    try:
        removed = await kind.delete(
            operator_of(memo), str(meta.namespace), str(meta.name), kind.spec(dict(body.spec))
        )
    except MessagingUnavailable as error:
        raise kopf.TemporaryError(
            f"cannot delete the NATS resources yet ({error}); set deletionPolicy: Retain"
            f" to keep them and let the {kind.name} go",
            delay=retry_delay(retry),
        ) from error
    logger.info("deleted %s", ", ".join(removed) or "nothing: already gone")


def _is_workload(labels: kopf.Labels, **_: Any) -> bool:
    return any(kind.label in labels for kind in KINDS.values())


async def workload_changed(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    """A Deployment of an Agent or a workflow engine changed: refresh its owner's readiness.

    One being deleted has nothing to report that the next full pass would keep.
    """
    meta = body.metadata
    if type == "DELETED" or meta.namespace is None or meta.deletion_timestamp:
        return
    for kind in KINDS.values():
        owner = meta.labels.get(kind.label)
        if owner is not None:
            await refresh(operator_of(memo), kind, meta.namespace, owner)


def register_kind(registry: kopf.OperatorRegistry, kind: Kind[Any, Any]) -> None:
    """The handlers of one kind; both kinds get the same."""
    resource: dict[str, Any] = {"group": GROUP, "version": VERSION, "plural": kind.plural}
    for on in (kopf.on.resume, kopf.on.create, kopf.on.update):
        on(registry=registry, id="reconcile", **resource)(changed)
    kopf.on.delete(registry=registry, id="delete-nats", when=_deletes_nats_resources, **resource)(
        deleted
    )


def register(registry: kopf.OperatorRegistry) -> None:
    """Register every handler in ``registry``; run it with ``memo=new_memo(settings)``."""
    kopf.on.login(registry=registry, id="login")(login)
    kopf.on.startup(registry=registry, id="startup")(startup)
    kopf.on.cleanup(registry=registry, id="cleanup")(cleanup)
    for kind in KINDS.values():
        register_kind(registry, kind)
    kopf.on.event(
        "apps", "v1", "deployments", registry=registry, id="readiness", when=_is_workload
    )(workload_changed)
