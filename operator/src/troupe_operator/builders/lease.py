"""Leader election on a coordination.k8s.io/v1 Lease, the pure part: client-go's rules.

A replica may write itself into the Lease when nobody holds it (it was released), when it
holds it already (a renewal), or when the holder has left it unrenewed for a whole lease
duration *as this replica observed it*. Expiry is measured on the observer's own monotonic
clock from the moment it last saw the record change, never from the holder's renewTime:
clocks of different nodes disagree, a duration measured on one clock does not. The holder
stops (exits) once it could not renew for the renew deadline, which is shorter than the
lease duration, so it is gone before anyone may take over. Two writers racing for the same
record are settled by the API server: every write names the resourceVersion it read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

RELEASED_LEASE_SECONDS = 1
"""What a released Lease says (as client-go writes it): nobody holds it, take it at once."""


@dataclass(frozen=True)
class ElectionTimings:
    """client-go's three knobs, in seconds.

    ``lease_duration``: how long a standby waits on a holder it no longer sees renewing;
    ``renew_deadline``: how long the holder keeps acting without a successful renewal before
    it exits; ``retry_period``: the pause between attempts to acquire or renew.
    """

    lease_duration: int = 10
    renew_deadline: float = 7.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError(
                "leader election needs 0 < retry period < renew deadline < lease duration"
                f" (a holder must stop before a standby may take over), not {self.retry_period}"
                f" < {self.renew_deadline} < {self.lease_duration}"
            )


@dataclass(frozen=True)
class LeaseRecord:
    """The Lease's spec as the election reads and writes it."""

    holder: str
    """The holder's identity; empty once released."""
    lease_duration: int
    acquire_time: datetime | None
    renew_time: datetime | None
    transitions: int


@dataclass(frozen=True)
class ObservedLease:
    """A Lease as read from the API server: its record and the version to write it back at."""

    record: LeaseRecord
    resource_version: str


@dataclass(frozen=True)
class Observation:
    """What a replica last saw of the Lease, and when (its monotonic clock) it first saw it."""

    lease: ObservedLease
    since: float


def micro_time(moment: datetime) -> str:
    """A MicroTime, as the API server stores ``acquireTime`` and ``renewTime``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _int(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def read_lease(body: Mapping[str, Any]) -> ObservedLease:
    """The record of a Lease body; fields anyone wrote wrong read as absent, never crash."""
    spec = body.get("spec")
    spec = spec if isinstance(spec, Mapping) else {}
    metadata = body.get("metadata")
    metadata = metadata if isinstance(metadata, Mapping) else {}
    holder = spec.get("holderIdentity")
    record = LeaseRecord(
        holder=holder if isinstance(holder, str) else "",
        lease_duration=max(_int(spec.get("leaseDurationSeconds"), 0), 0),
        acquire_time=_time(spec.get("acquireTime")),
        renew_time=_time(spec.get("renewTime")),
        transitions=max(_int(spec.get("leaseTransitions"), 0), 0),
    )
    return ObservedLease(record, str(metadata.get("resourceVersion") or ""))


def lease_manifest(
    namespace: str, name: str, record: LeaseRecord, resource_version: str | None = None
) -> dict[str, Any]:
    """The Lease to create, or (with ``resource_version``) to replace only if unchanged."""
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {
            "app.kubernetes.io/part-of": "troupe",
            "app.kubernetes.io/component": "operator",
        },
    }
    if resource_version is not None:
        metadata["resourceVersion"] = resource_version
    spec: dict[str, Any] = {
        "holderIdentity": record.holder,
        "leaseDurationSeconds": record.lease_duration,
        "leaseTransitions": record.transitions,
    }
    if record.acquire_time is not None:
        spec["acquireTime"] = micro_time(record.acquire_time)
    if record.renew_time is not None:
        spec["renewTime"] = micro_time(record.renew_time)
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": metadata,
        "spec": spec,
    }


def observe(previous: Observation | None, lease: ObservedLease, now: float) -> Observation:
    """Fold a fresh read into what was seen: the clock restarts only when the Lease changed."""
    if previous is not None and previous.lease == lease:
        return previous
    return Observation(lease, now)


def expired(observation: Observation, now: float) -> bool:
    """Whether the holder has left the Lease unchanged for its whole lease duration."""
    return now >= observation.since + observation.lease.record.lease_duration


def may_acquire(observation: Observation, identity: str, now: float) -> bool:
    """Whether ``identity`` may write itself into the observed Lease now."""
    holder = observation.lease.record.holder
    return holder in ("", identity) or expired(observation, now)


def claimed(
    record: LeaseRecord | None, identity: str, lease_duration: int, now: datetime
) -> LeaseRecord:
    """The record that acquires (or, for its holder, renews) the Lease at ``now``.

    A renewal keeps the acquire time and the transition count; a takeover, even of a
    released Lease, counts one more transition (as client-go counts them).
    """
    if record is None:
        return LeaseRecord(identity, lease_duration, now, now, 0)
    if record.holder == identity:
        return replace(record, lease_duration=lease_duration, renew_time=now)
    return LeaseRecord(identity, lease_duration, now, now, record.transitions + 1)


def released(record: LeaseRecord, now: datetime) -> LeaseRecord:
    """The record that gives the Lease up: no holder, so a standby takes it on its next try."""
    return LeaseRecord("", RELEASED_LEASE_SECONDS, now, now, record.transitions)


def renew_overdue(renewed_at: float, timings: ElectionTimings, now: float) -> bool:
    """Whether the holder went a whole renew deadline without renewing: it must stop."""
    return now >= renewed_at + timings.renew_deadline
