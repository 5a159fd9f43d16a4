"""Triggers: a pass files the definition the gateway serves, provisions a subject Trigger's
stream, and copies the fire ledger into status.

A Trigger owns no Kubernetes object. What it leads to is on the operator's NATS (the one the
gateway connects to): its ``TriggerDefinition`` under ``triggers.<name>`` in the namespace's
directory bucket, written only when it differs; for a subject source, the stream capturing
the subject and the gateway's relay consumer; and the ``FireLedger`` whoever fires writes in
``naming.trigger_fires_bucket``, read into status here (the operator is status's one
writer). Level-based: the same spec, target and ledger give the same status, so an idle pass
writes nothing (a cron Trigger's nextFireTime moves on, and with it status). The pass runs on
create, update and resume, from the resync, and after each cron fire (``reconcilers.cron``).
Deleting a Trigger removes its definition, its stream and its ledger; while NATS cannot be
reached the deletion is retried, then given up (``handlers``), never blocked for good.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from troupe_operator import metrics
from troupe_operator.api.trigger import TriggerStatus
from troupe_operator.builders import directory as directory_builders
from troupe_operator.builders import status as status_builders
from troupe_operator.builders import trigger as builders
from troupe_operator.builders.problems import SpecRejected
from troupe_operator.clients.nats import MessagingUnavailable, NatsTarget
from troupe_operator.reconcilers.common import (
    Operator,
    announce,
    spec_problems,
    write_status,
)
from troupe_runtime.contract import naming, triggers
from troupe_runtime.contract.redact import redact
from troupe_runtime.contract.triggers import FireLedger, TriggerSpec

KIND = "Trigger"
PLURAL = "triggers"
SUBJECT_FIELD = "spec.source.subject.subject"
logger = logging.getLogger(__name__)


def target(operator: Operator) -> NatsTarget:
    """Triggers live on the operator's NATS, with its own credentials."""
    return NatsTarget(operator.settings.nats_url, replicas=operator.settings.nats_replicas)


async def _write(operator: Operator, namespace: str, name: str, next_status: Any) -> None:
    async def compute(body: dict[str, Any]) -> TriggerStatus:
        previous = TriggerStatus.model_validate(body.get("status") or {})
        new: TriggerStatus = next_status(previous, datetime.now(UTC))
        conditions = status_builders.keep_transition_times(previous.conditions, new.conditions)
        return new.model_copy(update={"conditions": conditions})

    written = await write_status(operator.kube, PLURAL, namespace, name, compute)
    await announce(operator.kube, KIND, written)


async def read_ledger(operator: Operator, namespace: str, name: str) -> FireLedger | None:
    stored = await operator.nats.read_key(
        target(operator), naming.trigger_fires_bucket(namespace), name
    )
    return builders.parse_ledger(stored)


async def trigger_pass(operator: Operator, body: Mapping[str, Any]) -> str | None:
    """One pass over one Trigger; returns what blocks it (NATS unreachable), for the caller
    to retry with backoff, or None. Read again under its lock: one whose deletion began while
    the pass waited must not have its definition or stream written back."""
    meta = body["metadata"]
    namespace, name = str(meta["namespace"]), str(meta["name"])
    async with operator.lock(KIND, namespace, name):
        fresh = await operator.kube.read_custom(PLURAL, namespace, name)
        if fresh is None or "deletionTimestamp" in fresh["metadata"]:
            return None
        if str(fresh["metadata"].get("uid")) in operator.cleaned:
            return None
        with metrics.reconcile_timer(KIND):
            return await _trigger_pass(operator, fresh)


async def _trigger_pass(operator: Operator, body: Mapping[str, Any]) -> str | None:
    meta = body["metadata"]
    namespace, name = str(meta["namespace"]), str(meta["name"])
    generation = int(meta.get("generation") or 1)
    raw_spec = body.get("spec") or {}
    try:
        spec = TriggerSpec.model_validate(raw_spec)
    except ValidationError as error:
        # The definition filed stays: the gateway keeps serving the last valid spec.
        said = "; ".join(p.sentence() for p in spec_problems(error, raw_spec))
        await _write(
            operator,
            namespace,
            name,
            lambda previous, now: builders.spec_invalid_status(previous, generation, now, said),
        )
        return None
    wanted = builders.definition(namespace, name, str(meta["uid"]), generation, spec)
    try:
        return await _converge(operator, namespace, name, generation, spec, wanted)
    except SpecRejected as rejected:
        problems = rejected.problems
        await _write(
            operator,
            namespace,
            name,
            lambda previous, now: builders.rejected_status(previous, generation, now, problems),
        )
        return None
    except Exception as error:
        message = redact(f"{type(error).__name__}: {error}")
        logger.exception("%s %s/%s: the pass failed", KIND, namespace, name)
        failed = status_builders.reconcile_failed(status_builders.MESSAGING_READY, message)
        await _write(
            operator,
            namespace,
            name,
            lambda previous, now: builders.failed_status(previous, generation, now, failed),
        )
        return f"the pass failed: {message}"


async def _converge(
    operator: Operator,
    namespace: str,
    name: str,
    generation: int,
    spec: TriggerSpec,
    wanted: triggers.TriggerDefinition,
) -> str | None:
    nats = target(operator)
    messaging = builders.Messaging(redact(nats.url))
    found: bool | None = None  # unknown until the directory is read
    ledger: FireLedger | None = None
    try:
        written = await operator.nats.sync_directory(
            nats,
            directory_builders.bucket_config(namespace),
            triggers.directory_key(name),
            lambda stored: builders.definition_to_write(wanted, stored),
        )
        if written:
            logger.info("Trigger %s/%s: definition written", namespace, name)
        stream = naming.trigger_stream(namespace, name)
        if spec.source.subject is not None:
            report = await operator.nats.provision_subject_stream(
                nats,
                builders.stream_config(namespace, name, spec.source.subject.subject),
                builders.consumer_config(),
                SUBJECT_FIELD,
            )
            if report.created or report.updated:
                logger.info(
                    "Trigger %s/%s: %s", namespace, name, ", ".join(report.created + report.updated)
                )
        else:
            removed = await operator.nats.delete_streams(nats, [stream])
            if removed:
                logger.info("Trigger %s/%s: removed %s", namespace, name, ", ".join(removed))
        stored = await operator.nats.read_key(
            nats,
            naming.directory_bucket(namespace),
            naming.directory_key(spec.target.kind, spec.target.name),
        )
        found = (
            builders.target_entry(spec.target.kind, namespace, spec.target.name, stored) is not None
        )
        ledger = await read_ledger(operator, namespace, name)
    except MessagingUnavailable as error:
        messaging = builders.Messaging(messaging.url, redact(str(error)))
    await _write(
        operator,
        namespace,
        name,
        lambda previous, now: builders.trigger_status(
            previous, generation, now, spec, found, messaging, ledger
        ),
    )
    if messaging.error is not None:
        return f"NATS unavailable: {messaging.error}"
    return None


async def delete_trigger(operator: Operator, namespace: str, name: str) -> list[str]:
    """Remove the Trigger's definition, stream and ledger; ``MessagingUnavailable`` while
    NATS cannot be reached. Serialised with its passes and fires, so none writes back."""
    nats = target(operator)
    async with operator.lock(KIND, namespace, name):
        removed = await operator.nats.withdraw(
            nats, naming.directory_bucket(namespace), triggers.directory_key(name)
        )
        removed += await operator.nats.delete_streams(
            nats, [naming.trigger_stream(namespace, name)]
        )
        removed += await operator.nats.withdraw(nats, naming.trigger_fires_bucket(namespace), name)
    return removed


async def wake_triggers(operator: Operator, namespace: str, kind: str, name: str) -> None:
    """Passes of the Triggers of ``namespace`` that target ``kind`` ``name``: one waiting for
    its target turns Ready once the target's pass has listed it. A failure is the Trigger's:
    logged, the resync retries it."""
    for body in await operator.kube.list_custom(PLURAL, namespace):
        wanted = (body.get("spec") or {}).get("target") or {}
        if wanted.get("kind") != kind or wanted.get("name") != name:
            continue
        try:
            await trigger_pass(operator, body)
        except Exception:
            logger.exception(
                "the pass of Trigger %s/%s failed", namespace, body["metadata"]["name"]
            )


def leftovers(namespace: str, name: str) -> list[str]:
    """What a given-up deletion leaves in NATS."""
    return [
        f"kv/{naming.directory_bucket(namespace)}/{triggers.directory_key(name)}",
        f"stream/{naming.trigger_stream(namespace, name)}",
        f"kv/{naming.trigger_fires_bucket(namespace)}/{name}",
    ]
