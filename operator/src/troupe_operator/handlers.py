"""Thin kopf glue: which events trigger which reconcile pass, and how failures retry.

Agents and Workflows get the same handlers, registered by one helper: they differ
only in their ``Kind`` (``reconcilers.agent``, ``reconcilers.workflow``), found from
the event's resource. ModelProviders own nothing and need no finalizer: create, update and
resume probe them (``reconcilers.model_provider``); a new or changed one wakes the Agents
naming it, and so does a new Agent the LLM Agents call as a tool. Approvals
(``reconcilers.approvals``) have no finalizer either: create, update and resume relay a
decision and write their status, and a loop of their own mirrors the approvals buckets. Budgets
(``reconcilers.budget``) are passed on create, update and resume and by a refresh loop of
their own; their finalizer purges their definition and ledgers, given up like the others'.
Create, update and resume run a full pass; a pass blocked by NATS or a missing Secret is
retried with exponential backoff. A background resync (``reconcilers.resync``) repeats
every pass periodically. Events of the agents' and engines' Deployments refresh readiness
at once. The finalizer exists only for objects
whose NATS resources must be deleted (deletionPolicy Delete), read from the raw spec so
that a spec the models refuse never blocks deletion; the cleanup is retried until
``finalizer_timeout_seconds`` after the deletion request, then given up with a Warning
Event naming what was left behind. Every log record is redacted (URLs lose their
secrets) before any handler, kopf's Event poster included, sees it.

The startup handler builds the ``Operator`` from the settings in kopf's memo (put
there by ``__main__``) and keeps it in the memo, which kopf hands to every handler;
the module holds no state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError

from troupe_operator import metrics
from troupe_operator.api import GROUP, VERSION
from troupe_operator.clients.kube import Kube, new_api_client
from troupe_operator.clients.nats import NatsPool
from troupe_operator.diffbase import DigestedDiffBaseStorage
from troupe_operator.reconcilers import approvals, budget, chaos, cron, model_provider, trigger
from troupe_operator.reconcilers.agent import AGENT, wake_agents
from troupe_operator.reconcilers.autoscaler import autoscale_forever
from troupe_operator.reconcilers.common import (
    Kind,
    Operator,
    refresh,
    regarding,
    run_pass,
)
from troupe_operator.reconcilers.resync import resync_forever
from troupe_operator.reconcilers.workflow import WORKFLOW, wake_waiting
from troupe_operator.settings import OperatorSettings
from troupe_runtime.contract.redact import redact

FINALIZER = "troupe.dev/nats-cleanup"
MAX_RETRY_DELAY_SECONDS = 60.0
KUBE_THREADS = 32
KINDS: dict[str, Kind[Any, Any]] = {kind.plural: kind for kind in (AGENT, WORKFLOW)}
CLEANUP_ABANDONED = "CleanupAbandoned"
logger = logging.getLogger(__name__)


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


def redacting(factory: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    """A log record factory whose records carry no URL secrets: message and traceback are
    rendered and redacted at once, so no handler or formatter sees the originals."""

    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        record.msg, record.args = redact(message), None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)))
        return record

    return make


def redact_logs() -> None:
    """Redact every log record from now on (idempotent)."""
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "redacts", False):
        made = redacting(factory)
        made.redacts = True  # type: ignore[attr-defined]
        logging.setLogRecordFactory(made)


async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    redact_logs()
    config = memo.get("settings")
    assert isinstance(config, OperatorSettings), "run the operator with new_memo(settings)"
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(KUBE_THREADS))
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = DigestedDiffBaseStorage(prefix=GROUP)
    settings.posting.level = logging.WARNING
    operator = Operator(Kube(new_api_client()), NatsPool(config.nats_credentials), config)
    memo.operator = operator
    metrics.serve(config.metrics_port, config.bind_address)
    memo.resync = asyncio.create_task(resync_forever(operator))
    memo.budgets = asyncio.create_task(budget.refresh_forever(operator))
    memo.autoscaler = asyncio.create_task(autoscale_forever(operator))
    memo.cron_wake = asyncio.Event()
    memo.cron = asyncio.create_task(cron.cron_forever(operator, memo.cron_wake))
    memo.approvals = asyncio.create_task(approvals.approvals_forever(operator))
    memo.chaos_book = chaos.ProbeBook()
    memo.chaos = asyncio.create_task(chaos.chaos_forever(operator, memo.chaos_book))


async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    for loop in ("resync", "budgets", "autoscaler", "cron", "approvals", "chaos"):
        task = memo.get(loop)
        if isinstance(task, asyncio.Task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    await operator_of(memo).nats.close()


async def changed(
    body: kopf.Body,
    retry: int,
    resource: kopf.Resource,
    reason: str,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    operator = operator_of(memo)
    blocked_by = await run_pass(operator, KINDS[resource.plural], dict(body))
    # Only a new Agent can end a Workflow's AgentNotFound; waking on every resume would
    # list the namespace's Workflows once per Agent at each operator start.
    if resource.plural == AGENT.plural and reason == kopf.Reason.CREATE:
        namespace, name = str(body.metadata.namespace), str(body.metadata.name)
        await _wake_workflows(operator, namespace, name)
        await _wake_agents(operator, namespace, callee=name)
    if reason == kopf.Reason.CREATE and blocked_by is None:
        kind = KINDS[resource.plural].name
        await _wake_triggers(operator, str(body.metadata.namespace), kind, str(body.metadata.name))
    if blocked_by is not None:
        raise kopf.TemporaryError(blocked_by, delay=retry_delay(retry))


async def _wake_triggers(operator: Operator, namespace: str, kind: str, name: str) -> None:
    """Triggers targeting a new Agent or Workflow get their pass now (its directory entry is
    written by the pass that just ran); their failure is theirs: logged, the resync retries."""
    try:
        await trigger.wake_triggers(operator, namespace, kind, name)
    except Exception:
        logger.exception("passes of the Triggers of %s %s/%s failed", kind, namespace, name)


async def _wake_workflows(operator: Operator, namespace: str, agent: str) -> None:
    """Workflows waiting for this Agent get their pass now; their failure is theirs, not
    the Agent's, so it is logged and the resync retries it."""
    try:
        await wake_waiting(operator, namespace, agent)
    except Exception:
        logger.exception("passes of the Workflows waiting for Agent %s/%s failed", namespace, agent)


async def _wake_agents(
    operator: Operator, namespace: str, provider: str | None = None, callee: str | None = None
) -> None:
    """LLM Agents naming this provider or Agent get their pass now: their config embeds it,
    and one waiting for it turns Ready. Their failure is theirs: logged, the resync retries."""
    try:
        await wake_agents(operator, namespace, provider=provider, callee=callee)
    except Exception:
        logger.exception("passes of the Agents naming %s/%s failed", namespace, provider or callee)


async def provider_changed(
    body: kopf.Body, retry: int, reason: str, memo: kopf.Memo, **_: Any
) -> None:
    """A ModelProvider appeared or changed (or the operator resumed): probe it; a new or
    changed one wakes the Agents naming it. Unreachable retries with backoff."""
    operator = operator_of(memo)
    blocked_by = await model_provider.provider_pass(operator, dict(body))
    if reason in (kopf.Reason.CREATE, kopf.Reason.UPDATE):
        namespace, name = str(body.metadata.namespace), str(body.metadata.name)
        await _wake_agents(operator, namespace, provider=name)
    if blocked_by is not None:
        raise kopf.TemporaryError(blocked_by, delay=retry_delay(retry))


async def budget_changed(body: kopf.Body, retry: int, memo: kopf.Memo, **_: Any) -> None:
    """A Budget appeared or changed (or the operator resumed): its definition and status at
    once, not at the next refresh. NATS unreachable retries with backoff."""
    blocked_by = await budget.budget_pass(operator_of(memo), dict(body))
    if blocked_by is not None:
        raise kopf.TemporaryError(blocked_by, delay=retry_delay(retry))


async def budget_deleted(
    body: kopf.Body, retry: int, logger: kopf.Logger, memo: kopf.Memo, **_: Any
) -> None:
    """Purge the Budget's definition and ledgers. While NATS cannot be reached this retries
    until ``finalizer_timeout_seconds`` after the deletion request, then lets the Budget go
    with a Warning Event naming what was left: a deletion is never blocked for good."""
    operator = operator_of(memo)
    meta = body.metadata
    namespace, name = str(meta.namespace), str(meta.name)
    try:
        removed = await budget.delete_budget(operator, namespace, name)
    except Exception as error:
        await _retry_or_abandon(
            operator,
            "Budget",
            dict(body),
            error,
            retry,
            logger,
            budget.leftovers(namespace, name),
        )
        return
    logger.info("deleted %s", ", ".join(removed) or "nothing: already gone")


async def trigger_changed(body: kopf.Body, retry: int, memo: kopf.Memo, **_: Any) -> None:
    """A Trigger appeared or changed (or the operator resumed): its definition, stream and
    status at once, and the cron loop looks again. NATS unreachable retries with backoff."""
    wake = memo.get("cron_wake")
    if isinstance(wake, asyncio.Event):
        wake.set()
    blocked_by = await trigger.trigger_pass(operator_of(memo), dict(body))
    if blocked_by is not None:
        raise kopf.TemporaryError(blocked_by, delay=retry_delay(retry))


async def trigger_deleted(
    body: kopf.Body, retry: int, logger: kopf.Logger, memo: kopf.Memo, **_: Any
) -> None:
    """Remove the Trigger's definition, stream and ledger, retried while NATS cannot be
    reached until ``finalizer_timeout_seconds`` after the deletion request, then given up
    with a Warning Event naming what was left: a deletion is never blocked for good."""
    operator = operator_of(memo)
    meta = body.metadata
    namespace, name = str(meta.namespace), str(meta.name)
    try:
        removed = await trigger.delete_trigger(operator, namespace, name)
    except Exception as error:
        await _retry_or_abandon(
            operator,
            trigger.KIND,
            dict(body),
            error,
            retry,
            logger,
            trigger.leftovers(namespace, name),
        )
        operator.mark_cleaned(str(meta.uid))
        return
    operator.mark_cleaned(str(meta.uid))
    logger.info("deleted %s", ", ".join(removed) or "nothing: already gone")


def chaos_book(memo: kopf.Memo) -> chaos.ProbeBook:
    book = memo.get("chaos_book")
    assert isinstance(book, chaos.ProbeBook), "the startup handler makes the probe book first"
    return book


async def chaos_changed(body: kopf.Body, retry: int, memo: kopf.Memo, **_: Any) -> None:
    """A ChaosExperiment appeared or changed (or the operator resumed): its pass at once (a
    run starts, a suspended one is aborted), not at the loop's next look. NATS unreachable
    retries with backoff."""
    blocked_by = await chaos.chaos_pass(operator_of(memo), chaos_book(memo), dict(body))
    if blocked_by is not None:
        raise kopf.TemporaryError(blocked_by, delay=retry_delay(retry))


async def chaos_event(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    """A ChaosExperiment is gone: its faults go at once. A watch event, not a delete
    handler: a delete handler would add a finalizer, and nothing may block deleting an
    experiment (missed, its faults still end at their ``until``, and the sweep removes
    them). A failure is logged: the entries expire anyway."""
    if type != "DELETED":
        return
    try:
        await chaos.forget(operator_of(memo), dict(body), chaos_book(memo))
    except Exception:
        logger.exception("removing the faults of a deleted ChaosExperiment failed")


async def approval_changed(body: kopf.Body, retry: int, memo: kopf.Memo, **_: Any) -> None:
    """An Approval appeared or changed (a person decided) or the operator resumed: relay its
    decision and write its status at once, not at the next look of the approvals loop. A
    decision no stream takes yet, or NATS unreachable, retries with backoff."""
    blocked_by = await approvals.approval_pass(operator_of(memo), dict(body))
    if blocked_by is not None:
        raise kopf.TemporaryError(blocked_by, delay=retry_delay(retry))


async def _retry_or_abandon(
    operator: Operator,
    kind: str,
    body: dict[str, Any],
    error: Exception,
    retry: int,
    logger: kopf.Logger,
    leftovers: list[str],
) -> None:
    """A cleanup that failed: retried until the finalizer timeout after the deletion request
    (``kopf.TemporaryError``), then given up with a Warning Event naming ``leftovers``."""
    waited = _waited(body["metadata"].get("deletionTimestamp"))
    timeout = operator.settings.finalizer_timeout_seconds
    said = redact(str(error) or type(error).__name__)
    if waited < timeout:
        raise kopf.TemporaryError(
            f"cannot delete the NATS resources yet ({said}); retrying until {timeout:.0f}s"
            f" after deletion, then letting the {kind} go",
            delay=max(1.0, min(retry_delay(retry), timeout - waited)),
        ) from error
    message = (
        f"gave up deleting the NATS resources after {waited:.0f}s ({said}); left behind:"
        f" {', '.join(leftovers)}"
    )
    await operator.kube.create_event(
        regarding(kind, body), "Warning", CLEANUP_ABANDONED, redact(message)
    )
    logger.info("%s", message)


def _deletes_nats_resources(spec: kopf.Spec, **_: Any) -> bool:
    """Read raw: a spec the models refuse must still be deletable."""
    return bool(spec.get("deletionPolicy", "Delete") != "Retain")


def _waited(deletion_timestamp: str | None) -> float:
    """Seconds since deletion was requested."""
    if not deletion_timestamp:
        return 0.0
    requested = datetime.fromisoformat(deletion_timestamp.replace("Z", "+00:00"))
    return (datetime.now(UTC) - requested).total_seconds()


async def deleted(
    body: kopf.Body,
    retry: int,
    resource: kopf.Resource,
    logger: kopf.Logger,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    kind = KINDS[resource.plural]
    operator = operator_of(memo)
    meta = body.metadata
    namespace, name = str(meta.namespace), str(meta.name)
    raw_spec = dict(body.spec)
    try:
        spec = kind.spec(raw_spec)
    except ValidationError:
        spec = None
    try:
        # Under the object's lock: a resync pass in flight finishes first, and one planned
        # from an older listing sees the UID cleaned and provisions nothing again.
        async with operator.lock(kind.name, namespace, name):
            removed = await kind.delete(operator, namespace, name, spec, raw_spec)
            operator.mark_cleaned(str(meta.uid))
    except Exception as error:
        waited = _waited(meta.deletion_timestamp)
        timeout = operator.settings.finalizer_timeout_seconds
        said = redact(str(error) or type(error).__name__)
        if waited < timeout:
            raise kopf.TemporaryError(
                f"cannot delete the NATS resources yet ({said}); retrying until {timeout:.0f}s"
                f" after deletion, then letting the {kind.name} go; set deletionPolicy: Retain"
                " to keep them and let it go now",
                delay=max(1.0, min(retry_delay(retry), timeout - waited)),
            ) from error
        message = (
            f"gave up deleting the NATS resources after {waited:.0f}s ({said}); left behind:"
            f" {', '.join(f'stream/{stream}' for stream in kind.leftovers(namespace, name))}"
        )
        await operator.kube.create_event(
            regarding(kind.name, dict(body)), "Warning", CLEANUP_ABANDONED, redact(message)
        )
        logger.info("%s", message)
        operator.mark_cleaned(str(meta.uid))
        return
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
    providers: dict[str, Any] = {
        "group": GROUP,
        "version": VERSION,
        "plural": model_provider.PLURAL,
    }
    for on in (kopf.on.resume, kopf.on.create, kopf.on.update):
        on(registry=registry, id="probe", **providers)(provider_changed)
    budgets: dict[str, Any] = {"group": GROUP, "version": VERSION, "plural": budget.PLURAL}
    for on in (kopf.on.resume, kopf.on.create, kopf.on.update):
        on(registry=registry, id="budget", **budgets)(budget_changed)
    kopf.on.delete(registry=registry, id="delete-budget", **budgets)(budget_deleted)
    triggers: dict[str, Any] = {"group": GROUP, "version": VERSION, "plural": trigger.PLURAL}
    for on in (kopf.on.resume, kopf.on.create, kopf.on.update):
        on(registry=registry, id="trigger", **triggers)(trigger_changed)
    kopf.on.delete(registry=registry, id="delete-trigger", **triggers)(trigger_deleted)
    # No delete handler, so kopf adds no finalizer: an experiment's faults end by themselves.
    experiments: dict[str, Any] = {"group": GROUP, "version": VERSION, "plural": chaos.PLURAL}
    for on in (kopf.on.resume, kopf.on.create, kopf.on.update):
        on(registry=registry, id="chaos", **experiments)(chaos_changed)
    kopf.on.event(registry=registry, id="chaos-deleted", **experiments)(chaos_event)
    # No delete handler, so kopf adds no finalizer: an Approval goes with its owner.
    decided: dict[str, Any] = {"group": GROUP, "version": VERSION, "plural": approvals.PLURAL}
    for on in (kopf.on.resume, kopf.on.create, kopf.on.update):
        on(registry=registry, id="approval", **decided)(approval_changed)
    kopf.on.event(
        "apps", "v1", "deployments", registry=registry, id="readiness", when=_is_workload
    )(workload_changed)
