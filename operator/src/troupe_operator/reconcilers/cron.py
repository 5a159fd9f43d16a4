"""Cron Triggers, fired by the operator's leader (the only replica that runs kopf's startup
handlers, and so this loop; a standby starts nothing that writes).

Each look lists the watched Triggers and, for each cron one not suspended, takes the windows
due since its ledger's ``lastScheduledTime`` (else its creation): the latest fires when it is
on time, older ones were missed during a pause and follow the missed-run policy
(``builders.trigger.cron_plan``). A fire files a ``TaskRecord`` in the namespace's task bucket
with KV create (already filed: a fire repeated after a failover is the same task), then
publishes the contract's ``call_message`` with the task id as message id (JetStream drops a
copy), so any gateway answers GetTask for it. A Workflow target's concurrency policy is read
from the last fire's run (Forbid skips while it runs, Replace cancels it first); an Agent's
is Allow. Each window handled is recorded in the ``FireLedger`` with a revision check, and the
Trigger's status pass runs at once. Between looks the loop sleeps until the next due window,
at most ``RESCAN_SECONDS``, or until a Trigger changes (``wake``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import ValidationError

from troupe_operator.builders import trigger as builders
from troupe_operator.clients.nats import MessagingUnavailable
from troupe_operator.reconcilers.common import Operator
from troupe_operator.reconcilers.trigger import KIND, PLURAL, read_ledger, target, trigger_pass
from troupe_runtime.contract import envelope, naming, triggers
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.gateway import GATEWAY_SOURCE, TaskRecord, call_message
from troupe_runtime.contract.redact import redact
from troupe_runtime.contract.run_events import CANCEL_TYPE
from troupe_runtime.contract.run_state import RunState
from troupe_runtime.contract.triggers import FireLedger, TriggerSpec
from troupe_runtime.nats.publish import NoStream

RESCAN_SECONDS = 10.0
"""The longest sleep between looks: a new or resumed Trigger waits no longer than this
even when no event woke the loop."""
TASK_TTL_SECONDS = 7 * 24 * 3600.0
"""The task bucket's TTL when the cron creates it (the gateway's default)."""
FIRE_CONCURRENCY = 16
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What one window came to."""

    what: Literal["fired", "failed", "skipped"]
    detail: str = ""
    """The task id when fired; the reason otherwise."""


def _created(meta: Mapping[str, Any]) -> datetime:
    stamp = str(meta.get("creationTimestamp") or "")
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return datetime.now(UTC)


def _cron_spec(body: Mapping[str, Any]) -> TriggerSpec | None:
    """The spec when it is a cron Trigger that may fire: readable and not suspended."""
    if "deletionTimestamp" in body["metadata"]:
        return None
    try:
        spec = TriggerSpec.model_validate(body.get("spec") or {})
    except ValidationError:
        return None
    return spec if spec.source.cron is not None and not spec.suspend else None


async def _last_run_active(
    operator: Operator, namespace: str, workflow: str, ledger: FireLedger, run: str
) -> bool:
    """Whether the last fire's run is unfinished. A run the engine has not projected yet
    (its start waits in the stream) counts as active for ``builders.PENDING_GRACE`` after
    the fire; past that, a run that is nowhere (expired) holds nothing back."""
    stored = await operator.nats.read_key(
        target(operator), naming.workflow_runs_bucket(namespace, workflow), run
    )
    if stored is None:
        return builders.pending(ledger, datetime.now(UTC))
    try:
        return not RunState.model_validate_json(stored).terminal
    except (ValidationError, ValueError):
        return False


async def _cancel(operator: Operator, namespace: str, workflow: str, run: str) -> None:
    """Ask the engine to end the run ``Cancelled``, as the gateway's CancelTask does."""
    event = CloudEvent(
        id=f"cancel-{run}",
        source=GATEWAY_SOURCE,
        type=CANCEL_TYPE,
        datacontenttype=envelope.JSON_CONTENT_TYPE,
        data={"reason": "replaced by the next fire of its Trigger"},
    )
    headers, payload = envelope.to_binary(event)
    headers["Nats-Msg-Id"] = event.id
    subject = naming.workflow_subject(namespace, workflow, "cancel", run)
    await operator.nats.publish(target(operator), subject, headers, payload)


async def _fire(
    operator: Operator,
    namespace: str,
    name: str,
    uid: str,
    spec: TriggerSpec,
    ledger: FireLedger | None,
    scheduled: datetime,
) -> Outcome:
    """Fire one window; ``MessagingUnavailable`` when NATS cannot be reached (the window
    stays due)."""
    cron = spec.source.cron
    assert cron is not None
    kind, wanted = spec.target.kind, spec.target.name
    stored = await operator.nats.read_key(
        target(operator), naming.directory_bucket(namespace), naming.directory_key(kind, wanted)
    )
    entry = builders.target_entry(kind, namespace, wanted, stored)
    if entry is None:
        return Outcome("failed", f"{kind} {wanted} is not in the gateway directory")
    try:
        data = triggers.map_input(spec, triggers.cron_payload(scheduled))
    except ValueError as error:
        return Outcome("failed", str(error))
    last = ledger.last_task_id if ledger else None
    active = False
    if (
        kind == "Workflow"
        and ledger is not None
        and last is not None
        and cron.concurrency_policy != "Allow"
    ):
        active = await _last_run_active(operator, namespace, wanted, ledger, last)
    action = builders.concurrency_action(cron, kind, last, active)
    if action == "skip":
        return Outcome("skipped", f"run {last} is still active (Forbid)")
    if action == "replace" and last is not None:
        await _cancel(operator, namespace, wanted, last)
    task_id = triggers.fire_id(uid, scheduled)
    record = TaskRecord(
        task_id=task_id,
        kind=kind,
        name=wanted,
        context_id=task_id,
        created_at=datetime.now(UTC),
        caller=f"trigger:{name}",
        input=data,
    )
    await operator.nats.file_task(
        target(operator),
        naming.tasks_bucket(namespace),
        naming.task_key(kind, wanted, task_id),
        record.model_dump_json(by_alias=True).encode(),
        TASK_TTL_SECONDS,
        f"The gateway's tasks in namespace {namespace}",
    )
    subject, headers, payload = call_message(entry, record)
    try:
        await operator.nats.publish(target(operator), subject, headers, payload)
    except NoStream as error:
        return Outcome("failed", redact(str(error)))
    return Outcome("fired", task_id)


def _recorded(
    stored: bytes | None, outcomes: list[tuple[datetime, Outcome]], handled: datetime
) -> bytes | None:
    """The ledger after ``outcomes``; None when a window as late was recorded already."""
    ledger = builders.parse_ledger(stored) or FireLedger()
    if ledger.last_scheduled_time is not None and ledger.last_scheduled_time >= handled:
        return None
    now = datetime.now(UTC)
    for scheduled, outcome in outcomes:
        if outcome.what == "fired":
            ledger = triggers.recorded_fire(ledger, now, outcome.detail, scheduled)
        elif outcome.what == "failed":
            ledger = triggers.recorded_failure(ledger, now, outcome.detail, scheduled)
    return builders.encode_ledger(builders.skipped(ledger, handled))


async def fire_due(operator: Operator, body: Mapping[str, Any]) -> bool:
    """Fire what is due of one Trigger, under its lock (read again there: one being deleted
    fires nothing); returns whether a fire or a failure was recorded."""
    meta = body["metadata"]
    namespace, name = str(meta["namespace"]), str(meta["name"])
    async with operator.lock(KIND, namespace, name):
        fresh = await operator.kube.read_custom(PLURAL, namespace, name)
        if fresh is None or str(fresh["metadata"].get("uid")) in operator.cleaned:
            return False
        spec = _cron_spec(fresh)
        if spec is None or spec.source.cron is None:
            return False
        ledger = await read_ledger(operator, namespace, name)
        now = datetime.now(UTC)
        plan = builders.cron_plan(
            spec.source.cron, builders.since(ledger, _created(fresh["metadata"])), now
        )
        if plan.handled is None:
            return False
        uid = str(fresh["metadata"]["uid"])
        outcomes = []
        for scheduled in plan.fire:
            outcome = await _fire(operator, namespace, name, uid, spec, ledger, scheduled)
            outcomes.append((scheduled, outcome))
            logger.info(
                "Trigger %s/%s: window %s %s %s",
                namespace,
                name,
                scheduled.isoformat(),
                outcome.what,
                outcome.detail,
            )
        handled = plan.handled
        await operator.nats.update_key(
            target(operator),
            naming.trigger_fires_bucket(namespace),
            name,
            lambda stored: _recorded(stored, outcomes, handled),
            f"The fire ledgers of the Triggers of namespace {namespace}",
        )
    recorded = any(o.what != "skipped" for _, o in outcomes)
    if recorded:
        await trigger_pass(operator, fresh)
    return recorded


async def cron_once(operator: Operator) -> float:
    """One look at every watched cron Trigger; returns the seconds until the next window
    due (at most ``RESCAN_SECONDS``)."""
    semaphore = asyncio.Semaphore(FIRE_CONCURRENCY)
    listed = await operator.kube.list_watched(PLURAL, operator.settings.namespaces)
    due: list[tuple[Mapping[str, Any], TriggerSpec]] = []
    for body in listed:
        spec = _cron_spec(body)
        if spec is not None:
            due.append((body, spec))

    async def guarded(body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        async with semaphore:
            try:
                await fire_due(operator, body)
            except MessagingUnavailable as error:
                logger.warning(
                    "Trigger %s/%s: NATS unavailable, the window stays due: %s",
                    meta["namespace"],
                    meta["name"],
                    redact(str(error)),
                )
            except Exception:
                logger.exception(
                    "Trigger %s/%s: firing failed; the next look retries",
                    meta["namespace"],
                    meta["name"],
                )

    await asyncio.gather(*(guarded(body) for body, _ in due))
    now = datetime.now(UTC)
    delay = RESCAN_SECONDS
    for _, spec in due:
        assert spec.source.cron is not None
        following = triggers.next_fire(spec.source.cron, now)
        delay = min(delay, (following - now).total_seconds())
    return max(delay, 0.05)


async def cron_forever(operator: Operator, wake: asyncio.Event) -> None:
    """Look, then sleep until the next window due or until ``wake`` is set."""
    while True:
        wake.clear()
        try:
            delay = await cron_once(operator)
        except Exception:
            logger.exception("the cron look failed; retrying in %ss", RESCAN_SECONDS)
            delay = RESCAN_SECONDS
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), delay)
