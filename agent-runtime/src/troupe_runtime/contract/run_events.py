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
CANCEL_TYPE = "troupe.workflow.cancel"
"""A request to cancel a run, published on ``naming.workflow_subject(.., "cancel", run)``
with data ``{"reason": str}``; the engine ends the run ``Cancelled`` (STUB, issue 14: helper
W implements)."""
"""The attempt token of a compensation's dispatch id."""
BUDGET_EXCEEDED_REASON: str = DeadLetterReason.BUDGET_EXCEEDED.value
"""The ``reason`` of an agent's failure reply when a Budget's hard limit refused its model
call (``dead_letters.DeadLetterReason.BUDGET_EXCEEDED``): the step is not retried, the run
ends ``BudgetExceeded``."""
RunOutcome = Literal["Succeeded", "Failed", "BudgetExceeded"]


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

    @property
    def key(self) -> str:
        return f"{self.run_id}:finished:{self.step}:{self.attempt}"


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
    | CompensationDispatched
    | CompensationFinished
    | RunFinished,
    Field(discriminator="kind"),
]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def encode_event(event: Event) -> bytes:
    return event.model_dump_json(by_alias=True).encode()


def decode_event(data: bytes) -> Event:
    return EVENT_ADAPTER.validate_json(data)
