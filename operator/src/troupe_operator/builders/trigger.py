"""Pure planning of a Trigger: its definition for the gateway, its subject stream, its status,
and which cron windows fire now.

The gateway serves webhook and subject Triggers from the ``TriggerDefinition`` the operator
files under ``triggers.directory_key(name)`` in the namespace's directory bucket, written only
when the stored value differs (an idle pass writes nothing). A subject Trigger's subject is
captured by a stream of its own (``naming.trigger_stream``) with the durable pull consumer the
gateway replicas share (``naming.TRIGGER_RELAY_CONSUMER``). Whoever fires writes the
Trigger's ``FireLedger``; status copies it, with the next cron fire, over kstatus conditions:
SpecValid (a cron expression, a time zone or JMESPath the models refuse stalls), TargetFound
(the target's directory entry; a missing target is waited for, not stalled) and
MessagingReady.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

from croniter import croniter  # type: ignore[import-untyped]
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from pydantic import ValidationError

from troupe_operator.api.trigger import TriggerStatus
from troupe_operator.builders.problems import Problem
from troupe_operator.builders.status import (
    MESSAGING_READY,
    SPEC_VALID,
    SPEC_VALID_OK,
    Observation,
    merge_conditions,
    timestamp,
    truncate,
)
from troupe_runtime.contract import naming, triggers
from troupe_runtime.contract.gateway import DirectoryEntry, TargetKind
from troupe_runtime.contract.redact import redact
from troupe_runtime.contract.triggers import (
    CronSource,
    FireLedger,
    TriggerDefinition,
    TriggerSpec,
)

TARGET_FOUND = "TargetFound"
TARGET_NOT_FOUND = "TargetNotFound"
SUBCONDITIONS = (SPEC_VALID, TARGET_FOUND, MESSAGING_READY)
ARMED = "Armed"
SUSPENDED = "Suspended"
STREAM_MAX_AGE_SECONDS = 24 * 3600.0
"""A subject Trigger's stream keeps a message a day at most: it is a relay's buffer."""
STREAM_MAX_MSGS = 100_000
STREAM_MAX_BYTES = 256 * 1024 * 1024
RELAY_MAX_DELIVER = 5
RELAY_ACK_WAIT_SECONDS = 30.0
RELAY_MAX_ACK_PENDING = 1000
PENDING_GRACE = timedelta(minutes=5)
"""How long a fired run the engine has not projected yet counts as active (Forbid, Replace)."""
ON_TIME = timedelta(seconds=10)
"""A due cron window this close to now is on time; an older one was missed (a pause)."""


def definition(
    namespace: str, name: str, uid: str, generation: int, spec: TriggerSpec
) -> TriggerDefinition:
    return TriggerDefinition(
        namespace=namespace, name=name, uid=uid, generation=generation, spec=spec
    )


def encode_definition(wanted: TriggerDefinition) -> bytes:
    return wanted.model_dump_json(by_alias=True, exclude_none=True).encode()


def definition_to_write(wanted: TriggerDefinition, stored: bytes | None) -> bytes | None:
    """What to put under the Trigger's directory key; None when the stored value says it."""
    if stored is not None:
        try:
            if TriggerDefinition.model_validate_json(stored) == wanted:
                return None
        except (ValidationError, ValueError):
            pass
    return encode_definition(wanted)


def stream_config(namespace: str, name: str, subject: str) -> StreamConfig:
    """The stream that captures a subject Trigger's subject: bounded in age, count and size,
    file storage (a message published while no gateway runs still fires once)."""
    return StreamConfig(
        name=naming.trigger_stream(namespace, name),
        description=f"Trigger {namespace}/{name}: messages on {subject}"[:256],
        subjects=[subject],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=STREAM_MAX_AGE_SECONDS,
        max_msgs=STREAM_MAX_MSGS,
        max_bytes=STREAM_MAX_BYTES,
        num_replicas=1,
    )


def consumer_config() -> ConsumerConfig:
    """The durable pull consumer the gateway replicas share: explicit acks, bounded
    redelivery (a message its relay keeps failing on is dropped, not retried for good)."""
    return ConsumerConfig(
        durable_name=naming.TRIGGER_RELAY_CONSUMER,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=RELAY_ACK_WAIT_SECONDS,
        max_deliver=RELAY_MAX_DELIVER,
        max_ack_pending=RELAY_MAX_ACK_PENDING,
    )


def parse_ledger(stored: bytes | None) -> FireLedger | None:
    """The stored ledger; None when absent or unreadable."""
    if stored is None:
        return None
    try:
        return FireLedger.model_validate_json(stored)
    except (ValidationError, ValueError):
        return None


def encode_ledger(ledger: FireLedger) -> bytes:
    return ledger.model_dump_json(by_alias=True, exclude_none=True).encode()


def target_entry(
    kind: TargetKind, namespace: str, name: str, stored: bytes | None
) -> DirectoryEntry | None:
    """The target's directory entry from its stored value; None when absent, junk or
    another object's."""
    if stored is None:
        return None
    try:
        found = DirectoryEntry.model_validate_json(stored)
    except (ValidationError, ValueError):
        return None
    return found if (found.kind, found.namespace, found.name) == (kind, namespace, name) else None


@dataclass(frozen=True)
class Messaging:
    """What the pass's NATS step came to: ``error`` when NATS failed it."""

    url: str
    error: str | None = None

    def condition(self, spec: TriggerSpec) -> Observation:
        if self.error is not None:
            return Observation(
                MESSAGING_READY,
                False,
                "MessagingUnavailable",
                f"NATS at {self.url}: {self.error}; retrying",
            )
        what = "definition filed for the gateway"
        if spec.source.subject is not None:
            what += f"; stream capturing {spec.source.subject} with consumer "
            what += naming.TRIGGER_RELAY_CONSUMER
        return Observation(MESSAGING_READY, True, "Provisioned", what)


def target_condition(spec: TriggerSpec, found: bool) -> Observation:
    kind, name = spec.target.kind, spec.target.name
    if found:
        return Observation(TARGET_FOUND, True, "Found", f"{kind} {name} is listed")
    return Observation(
        TARGET_FOUND,
        False,
        TARGET_NOT_FOUND,
        f"{kind} {name} is not in the gateway directory of this namespace (missing, or on "
        "another NATS server); waiting for it",
        stalled=False,
    )


def next_fire_time(spec: TriggerSpec, now: datetime) -> str | None:
    """When the cron fires next; None for another source or while suspended."""
    if spec.source.cron is None or spec.suspend:
        return None
    return timestamp(triggers.next_fire(spec.source.cron, now))


def _time(at: datetime | None) -> str | None:
    return None if at is None else timestamp(at)


def trigger_status(
    previous: TriggerStatus,
    generation: int,
    now: datetime,
    spec: TriggerSpec,
    target_found: bool | None,
    messaging: Messaging,
    ledger: FireLedger | None,
) -> TriggerStatus:
    """The next status; ``ledger`` None (unread, or none yet) keeps the figures shown, and
    ``target_found`` None (the directory unread: NATS failed the pass) keeps TargetFound as
    it was, rather than claiming a target missing that nobody looked for. The last failure
    is redacted: whoever fired wrote it, and status is read by anyone."""
    observed = [SPEC_VALID_OK, messaging.condition(spec)]
    if target_found is not None:
        observed.insert(1, target_condition(spec, target_found))
    conditions = merge_conditions(
        previous.conditions,
        observed,
        SUBCONDITIONS,
        generation,
        now,
        ready_reason=SUSPENDED if spec.suspend else ARMED,
    )
    update: dict[str, Any] = {
        "observed_generation": generation,
        "conditions": conditions,
        "next_fire_time": next_fire_time(spec, now),
    }
    if ledger is not None:
        update |= {
            "fires": ledger.fires,
            "failures": ledger.failures,
            "last_fire_time": _time(ledger.last_fire_time),
            "last_failure": truncate(redact(ledger.last_failure)),
        }
    return previous.model_copy(update=update)


def spec_invalid_status(
    previous: TriggerStatus, generation: int, now: datetime, message: str
) -> TriggerStatus:
    """A spec the models refuse: Stalled naming the field; the figures shown kept, and no
    next fire (nothing fires from a spec that cannot be read)."""
    observed = Observation(SPEC_VALID, False, "SpecInvalid", message, stalled=True)
    conditions = merge_conditions(
        previous.conditions, [observed], SUBCONDITIONS, generation, now, ready_reason=ARMED
    )
    return previous.model_copy(
        update={"observed_generation": generation, "conditions": conditions, "next_fire_time": None}
    )


def rejected_status(
    previous: TriggerStatus, generation: int, now: datetime, problems: list[Problem]
) -> TriggerStatus:
    """JetStream refused the subject stream (its subject stored by another stream): Stalled
    on MessagingReady with the problem's reason, naming the field."""
    observed = [
        SPEC_VALID_OK,
        Observation(
            MESSAGING_READY,
            False,
            problems[0].reason,
            "; ".join(p.sentence() for p in problems),
            stalled=True,
        ),
    ]
    conditions = merge_conditions(
        previous.conditions, observed, SUBCONDITIONS, generation, now, ready_reason=ARMED
    )
    return previous.model_copy(update={"observed_generation": generation, "conditions": conditions})


def failed_status(
    previous: TriggerStatus, generation: int, now: datetime, observed: Observation
) -> TriggerStatus:
    conditions = merge_conditions(
        previous.conditions, [observed], SUBCONDITIONS, generation, now, ready_reason=ARMED
    )
    return previous.model_copy(update={"observed_generation": generation, "conditions": conditions})


# Cron: which windows fire now.


@dataclass(frozen=True)
class CronPlan:
    """What one look at a cron Trigger decides: ``fire`` these windows (oldest first), and
    record ``handled`` as the latest window dealt with (fired or skipped)."""

    fire: list[datetime]
    handled: datetime | None

    @property
    def idle(self) -> bool:
        return not self.fire and self.handled is None


def latest_fire(cron: CronSource, at: datetime) -> datetime:
    """The latest scheduled time at or before ``at``, as an aware UTC datetime."""
    start = (at + timedelta(microseconds=1)).astimezone(ZoneInfo(cron.time_zone))
    previous: datetime = croniter(cron.schedule, start).get_prev(datetime)
    return previous.astimezone(UTC)


def cron_plan(cron: CronSource, since: datetime, now: datetime) -> CronPlan:
    """The windows due in (``since``, ``now``]: the latest fires when it is on time (within
    ``ON_TIME``); windows older than that were missed during a pause and follow the
    missed-run policy (Skip: none, RunOnce: the latest within startingDeadline). Every due
    window is handled either way, so none is looked at twice; however long the pause, only
    the first and the latest window are computed."""
    if triggers.next_fire(cron, since) > now:
        return CronPlan([], None)
    latest = latest_fire(cron, now)
    if now - latest <= ON_TIME:
        return CronPlan([latest], latest)
    return CronPlan(triggers.missed_plan(cron, [latest], now), latest)


Action = Literal["fire", "skip", "replace"]


def concurrency_action(
    cron: CronSource, kind: TargetKind, last_task: str | None, last_active: bool
) -> Action:
    """What the concurrency policy does with the next fire: Agent targets always fire (an
    event sent cannot be recalled, so their policy is Allow); a Workflow's Forbid skips while
    the last fire's run is unfinished, Replace cancels it first."""
    if kind == "Agent" or cron.concurrency_policy == "Allow" or last_task is None:
        return "fire"
    if not last_active:
        return "fire"
    return "skip" if cron.concurrency_policy == "Forbid" else "replace"


def pending(ledger: FireLedger, now: datetime) -> bool:
    """Whether the last fire is recent enough that a run not projected yet is on its way."""
    return ledger.last_fire_time is not None and now - ledger.last_fire_time <= PENDING_GRACE


def skipped(ledger: FireLedger, handled: datetime) -> FireLedger:
    """``ledger`` with ``handled`` as the latest window dealt with, nothing fired."""
    return ledger.model_copy(update={"last_scheduled_time": handled})


def since(ledger: FireLedger | None, created: datetime) -> datetime:
    """Where the cron resumes: after the latest window handled, else the Trigger's creation."""
    if ledger is not None and ledger.last_scheduled_time is not None:
        return ledger.last_scheduled_time
    return created
