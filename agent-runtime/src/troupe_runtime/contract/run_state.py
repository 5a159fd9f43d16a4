"""A run's current state, folded from its events (pure).

The engine keeps this projection in KV for fast reads (``troupe runs``), but
the log is the truth: after a crash the projection is rebuilt by replaying it.

An approval step is ``WaitingForApproval`` from its ``ApprovalRequested`` to its
``ApprovalDecided``; so is the run while some step waits and none runs (a person, not an
agent, holds it up). An approval that passes succeeds with the output
``{"approved": true, "decidedBy": …, "reason": …}``; one denied, or timed out with
``onTimeout: reject``, fails with an error naming who denied and why, or the timeout.

A step with fallback agents keeps one attempt counter across them (so every dispatch id
differs); ``StepFellBack`` moves it to its next agent (``fallback``) and records from
which attempt on that agent's attempts count (``fallback_from``). The step stays
``Failed`` until that agent is dispatched, as between retries.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from troupe_runtime.contract import approvals
from troupe_runtime.contract.policies import WireModel
from troupe_runtime.contract.run_events import (
    ApprovalDecided,
    ApprovalRequested,
    CancelRequested,
    CompensationDispatched,
    CompensationFinished,
    Event,
    RunFinished,
    RunStarted,
    StepDispatched,
    StepFailed,
    StepFellBack,
    StepSucceeded,
)
from troupe_runtime.contract.usage import Usage

StepStatus = Literal["Pending", "Running", "WaitingForApproval", "Succeeded", "Failed"]
RunStatus = Literal[
    "Running",
    "WaitingForApproval",
    "Compensating",
    "Succeeded",
    "Failed",
    "BudgetExceeded",
    "Cancelled",
]
TERMINAL_STATUSES: tuple[RunStatus, ...] = ("Succeeded", "Failed", "BudgetExceeded", "Cancelled")
"""How a run ends. ``BudgetExceeded``: a step's model call was refused by a Budget's hard
limit; the output is the steps that finished (``{"steps": {name: output}}``).
``Cancelled``: a ``run_events.CANCEL_TYPE`` message asked for it (A2A CancelTask, a
Trigger's Replace policy); steps already dispatched are not recalled."""


class StepApproval(WireModel):
    """An approval step's request and, once decided, its decision."""

    name: str
    message: str = ""
    requested_at: datetime
    expires_at: datetime
    phase: approvals.Phase = "Pending"
    approved: bool | None = None
    decided_by: str | None = None
    decided_at: datetime | None = None
    reason: str | None = None


class StepFallback(WireModel):
    """One hand-over of a step from an agent that failed it to the next."""

    from_agent: str
    to_agent: str
    attempt: int
    error: str
    at: datetime


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
    approval: StepApproval | None = None
    """An approval step's request and decision; None for an agent's step."""
    agent: str | None = None
    """The agent the current (or last) attempt went to; None before any dispatch, and for
    runs logged before fallbacks existed."""
    fallback: int = 0
    """Which of the step's agents handles it (``EngineStep.agents``): 0 its own."""
    fallback_from: int = 0
    """The step's attempts before the current agent's first: the current agent has had
    ``attempt - fallback_from`` of them."""
    fell_back: list[StepFallback] = Field(default_factory=list)
    """The step's hand-overs so far, in order."""

    @property
    def agent_attempts(self) -> int:
        """The attempts the current agent has had."""
        return self.attempt - self.fallback_from


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


def _moved_on(state: RunState, event: StepDispatched | StepFellBack) -> dict[str, StepState]:
    """The step after a dispatch (a new attempt, running) or a hand-over to its next
    agent, by name. A hand-over counts only from the failed last attempt to the agent
    after the current one; any other (a repeat) changes nothing."""
    earlier = _step(state, event.step)
    if isinstance(event, StepDispatched):
        running = StepState(
            status="Running",
            attempt=event.attempt,
            input=event.input,
            dispatched_at=event.at,
            usage=earlier.usage,  # earlier attempts' cost stays the step's
            agent=event.agent,
            fallback=earlier.fallback,
            fallback_from=earlier.fallback_from,
            fell_back=earlier.fell_back,
        )
        return {event.step: running}
    if not (
        earlier.status == "Failed"
        and earlier.attempt == event.attempt
        and earlier.fallback == event.fallback - 1
    ):
        return {}
    handover = StepFallback(
        from_agent=event.from_agent,
        to_agent=event.to_agent,
        attempt=event.attempt,
        error=event.error,
        at=event.at,
    )
    moved = earlier.model_copy(
        update={
            "fallback": event.fallback,
            "fallback_from": earlier.attempt,
            "fell_back": [*earlier.fell_back, handover],
        }
    )
    return {event.step: moved}


def _finished(
    state: RunState, step: str, usage: Usage | None, at: datetime, **changes: Any
) -> StepState:
    current = _step(state, step)
    return current.model_copy(
        update={**changes, "finished_at": at, "usage": add_usage(current.usage, usage)}
    )


def approval_output(decision: ApprovalDecided) -> dict[str, Any]:
    """What an approval step that passed gives the steps after it."""
    return {"approved": True, "decidedBy": decision.decided_by, "reason": decision.reason}


def approval_error(decision: ApprovalDecided) -> str:
    """Why an approval step failed: who denied it and why, or its timeout."""
    if decision.phase == "TimedOut":
        detail = f": {decision.reason}" if decision.reason else ""
        return f"approval {decision.name} timed out{detail} (onTimeout: reject)"
    because = f": {decision.reason}" if decision.reason else ""
    return f"approval {decision.name} denied by {decision.decided_by}{because}"


def waiting_approval(state: RunState, step: str, name: str) -> bool:
    """Whether the run waits for the decision of request ``name`` at ``step``: what a
    decision must match to count."""
    current = state.steps.get(step)
    return (
        not state.terminal
        and current is not None
        and current.status == "WaitingForApproval"
        and current.approval is not None
        and current.approval.name == name
    )


def pending_approvals(state: RunState) -> dict[str, StepApproval]:
    """The requests the run waits on, by step."""
    return {
        name: step.approval
        for name, step in state.steps.items()
        if step.status == "WaitingForApproval" and step.approval is not None
    }


def _progress_status(steps: dict[str, StepState]) -> RunStatus:
    """Running, or WaitingForApproval while a step waits for a person and none runs."""
    statuses = {step.status for step in steps.values()}
    if "WaitingForApproval" in statuses and "Running" not in statuses:
        return "WaitingForApproval"
    return "Running"


def _decided(current: StepState, event: ApprovalDecided) -> StepState:
    assert current.approval is not None
    approval = current.approval.model_copy(
        update={
            "phase": event.phase,
            "approved": event.approved,
            "decided_by": event.decided_by,
            "decided_at": event.decided_at,
            "reason": event.reason,
        }
    )
    if event.approved:
        return current.model_copy(
            update={
                "status": "Succeeded",
                "output": approval_output(event),
                "finished_at": event.at,
                "approval": approval,
            }
        )
    return current.model_copy(
        update={
            "status": "Failed",
            "error": approval_error(event),
            "finished_at": event.at,
            "approval": approval,
        }
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
        case StepDispatched() | StepFellBack():
            steps.update(_moved_on(state, event))
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
        case ApprovalRequested() if _step(state, event.step).status == "Pending":
            steps[event.step] = StepState(
                status="WaitingForApproval",
                attempt=1,
                approval=StepApproval(
                    name=event.name,
                    message=event.message,
                    requested_at=event.at,
                    expires_at=event.expires_at,
                ),
            )
        case ApprovalDecided() if waiting_approval(state, event.step, event.name):
            steps[event.step] = _decided(steps[event.step], event)
            if event.approved:
                update["succeeded_order"] = [*state.succeeded_order, event.step]
        case CancelRequested() if state.cancellation is None:
            update["cancellation"] = Cancellation(reason=event.reason, requested_at=event.at)
        case RunFinished():
            update.update(
                status=event.status, output=event.output, error=event.error, finished_at=event.at
            )
        case _:
            pass  # A duplicate or late reply for an attempt no longer awaited changes nothing.
    update["steps"] = steps
    if update.get("status", state.status) in ("Running", "WaitingForApproval"):
        update["status"] = _progress_status(steps)
    return state.model_copy(update=update)


def replay(events: list[Event]) -> RunState | None:
    state: RunState | None = None
    for event in events:
        state = apply(state, event)
    return state
