"""The gateway's directory on the operator's NATS: listing, following Ready, withdrawing.

Each Agent and Workflow pass ends by converging its key (``builders.directory``) with the
status it just wrote, so the entry's ``ready`` is the Ready condition; a readiness refresh
follows Ready too. Deleting an object purges its key and, with the last Agent or Workflow of
the namespace, the bucket (provisioned by the first pass that lists something). The resync
sweeps keys no object owns: an object deleted with deletionPolicy Retain has no finalizer,
and a cleanup given up while NATS was down leaves its key.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from troupe_operator.api.status import Condition
from troupe_operator.builders import directory
from troupe_operator.builders.directory import Listing
from troupe_operator.clients.nats import MessagingUnavailable, NatsTarget
from troupe_runtime.contract import naming
from troupe_runtime.contract.gateway import TargetKind
from troupe_runtime.contract.redact import redact

if TYPE_CHECKING:
    from troupe_operator.reconcilers.common import Operator

PLURALS: dict[TargetKind, str] = {"Agent": "agents", "Workflow": "workflows"}
logger = logging.getLogger(__name__)


def target(operator: Operator) -> NatsTarget:
    """The directory lives on the operator's NATS, the one the gateway connects to."""
    return NatsTarget(operator.settings.nats_url, replicas=operator.settings.nats_replicas)


async def publish(operator: Operator, listing: Listing, ready: bool) -> str | None:
    """Converge the object's key to ``listing`` with Ready ``ready``; returns what blocks it
    (the operator's NATS unreachable), for the pass to retry, or None."""
    nats = target(operator)
    try:
        if not listing.listed:
            await operator.nats.withdraw(
                nats, naming.directory_bucket(listing.namespace), listing.key
            )
            return None
        written = await operator.nats.sync_directory(
            nats,
            directory.bucket_config(listing.namespace),
            listing.key,
            lambda stored: directory.to_write(listing, stored, ready),
        )
    except MessagingUnavailable as error:
        said = redact(str(error))
        logger.warning(
            "%s %s/%s: the directory entry was not written: %s",
            listing.kind,
            listing.namespace,
            listing.name,
            said,
        )
        return f"the gateway directory's NATS is unavailable: {said}"
    if written:
        logger.info(
            "%s %s/%s: directory entry written (ready %s)",
            listing.kind,
            listing.namespace,
            listing.name,
            ready,
        )
    return None


async def follow_readiness(
    operator: Operator, kind: TargetKind, namespace: str, name: str, status: dict[str, Any]
) -> None:
    """After a readiness refresh wrote ``status``: the stored entry's ``ready`` follows it
    (an object not listed has no entry, and gets none)."""
    conditions = [Condition.model_validate(c) for c in status.get("conditions") or []]
    await publish(operator, Listing(kind, namespace, name), directory.is_ready(conditions))


async def withdraw(operator: Operator, kind: TargetKind, namespace: str, name: str) -> list[str]:
    """Purge the object's key, and the bucket when no other Agent or Workflow stays in the
    namespace; ``MessagingUnavailable`` while NATS cannot be reached. The caller (the
    deletion handler) holds the object's lock: a pass under way when the deletion began has
    written its entry before, and one after finds the UID cleaned and writes nothing."""
    nats = target(operator)
    bucket = naming.directory_bucket(namespace)
    removed = await operator.nats.withdraw(nats, bucket, naming.directory_key(kind, name))
    if not await _others_staying(operator, namespace, kind, name):
        removed += await operator.nats.delete_streams(nats, [naming.kv_stream(bucket)])
    return removed


async def _others_staying(operator: Operator, namespace: str, kind: TargetKind, name: str) -> bool:
    """Whether an Agent or Workflow other than the one leaving is not being deleted."""
    for other_kind, plural in PLURALS.items():
        for body in await operator.kube.list_custom(plural, namespace):
            meta = body["metadata"]
            if (other_kind, meta["name"]) == (kind, name) or "deletionTimestamp" in meta:
                continue
            return True
    return False


async def sweep(operator: Operator, namespaces: set[str]) -> list[str]:
    """Remove the directory keys of ``namespaces`` that no Agent or Workflow owns (a value
    is purged, its marker removed at the next sweep). The keys are listed before the
    objects, and each orphan is checked again under its object's lock: an object created
    meanwhile keeps its entry. Returns what was purged."""
    nats = target(operator)
    removed = []
    for namespace in sorted(namespaces):
        bucket = naming.directory_bucket(namespace)
        keys = await operator.nats.directory_keys(nats, bucket, directory.DIRECTORY_PREFIXES)
        if not keys:
            continue
        present = {
            naming.directory_key(kind, body["metadata"]["name"])
            for kind, plural in PLURALS.items()
            for body in await operator.kube.list_custom(plural, namespace)
            if "deletionTimestamp" not in body["metadata"]
        }
        for key in keys:
            owner = _owner(key)
            if key in present or owner is None:
                continue
            kind, name = owner
            async with operator.lock(kind, namespace, name):
                if await operator.kube.read_custom(PLURALS[kind], namespace, name) is not None:
                    continue
                purged = await operator.nats.forget(nats, bucket, key)
            if purged is not None:
                logger.info("purged the orphaned directory entry %s", purged)
                removed.append(purged)
    return removed


def _owner(key: str) -> tuple[TargetKind, str] | None:
    """The kind and name a key of the operator's is for; None for any other key."""
    group, _, name = key.partition(".")
    if group == naming.DIRECTORY_AGENTS and name:
        return "Agent", name
    if group == naming.DIRECTORY_WORKFLOWS and name:
        return "Workflow", name
    return None
