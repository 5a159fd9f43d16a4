"""Triggers: what starts an Agent's event or a Workflow's run without a caller.

A ``Trigger`` (``TriggerSpec``) names a target and one source: a cron schedule (fired by
the operator's leader), a signed webhook or a NATS subject (both served by the gateway).
The operator writes a ``TriggerDefinition`` to the namespace's gateway directory under
``directory_key(name)``; the gateway reads it there.

Everything here is pure, shared by the operator and the gateway: the next fire times, what
a missed window does, the fire's deterministic id (so a failover or a redelivery never
fires twice), the webhook signature check and the payload mapping.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import warnings
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jmespath
from croniter import croniter  # type: ignore[import-untyped]
from croniter.croniter import CroniterError  # type: ignore[import-untyped]
from pydantic import Field, field_validator, model_validator

from troupe_runtime.contract import grammar
from troupe_runtime.contract.durations import Duration
from troupe_runtime.contract.expressions import expression_problem
from troupe_runtime.contract.policies import WireModel

TRIGGERS_PREFIX = "triggers."
SCHEDULE_MAX = 128
TIME_ZONE_MAX = 64
EXPRESSION_MAX = 1024
MAX_PAYLOAD_BYTES = 1 << 20
"""A payload past this is refused before JMESPath sees it."""
MAX_FIRE_INPUT_BYTES = 1 << 20
SIGNATURE_PREFIX = "sha256="
DEFAULT_REPLAY_WINDOW = timedelta(minutes=5)
MAX_MISSED_RUNS = 1
"""RunOnce fires one run for any number of missed windows: the latest."""
CRON_SOURCE = "troupe.dev/trigger"
FIRE_TYPE = "troupe.trigger.fired"


def directory_key(name: str) -> str:
    """Where the operator files a Trigger's definition in the namespace's directory bucket."""
    return f"{TRIGGERS_PREFIX}{name}"


def schedule_problem(schedule: str) -> str | None:
    """Why ``schedule`` is not a cron expression croniter can run (5 fields, or 6 with
    seconds), or None."""
    if not isinstance(schedule, str) or not schedule.strip() or len(schedule) > SCHEDULE_MAX:
        return f"schedule must be a cron expression of at most {SCHEDULE_MAX} characters"
    fields = schedule.split()
    if len(fields) not in (5, 6):
        return f"{schedule!r} is not a cron expression: it needs 5 fields (6 with seconds)"
    try:
        if not croniter.is_valid(schedule, second_at_beginning=False):
            return f"{schedule!r} is not a cron expression croniter accepts"
        croniter(schedule, datetime(2026, 1, 1, tzinfo=UTC)).get_next(datetime)
    except (CroniterError, ValueError, KeyError, OverflowError, TypeError):
        return f"{schedule!r} is not a cron expression croniter accepts"
    return None


def time_zone_problem(name: str) -> str | None:
    """Why ``name`` is not an IANA time zone (tzdata), or None."""
    if not isinstance(name, str) or not name or len(name) > TIME_ZONE_MAX:
        return "timeZone must be an IANA time zone such as Europe/Paris"
    if name.startswith(("/", ".")) or ".." in name or "\\" in name or "\x00" in name:
        return f"{name!r} is not an IANA time zone"
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return f"{name!r} is not an IANA time zone"
    return None


class TriggerTarget(WireModel):
    """What a fire starts: an Agent's event or a Workflow's run, in the same namespace."""

    kind: Literal["Agent", "Workflow"] = Field(description="Agent or Workflow.")
    name: str = Field(
        min_length=1,
        max_length=grammar.DNS_LABEL_MAX,
        pattern=grammar.DNS_LABEL_PATTERN,
        description="The Agent's or Workflow's name.",
    )


class CronSource(WireModel):
    """Fire on a schedule, from the operator's leader."""

    schedule: str = Field(
        max_length=SCHEDULE_MAX,
        description="A cron expression: 5 fields, or 6 with seconds last (croniter).",
    )
    time_zone: str = Field(
        default="UTC",
        max_length=TIME_ZONE_MAX,
        description="An IANA time zone, such as Europe/Paris; default UTC.",
    )
    concurrency_policy: Literal["Allow", "Forbid", "Replace"] = Field(
        default="Allow",
        description="Workflow targets: Allow runs to overlap; Forbid skips a fire while the "
        "previous fire's run is active; Replace cancels it first. Agent targets always Allow "
        "(an event sent cannot be recalled). Default Allow.",
    )
    missed_runs: Literal["Skip", "RunOnce"] = Field(
        default="Skip",
        description="After a pause (an operator restart): Skip fires nothing for missed "
        "windows; RunOnce fires the latest missed one if within startingDeadline. Default Skip.",
    )
    starting_deadline: Duration | None = Field(
        default=None,
        description="How late a missed fire may still run (RunOnce): a duration such as 10m "
        "or 1h; unset: any delay.",
    )

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        if problem := schedule_problem(value):
            raise ValueError(problem)
        return value

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, value: str) -> str:
        if problem := time_zone_problem(value):
            raise ValueError(problem)
        return value


class SecretKeyRef(WireModel):
    """A key of a Secret in the Trigger's namespace."""

    name: str = Field(
        min_length=1,
        max_length=grammar.DNS_SUBDOMAIN_MAX,
        pattern=grammar.DNS_SUBDOMAIN_PATTERN,
        description="The Secret's name.",
    )
    key: str = Field(
        default="secret",
        min_length=1,
        max_length=253,
        pattern=grammar.CONFIG_KEY_PATTERN,
        description="The data key holding the HMAC secret; default secret.",
    )


class WebhookSource(WireModel):
    """Fire on ``POST /hooks/{namespace}/{trigger}`` signed with HMAC-SHA256."""

    secret_ref: SecretKeyRef = Field(description="The shared HMAC secret.")
    replay_window: Duration = Field(
        default=DEFAULT_REPLAY_WINDOW,
        description="How far Troupe-Timestamp may be from now, a duration such as 5m or 90s; "
        "a signature is accepted once within it; default 5m.",
    )


class CloudEventFilter(WireModel):
    """Only CloudEvents with these attributes fire (exact match; unset matches any)."""

    type: str | None = Field(default=None, max_length=256, description="ce-type.")
    source: str | None = Field(default=None, max_length=1024, description="ce-source.")


class SubjectSource(WireModel):
    """Fire on each message published to a NATS subject."""

    subject: str = Field(
        max_length=grammar.SUBJECT_MAX,
        pattern=grammar.TRIGGER_SUBJECT_PATTERN,
        description="A NATS subject, wildcards allowed; not under troupe.",
    )
    filter: CloudEventFilter | None = Field(
        default=None, description="A CloudEvent filter on type and source."
    )

    @field_validator("subject")
    @classmethod
    def _outside_troupe(cls, value: str) -> str:
        if grammar.is_troupe_subject(value):
            raise ValueError("subject may not be under troupe. (Troupe's own subjects)")
        return value


class TriggerSource(WireModel):
    """Exactly one of cron, webhook and subject."""

    cron: CronSource | None = Field(default=None, description="A schedule.")
    webhook: WebhookSource | None = Field(default=None, description="A signed webhook.")
    subject: SubjectSource | None = Field(default=None, description="A NATS subject.")

    @model_validator(mode="after")
    def _exactly_one(self) -> TriggerSource:
        if sum(x is not None for x in (self.cron, self.webhook, self.subject)) != 1:
            raise ValueError("source needs exactly one of cron, webhook and subject")
        return self

    @property
    def kind(self) -> str:
        return "cron" if self.cron else "webhook" if self.webhook else "subject"


class TriggerRateLimit(WireModel):
    """At most ``perMinute`` fires a minute, with bursts of ``burst``; more are refused."""

    per_minute: int = Field(ge=1, le=100_000, description="Fires per minute.")
    burst: int = Field(default=1, ge=1, le=100_000, description="Fires at once; default 1.")


def _expression(value: str | None) -> str | None:
    if value is not None and (problem := expression_problem(value)):
        raise ValueError(problem)
    return value


class TriggerSpec(WireModel):
    """A source, a target, and how a payload becomes the target's input."""

    target: TriggerTarget = Field(description="What a fire starts.")
    source: TriggerSource = Field(description="What fires.")
    input: str | None = Field(
        default=None,
        max_length=EXPRESSION_MAX,
        description="JMESPath mapping the payload (webhook body, message data; cron: "
        "{scheduledTime}) to the target's input; unset: the payload.",
    )
    dedupe_key: str | None = Field(
        default=None,
        max_length=EXPRESSION_MAX,
        description="JMESPath over the payload: fires with the same value are one fire.",
    )
    rate_limit: TriggerRateLimit | None = Field(default=None, description="Unset: no limit.")
    suspend: bool = Field(default=False, description="Fire nothing while true; default false.")

    @field_validator("input", "dedupe_key")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        return _expression(value)


class TriggerDefinition(WireModel):
    """What the operator writes for the gateway under ``directory_key(name)``."""

    namespace: str
    name: str
    uid: str
    generation: int = 0
    spec: TriggerSpec


def next_fire(cron: CronSource, after: datetime) -> datetime:
    """The first scheduled time strictly after ``after``, as an aware UTC datetime."""
    zone = ZoneInfo(cron.time_zone)
    start = after.astimezone(zone)
    following: datetime = croniter(cron.schedule, start).get_next(datetime)
    return following.astimezone(UTC)


def due_fires(cron: CronSource, last: datetime, now: datetime, limit: int = 1000) -> list[datetime]:
    """Scheduled times in (last, now], oldest first, at most ``limit`` (the latest ones)."""
    fires: list[datetime] = []
    current = last
    while len(fires) < 10 * limit:
        current = next_fire(cron, current)
        if current > now:
            break
        fires.append(current)
    return fires[-limit:]


def missed_plan(cron: CronSource, due: list[datetime], now: datetime) -> list[datetime]:
    """Which of the windows missed during a pause fire: Skip none, RunOnce the latest (if
    within startingDeadline)."""
    if not due or cron.missed_runs == "Skip":
        return []
    latest = due[-1]
    if cron.starting_deadline is not None and now - latest > cron.starting_deadline:
        return []
    return [latest]


def fire_id(uid: str, scheduled: datetime) -> str:
    """The Nats-Msg-Id (and task id) of a cron fire: the same on every replica."""
    stamp = scheduled.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"trg-{uid}-{stamp}"


def dedupe_id(uid: str, value: Any) -> str:
    """The task id of a fire whose dedupe key evaluated to ``value``."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return f"trg-{hashlib.sha256(f'{uid}:{text}'.encode()).hexdigest()[:40]}"


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``Troupe-Signature`` header value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return SIGNATURE_PREFIX + mac.hexdigest()


def signature_problem(
    secret: bytes,
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    now: float,
    window: timedelta,
) -> str | None:
    """Why a webhook request is not authentic and fresh, or None (a 401 says this)."""
    if not timestamp or len(timestamp) > 20 or not timestamp.isascii() or not timestamp.isdigit():
        return "Troupe-Timestamp must be unix seconds"
    if not signature or not signature.isascii() or len(signature) > 200:
        return "Troupe-Signature must be sha256=<hex>"
    if abs(now - int(timestamp)) > window.total_seconds():
        return "Troupe-Timestamp is outside the replay window"
    expected = sign(secret, timestamp, body)
    if not hmac.compare_digest(expected.encode(), signature.strip().lower().encode()):
        return "the signature does not match"
    return None


def evaluate(expression: str | None, payload: Any) -> Any:
    """``expression`` applied to ``payload`` (unset: the payload itself)."""
    if expression is None:
        return payload
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return jmespath.search(expression, payload)


def parse_payload(body: bytes) -> Any:
    """A request body as JSON (bounded); text that is not JSON is passed as a string."""
    if len(body) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"the payload is larger than {MAX_PAYLOAD_BYTES} bytes")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return body.decode("utf-8", errors="replace")


def map_input(spec: TriggerSpec, payload: Any) -> Any:
    """The target's input for a payload; ValueError when the result is too large."""
    try:
        value = evaluate(spec.input, payload)
    except (jmespath.exceptions.JMESPathError, RecursionError, TypeError) as error:
        raise ValueError(f"input mapping failed: {type(error).__name__}") from None
    size = len(json.dumps(value, default=str))
    if size > MAX_FIRE_INPUT_BYTES:
        raise ValueError(f"the mapped input is larger than {MAX_FIRE_INPUT_BYTES} bytes")
    return value


def cron_payload(scheduled: datetime) -> dict[str, str]:
    """What a cron fire's input expression sees."""
    return {"scheduledTime": scheduled.astimezone(UTC).isoformat().replace("+00:00", "Z")}


def cloud_event_matches(
    filter_: CloudEventFilter | None, ce_type: str | None, source: str | None
) -> bool:
    """Whether a message's CloudEvent attributes pass the filter."""
    if filter_ is None:
        return True
    return (filter_.type is None or filter_.type == ce_type) and (
        filter_.source is None or filter_.source == source
    )


FAILURE_MAX = 512
"""A failure's reason is cut to this many characters (it is shown in status)."""


class FireLedger(WireModel):
    """What one Trigger has fired, under its name in ``naming.trigger_fires_bucket``.

    Whoever fires writes it with a revision check (the operator's cron, the gateway's
    webhook and relay); the operator copies it into the Trigger's status, so status has one
    writer and a fire is counted even while the operator is down.
    """

    fires: int = 0
    failures: int = 0
    last_fire_time: datetime | None = None
    last_task_id: str | None = None
    """The last fire's task id: what Forbid and Replace look at."""
    last_failure_time: datetime | None = None
    last_failure: str = ""
    last_scheduled_time: datetime | None = None
    """Cron: the latest window handled (fired, skipped or failed); a restart resumes after it."""


def recorded_fire(
    ledger: FireLedger, at: datetime, task_id: str, scheduled: datetime | None = None
) -> FireLedger:
    """``ledger`` after a fire that started ``task_id``."""
    return ledger.model_copy(
        update={
            "fires": ledger.fires + 1,
            "last_fire_time": at,
            "last_task_id": task_id,
            "last_scheduled_time": scheduled or ledger.last_scheduled_time,
        }
    )


def recorded_failure(
    ledger: FireLedger, at: datetime, reason: str, scheduled: datetime | None = None
) -> FireLedger:
    """``ledger`` after a fire that failed for ``reason`` (already free of secrets)."""
    return ledger.model_copy(
        update={
            "failures": ledger.failures + 1,
            "last_failure_time": at,
            "last_failure": reason[:FAILURE_MAX],
            "last_scheduled_time": scheduled or ledger.last_scheduled_time,
        }
    )
