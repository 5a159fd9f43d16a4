"""What happens in a run. A run's log is the ordered list of these events.

Each event carries a deterministic ``key`` used as its ``Nats-Msg-Id``, so an
engine that crashes and re-appends the same transition is de-duplicated by
JetStream instead of recording it twice.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter

from troupe_runtime.contract.dead_letters import DeadLetterReason
from troupe_runtime.contract.policies import WireModel
from troupe_runtime.contract.usage import Usage

# A run id is the id of the event that started it; it becomes a subject token and a KV key.
RUN_ID_PATTERN = re.compile(r"^[-_=a-zA-Z0-9]{1,200}$")
COMPENSATE = "compensate"
"""The attempt token of a compensation's dispatch id."""
CANCEL_TYPE = "troupe.workflow.cancel"
"""A request to cancel a run: a CloudEvent of this type published on
``naming.workflow_subject(.., "cancel", run)`` with data ``{"reason": str}`` (or no data).
The engine logs a ``CancelRequested`` and ends the run ``Cancelled``; a cancel of a run
that finished or never started changes nothing."""
MAX_CANCEL_REASON_CHARS = 500
"""Anyone may publish a cancel: its reason is cut to this before it is logged and
becomes the run's error."""
DEFAULT_CANCEL_REASON = "cancelled"
BUDGET_EXCEEDED_REASON: str = DeadLetterReason.BUDGET_EXCEEDED.value
"""The ``reason`` of an agent's failure reply when a Budget's hard limit refused its model
call (``dead_letters.DeadLetterReason.BUDGET_EXCEEDED``): the step is not retried, the run
ends ``BudgetExceeded``."""
RunOutcome = Literal["Succeeded", "Failed", "BudgetExceeded", "Cancelled"]


class MalformedCancel(ValueError):
    """A cancel whose body is not ``{"reason": str}``; the engine logs and drops it."""


def cancel_reason(data: Any) -> str:
    """The reason a cancel's data gives, bounded (``MAX_CANCEL_REASON_CHARS``), or
    ``DEFAULT_CANCEL_REASON`` when it gives none; ``MalformedCancel`` for anything but no
    data or an object whose ``reason``, when present, is a string."""
    if data is None:
        return DEFAULT_CANCEL_REASON
    if not isinstance(data, dict):
        raise MalformedCancel(f"a cancel's data must be an object, not {type(data).__name__}")
    reason = data.get("reason")
    if reason is None:
        return DEFAULT_CANCEL_REASON
    if not isinstance(reason, str):
        raise MalformedCancel(f"a cancel's reason must be a string, not {type(reason).__name__}")
    # Control characters would let a reason forge lines wherever the run's error is shown.
    printable = "".join(c if c.isprintable() else " " for c in reason[:MAX_CANCEL_REASON_CHARS])
    return printable.strip() or DEFAULT_CANCEL_REASON


def dispatch_id(run_id: str, step: str, attempt: int | str) -> str:
    """The event id of a step's dispatch (``attempt`` or ``COMPENSATE``): the agent's reply
    names it as its cause, and its answer streams on ``naming.token_stream_subject(ns,
    run_id, dispatch_id(...))``, which is how the CLI tells steps' deltas apart."""
    return f"{run_id}/{step}/{attempt}"


def parse_dispatch_id(value: str) -> tuple[str, str, str] | None:
    parts = value.rsplit("/", 2)
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 else None


class _Event(WireModel):
    run_id: str
    at: datetime


class RunStarted(_Event):
    kind: Literal["RunStarted"] = "RunStarted"
    input: Any = None
    priority: int | None = None
    traceparent: str | None = None

    @property
    def key(self) -> str:
        return f"{self.run_id}:started"


class StepDispatched(_Event):
    kind: Literal["StepDispatched"] = "StepDispatched"
    step: str
    attempt: int
    input: Any = None
    agent: str | None = None
    """The agent the attempt went to: the step's own or a fallback; None in logs written
    before fallbacks existed (the step's own)."""

    @property
    def key(self) -> str:
        return f"{self.run_id}:dispatched:{self.step}:{self.attempt}"


class StepSucceeded(_Event):
    kind: Literal["StepSucceeded"] = "StepSucceeded"
    step: str
    attempt: int
    output: Any = None
    usage: Usage | None = None
    """What the agent's reply said the attempt cost; None when it said nothing."""
    agent: str | None = None
    """The agent that answered: the one the engine dispatched the attempt to (never what
    the reply claims, since anyone may reply); None in logs before fallbacks existed."""

    @property
    def key(self) -> str:
        return f"{self.run_id}:finished:{self.step}:{self.attempt}"


class StepFailed(_Event):
    kind: Literal["StepFailed"] = "StepFailed"
    step: str
    attempt: int
    error: str
    usage: Usage | None = None
    reason: str | None = None
    """The failure reply's ``reason`` when it names one the engine acts on
    (``BUDGET_EXCEEDED_REASON``); None otherwise, and in logs written before it existed."""
    agent: str | None = None
    """The agent whose attempt failed (as in ``StepSucceeded``)."""

    @property
    def key(self) -> str:
        return f"{self.run_id}:finished:{self.step}:{self.attempt}"


class StepFellBack(_Event):
    """The step's agent ``from_agent`` used up the step's attempts (its last, ``attempt``,
    failed or timed out with ``error``), so the step goes on with ``to_agent``: the step's
    agent number ``fallback`` (1: its first fallback). Logged before that agent is
    dispatched, so an engine that crashes in between resumes with it; its key is one per
    step and fallback, so a repeat after a crash is recorded once."""

    kind: Literal["StepFellBack"] = "StepFellBack"
    step: str
    attempt: int
    fallback: int = Field(ge=1)
    from_agent: str
    to_agent: str
    error: str

    @property
    def key(self) -> str:
        return f"{self.run_id}:fellback:{self.step}:{self.fallback}"


class CompensationDispatched(_Event):
    kind: Literal["CompensationDispatched"] = "CompensationDispatched"
    step: str
    input: Any = None

    @property
    def key(self) -> str:
        return f"{self.run_id}:compensating:{self.step}"


class CompensationFinished(_Event):
    kind: Literal["CompensationFinished"] = "CompensationFinished"
    step: str
    error: str | None = None
    usage: Usage | None = None

    @property
    def key(self) -> str:
        return f"{self.run_id}:compensated:{self.step}"


class CancelRequested(_Event):
    """A cancel the engine took for this run: from here on the planner dispatches nothing
    and ends the run ``Cancelled``. Logged before the end, so an engine that crashes in
    between still ends it so."""

    kind: Literal["CancelRequested"] = "CancelRequested"
    reason: str = DEFAULT_CANCEL_REASON

    @property
    def key(self) -> str:
        return f"{self.run_id}:cancel"


class ApprovalRequested(_Event):
    """An approval step was reached: the engine filed request ``name`` (an
    ``approvals.ApprovalRequest``) and the step waits for a decision until ``expires_at``
    (its timeout, or the run's deadline if that comes first)."""

    kind: Literal["ApprovalRequested"] = "ApprovalRequested"
    step: str
    name: str
    message: str = ""
    expires_at: datetime

    @property
    def key(self) -> str:
        return f"{self.run_id}:approval:{self.step}:requested"


ApprovalOutcome = Literal["Approved", "Denied", "TimedOut"]


class ApprovalDecided(_Event):
    """The decision of the approval step's request ``name``: a person's (``decided_by``
    the authenticated user, ``decided_at`` when they decided) or its timeout's
    (``decided_by`` ``approvals.TIMEOUT_DECIDER``, ``approved`` per ``onTimeout``). The
    run's audit trail: who, when, why. Logged once per step (its key), so a decision
    relayed twice, or replayed after a crash, is recorded once."""

    kind: Literal["ApprovalDecided"] = "ApprovalDecided"
    step: str
    name: str
    phase: ApprovalOutcome
    approved: bool
    decided_by: str
    decided_at: datetime
    reason: str = ""

    @property
    def key(self) -> str:
        return f"{self.run_id}:approval:{self.step}:decided"


class RunFinished(_Event):
    kind: Literal["RunFinished"] = "RunFinished"
    status: RunOutcome
    output: Any = None
    error: str | None = None

    @property
    def key(self) -> str:
        return f"{self.run_id}:finished"


Event = Annotated[
    RunStarted
    | StepDispatched
    | StepSucceeded
    | StepFailed
    | StepFellBack
    | CompensationDispatched
    | CompensationFinished
    | CancelRequested
    | ApprovalRequested
    | ApprovalDecided
    | RunFinished,
    Field(discriminator="kind"),
]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def encode_event(event: Event) -> bytes:
    return event.model_dump_json(by_alias=True).encode()


def decode_event(data: bytes) -> Event:
    return EVENT_ADAPTER.validate_json(data)
