"""Approvals: each namespace's approvals bucket mirrored as Approval objects, and each
decision relayed to its requester (the round trip is in ``contract.approvals``).

How the buckets are found, and why. The leader (the only replica that runs kopf's startup
handlers, so this loop) lists the streams of the operator's NATS every ``SCAN_SECONDS`` and
keeps those named like an approvals bucket (``KV_troupe_<ns>_approvals``, read back by
``naming.stream_owner``) in a watched namespace. The listing carries each stream's last
sequence, so an idle look is that one request: a bucket whose sequence did not move is not
read at all, and one that moved is read from the sequences that moved (``changed_keys``).
A KV watch per bucket would need a subscription per namespace kept alive across the
connection drops the pool does not reconnect (``clients.nats``), and would still need the
listing to find new buckets; polling one listing is level-based by construction: what the
bucket holds now is what a pass converges to, and a pass that failed leaves the sequence
unread and is repeated. Every ``FULL_READ_SECONDS`` each bucket is read whole again, but
for the requests already settled (resolved, or foreign), so an Approval deleted by hand
while its request waits comes back. Between looks a person's decision does not wait: the
kopf handler on Approval (``approval_pass``) runs the same ``converge`` at once.

The requests are untrusted (every requester can write the bucket): the planning in
``builders.approvals`` mirrors only a request under its own key in its own namespace, makes
the Approval only while its owner Workflow or Agent exists (ownerReference: the garbage
collector removes it with its owner; no finalizer), and relays a decision only to the
requester's own reply subject and only from an Approval whose spec is the request's.
Approvals live on the operator's NATS (``TROUPE_NATS_URL``), as Triggers do: a Workflow
that names another server through spec.nats files its requests where the operator does
not look.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from troupe_operator.api.approval import ApprovalStatus
from troupe_operator.builders import approvals as builders
from troupe_operator.builders import status as status_builders
from troupe_operator.clients.kube import Rejected
from troupe_operator.clients.nats import MessagingUnavailable, NatsTarget
from troupe_operator.reconcilers.common import Operator, announce, regarding, write_status
from troupe_runtime.contract import approvals, envelope, naming
from troupe_runtime.contract.approvals import ApprovalRequest
from troupe_runtime.contract.redact import redact
from troupe_runtime.nats.publish import NoStream

KIND = builders.KIND
PLURAL = builders.PLURAL
SCAN_SECONDS = 2.0
"""The longest a new request waits for its Approval."""
FULL_READ_SECONDS = 60.0
MOST_CHANGES = 1024
"""Sequences read one by one at most; past this a bucket is read whole."""
MIRROR_CONCURRENCY = 16
logger = logging.getLogger(__name__)


def target(operator: Operator) -> NatsTarget:
    """Approvals live on the operator's NATS, with its own credentials."""
    return NatsTarget(operator.settings.nats_url, replicas=operator.settings.nats_replicas)


@dataclass
class BucketSeen:
    """What the loop remembers of one bucket between looks."""

    sequence: int
    full_read_at: float
    settled: set[str] = field(default_factory=set)
    """Keys whose request was resolved or foreign when last read: a full read skips them."""


async def _status(
    operator: Operator,
    namespace: str,
    name: str,
    request: ApprovalRequest | None,
    problem: str | None,
    relayed_at: str | None,
    relay_failure: str | None,
) -> dict[str, Any] | None:
    """Write the Approval's status from what was observed; returns the status now stored
    (None when the Approval is gone)."""
    stored: dict[str, Any] | None = None

    async def compute(body: dict[str, Any]) -> ApprovalStatus:
        nonlocal stored
        previous = ApprovalStatus.model_validate(body.get("status") or {})
        new = builders.approval_status(
            previous,
            request,
            problem,
            builders.decision_of(body),
            relayed_at or previous.relayed_at,
            relay_failure,
            int(body["metadata"].get("generation") or 0),
            datetime.now(UTC),
        )
        stored = new.model_dump(by_alias=True, exclude_none=True)
        return new

    written = await write_status(operator.kube, PLURAL, namespace, name, compute)
    await announce(operator.kube, KIND, written)
    return stored


async def _relay(
    operator: Operator, request: ApprovalRequest, body: Mapping[str, Any]
) -> tuple[str | None, str | None]:
    """Publish the Approval's decision to the request's reply subject (checked by the plan
    to be its requester's own), with ``Nats-Msg-Id`` so a repeat after a crash is dropped.
    Returns (when it was relayed, why it could not be yet)."""
    given = builders.decision_of(body)
    assert given is not None
    now = datetime.now(UTC)
    decision = builders.decision(request, given, now)
    event = approvals.decision_event(request, decision, str(body["metadata"]["uid"]))
    headers, payload = envelope.to_binary(event)
    headers["Nats-Msg-Id"] = event.id
    try:
        await operator.nats.publish(target(operator), request.reply_subject, headers, payload)
    except NoStream:
        return None, (
            f"no stream stores {request.reply_subject} yet (is the requester's Workflow "
            "provisioned?); retrying"
        )
    await operator.kube.create_event(
        regarding(KIND, body),
        "Normal",
        "DecisionRelayed",
        f"{decision.verdict} by {decision.decided_by} relayed to {request.requester.kind} "
        f"{request.requester.name} run {request.requester.run_id}",
    )
    return status_builders.timestamp(now), None


async def converge(operator: Operator, namespace: str, key: str, stored: bytes | None) -> bool:
    """One pass over the request under ``key`` (``stored``, the bucket's value): create its
    Approval, relay its decision, write its status. Returns whether the request is settled
    (resolved or not this bucket's, with nothing left to do); raises ``RelayPending`` when a
    decision could not be relayed yet."""
    request, problem = builders.parse_request(stored)
    async with operator.lock(KIND, namespace, key):
        body = await operator.kube.read_custom(PLURAL, namespace, key)
        if request is None:
            if body is not None:
                await _status(operator, namespace, key, None, problem, None, None)
            return True
        owner = None
        if body is None and request.pending:
            plural = builders.OWNER_PLURALS[request.requester.kind]
            owner = await operator.kube.read_custom(plural, namespace, request.requester.name)
        plan = builders.plan(namespace, key, request, body, builders.owner_alive(owner))
        if not plan.actions:
            return not request.pending or builders.foreign(namespace, key, request) is not None
        if "create" in plan.actions:
            assert owner is not None
            manifest = builders.approval_manifest(request, owner)
            try:
                await operator.kube.create_custom(PLURAL, namespace, manifest)
            except Rejected as rejected:
                # The same request would be refused again: settled until it is rewritten.
                logger.warning("Approval %s/%s: %s", namespace, key, redact(str(rejected)))
                return True
            body = await operator.kube.read_custom(PLURAL, namespace, key)
            if body is None:
                return False
        assert body is not None
        relayed_at = failure = None
        if "relay" in plan.actions:
            relayed_at, failure = await _relay(operator, request, body)
        written = await _status(
            operator, namespace, key, request, plan.refused, relayed_at, failure
        )
        if failure is not None:
            raise RelayPending(failure)
        return not request.pending and written is not None and written.get("phase") != "Pending"


class RelayPending(Exception):
    """A decision could not be published yet (no stream stores its reply subject)."""


async def approval_pass(operator: Operator, body: Mapping[str, Any]) -> str | None:
    """An Approval changed (a decision, say) or the operator resumed: converge it now from
    its request. Returns what blocks it, for the caller to retry with backoff, or None."""
    meta = body["metadata"]
    namespace, name = str(meta["namespace"]), str(meta["name"])
    try:
        stored = await operator.nats.read_key(
            target(operator), naming.approvals_bucket(namespace), naming.approval_key(name)
        )
        await converge(operator, namespace, name, stored)
    except (MessagingUnavailable, RelayPending) as error:
        return redact(str(error) or type(error).__name__)
    return None


async def _mirror_keys(
    operator: Operator, namespace: str, bucket: str, keys: set[str], seen: BucketSeen
) -> bool:
    """Converge each of ``keys``; whether every one went through."""
    semaphore = asyncio.Semaphore(MIRROR_CONCURRENCY)

    async def one(key: str) -> bool:
        async with semaphore:
            try:
                stored = await operator.nats.read_key(target(operator), bucket, key)
                settled = await converge(operator, namespace, key, stored)
            except RelayPending as pending:
                logger.info("Approval %s/%s: %s", namespace, key, pending)
                return True
            except Exception:
                logger.exception("Approval %s/%s: mirroring failed; retrying", namespace, key)
                return False
        if settled:
            seen.settled.add(key)
        else:
            seen.settled.discard(key)
        return True

    results = await asyncio.gather(*(one(key) for key in sorted(keys)))
    return all(results)


async def scan_once(operator: Operator, seen: dict[str, BucketSeen]) -> None:
    """One look at every approvals bucket of the watched namespaces."""
    watched = operator.settings.namespaces
    buckets = await operator.nats.approval_buckets(target(operator))
    for gone in set(seen) - {b.bucket for b in buckets}:
        del seen[gone]
    for bucket in buckets:
        if watched and bucket.namespace not in watched:
            continue
        now = time.monotonic()
        previous = seen.get(bucket.bucket)
        if previous is not None and bucket.last_sequence < previous.sequence:
            previous = None  # the bucket was made again: nothing remembered holds
        full = previous is None or now - previous.full_read_at >= FULL_READ_SECONDS
        if previous is not None and not full and previous.sequence == bucket.last_sequence:
            continue
        record = previous or BucketSeen(0, now)
        changed = None
        if previous is not None:
            changed = await operator.nats.changed_keys(
                target(operator),
                bucket.bucket,
                previous.sequence,
                bucket.last_sequence,
                MOST_CHANGES,
            )
        keys = changed
        if full or changed is None:
            # Whole, but for what was settled and has not been written since.
            full = True
            everything = await operator.nats.bucket_keys(target(operator), bucket.bucket)
            skipped = record.settled - (changed if changed is not None else everything)
            keys = everything - skipped
        assert keys is not None
        if await _mirror_keys(operator, bucket.namespace, bucket.bucket, keys, record):
            record.sequence = bucket.last_sequence
            if full:
                record.full_read_at = now
            seen[bucket.bucket] = record


async def approvals_forever(operator: Operator) -> None:
    """Look every ``SCAN_SECONDS``; a failed look is logged and the next one retries."""
    seen: dict[str, BucketSeen] = {}
    while True:
        try:
            await scan_once(operator, seen)
        except MessagingUnavailable as error:
            logger.warning("approvals: NATS unavailable: %s", redact(str(error)))
        except Exception:
            logger.exception("the approvals look failed; retrying in %ss", SCAN_SECONDS)
        await asyncio.sleep(SCAN_SECONDS)
