"""A run's current state, folded from its events (pure).

The engine keeps this projection in KV for fast reads (``troupe runs``), but
the log is the truth: after a crash the projection is rebuilt by replaying it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from troupe_runtime.contract.policies import WireModel
from troupe_runtime.contract.run_events import (
    CancelRequested,
    CompensationDispatched,
    CompensationFinished,
    Event,
    RunFinished,
    RunStarted,
    StepDispatched,
    StepFailed,
    StepSucceeded,
)
from troupe_runtime.contract.usage import Usage

StepStatus = Literal["Pending", "Running", "Succeeded", "Failed"]
RunStatus = Literal["Running", "Compensating", "Succeeded", "Failed", "BudgetExceeded", "Cancelled"]
TERMINAL_STATUSES: tuple[RunStatus, ...] = ("Succeeded", "Failed", "BudgetExceeded", "Cancelled")
"""How a run ends. ``BudgetExceeded``: a step's model call was refused by a Budget's hard
limit; the output is the steps that finished (``{"steps": {name: output}}``).
``Cancelled``: a ``run_events.CANCEL_TYPE`` message asked for it (A2A CancelTask, a
Trigger's Replace policy); steps already dispatched are not recalled."""


class StepState(WireModel):
    status: StepStatus = "Pending"
    attempt: int = 0
    input: Any = None
    output: Any = None
    error: str | None = None
    dispatched_at: datetime | None = None
    finished_at: datetime | None = None
    usage: Usage | None = None
    """What the step's attempts cost so far, as their replies said; None if none said."""
    reason: str | None = None
    """Why the last attempt failed, when its reply named a reason the engine acts on
    (``run_events.BUDGET_EXCEEDED_REASON``)."""


class CompensationState(WireModel):
    status: Literal["Running", "Done", "Failed"] = "Running"
    dispatched_at: datetime
    finished_at: datetime | None = None


class Cancellation(WireModel):
    reason: str
    requested_at: datetime


class RunState(WireModel):
    run_id: str
    status: RunStatus = "Running"
    input: Any = None
    priority: int | None = None
    traceparent: str | None = None
    started_at: datetime
    finished_at: datetime | None = None
    steps: dict[str, StepState] = Field(default_factory=dict)
    succeeded_order: list[str] = Field(default_factory=list)
    compensations: dict[str, CompensationState] = Field(default_factory=dict)
    output: Any = None
    error: str | None = None
    events: int = 0
    cancellation: Cancellation | None = None
    """Set by a ``CancelRequested``: the planner then only ends the run ``Cancelled``."""
    usage: Usage | None = None
    """The run's tokens and cost: every attempt's and compensation's that said. None when
    none did (no LLM agent among the steps, or a run recorded before Troupe counted)."""

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


def add_usage(total: Usage | None, more: Usage | None) -> Usage | None:
    """``total`` plus ``more``, where None is "nothing reported", not zero."""
    if more is None:
        return total
    return more if total is None else total + more


def run_usage(state: RunState) -> Usage:
    """The run's tokens and cost, zero when nothing was reported: what a status shows."""
    return state.usage or Usage()


def _step(state: RunState, name: str) -> StepState:
    return state.steps.get(name, StepState())


def _awaited(state: RunState, step: str, attempt: int) -> bool:
    """Whether a reply for ``step``/``attempt`` is the one the run is waiting for."""
    current = _step(state, step)
    return current.status == "Running" and current.attempt == attempt


def _finished(
    state: RunState, step: str, usage: Usage | None, at: datetime, **changes: Any
) -> StepState:
    current = _step(state, step)
    return current.model_copy(
        update={**changes, "finished_at": at, "usage": add_usage(current.usage, usage)}
    )


def apply(state: RunState | None, event: Event) -> RunState:
    """Fold one event into the state; events of a finished run change nothing."""
    if state is None:
        if not isinstance(event, RunStarted):
            raise ValueError(f"run {event.run_id} has no RunStarted before {event.kind}")
        return RunState(
            run_id=event.run_id,
            input=event.input,
            priority=event.priority,
            traceparent=event.traceparent,
            started_at=event.at,
            events=1,
        )
    if state.terminal:
        return state
    steps = dict(state.steps)
    update: dict[str, Any] = {"events": state.events + 1}
    match event:
        case StepDispatched():
            steps[event.step] = StepState(
                status="Running",
                attempt=event.attempt,
                input=event.input,
                dispatched_at=event.at,
                usage=_step(state, event.step).usage,  # earlier attempts' cost stays the step's
            )
        case StepSucceeded() if _awaited(state, event.step, event.attempt):
            steps[event.step] = _finished(
                state, event.step, event.usage, status="Succeeded", output=event.output, at=event.at
            )
            update["succeeded_order"] = [*state.succeeded_order, event.step]
            update["usage"] = add_usage(state.usage, event.usage)
        case StepFailed() if _awaited(state, event.step, event.attempt):
            steps[event.step] = _finished(
                state,
                event.step,
                event.usage,
                status="Failed",
                error=event.error,
                reason=event.reason,
                at=event.at,
            )
            update["usage"] = add_usage(state.usage, event.usage)
        case CompensationDispatched():
            update["status"] = "Compensating"
            update["compensations"] = {
                **state.compensations,
                event.step: CompensationState(dispatched_at=event.at),
            }
        case CompensationFinished() if (
            event.step in state.compensations
            and state.compensations[event.step].status == "Running"
        ):
            done = state.compensations[event.step].model_copy(
                update={"status": "Failed" if event.error else "Done", "finished_at": event.at}
            )
            update["compensations"] = {**state.compensations, event.step: done}
            update["usage"] = add_usage(state.usage, event.usage)
        case CancelRequested() if state.cancellation is None:
            update["cancellation"] = Cancellation(reason=event.reason, requested_at=event.at)
        case RunFinished():
            update.update(
                status=event.status, output=event.output, error=event.error, finished_at=event.at
            )
        case _:
            pass  # A duplicate or late reply for an attempt no longer awaited changes nothing.
    update["steps"] = steps
    return state.model_copy(update=update)


def replay(events: list[Event]) -> RunState | None:
    state: RunState | None = None
    for event in events:
        state = apply(state, event)
    return state
