"""Decide a run's next actions from its state and the workflow (pure).

The engine calls ``plan`` after every event and on every tick; the same state
always yields the same actions, and an action already reflected in the state
is never proposed again, so planning after a crash is safe.

A step whose failure says a Budget refused it (``StepState.reason`` is
``BUDGET_EXCEEDED_REASON``) is never retried, whatever its retry policy and its
``onFailure``: the budget is the same on the next attempt, and going on would spend
more of it. The run ends ``BudgetExceeded`` with the steps that finished and their
outputs; if the step's ``onFailure`` is ``compensate``, compensations run first, as
for a failed run (they may be refused too; that does not stop the run ending).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from troupe_runtime.contract.engine_config import EngineConfig
from troupe_runtime.contract.run_events import BUDGET_EXCEEDED_REASON, RunOutcome
from troupe_runtime.contract.run_state import RunState
from troupe_runtime.workflow.mapping import MappingError, map_input


@dataclass(frozen=True)
class Dispatch:
    step: str
    attempt: int
    input: Any


@dataclass(frozen=True)
class FailStep:
    """Record a failure the engine observed itself: a step that timed out."""

    step: str
    attempt: int
    error: str


@dataclass(frozen=True)
class Compensate:
    step: str
    input: Any


@dataclass(frozen=True)
class Finish:
    status: RunOutcome
    output: Any = None
    error: str | None = None


Action = Dispatch | FailStep | Compensate | Finish


@dataclass(frozen=True)
class Plan:
    actions: list[Action] = field(default_factory=list)
    wake_at: datetime | None = None
    """When planning again could yield something new (a timeout or a retry)."""


def _earliest(*times: datetime | None) -> datetime | None:
    present = [t for t in times if t is not None]
    return min(present) if present else None


def _outputs(state: RunState) -> dict[str, Any]:
    return {name: s.output for name, s in state.steps.items() if s.status == "Succeeded"}


def _sinks(config: EngineConfig) -> list[str]:
    parents = {dep for step in config.steps for dep in step.depends_on}
    return [step.name for step in config.steps if step.name not in parents]


def _final_output(config: EngineConfig, state: RunState) -> Any:
    outputs = _outputs(state)
    sinks = _sinks(config)
    if len(sinks) == 1:
        return outputs.get(sinks[0])
    return {name: outputs.get(name) for name in sinks}


def partial_result(state: RunState) -> dict[str, Any]:
    """A run stopped by its budget or cancelled: the steps that finished, with their outputs."""
    return {"steps": _outputs(state)}


def _budget_stop(state: RunState) -> tuple[str, str] | None:
    """The step a Budget refused and its error, if one did (the first in the run's order)."""
    for name, step in state.steps.items():
        if step.status == "Failed" and step.reason == BUDGET_EXCEEDED_REASON:
            return name, f"step {name} exceeded a budget: {step.error}"
    return None


def _ending(state: RunState, reason: str) -> Finish:
    """How a run that cannot go on ends: BudgetExceeded with its partial result if a
    Budget stopped it, else Failed."""
    if (stopped := _budget_stop(state)) is not None:
        return Finish("BudgetExceeded", output=partial_result(state), error=stopped[1])
    return Finish("Failed", error=reason)


def _compensation_plan(config: EngineConfig, state: RunState, reason: str) -> list[Action]:
    """Undo completed steps one at a time, most recent first; then end the run."""
    for name in reversed(state.succeeded_order):
        step = config.step(name)
        if step.compensation is None:
            continue
        progress = state.compensations.get(name)
        if progress is None:
            outputs = _outputs(state)
            payload = map_input(step.compensation.input, [name], state.input, outputs)
            return [Compensate(name, payload)]
        if progress.status == "Running":
            return []
    return [_ending(state, reason)]


def _winding_down(config: EngineConfig, state: RunState, now: datetime) -> Plan | None:
    """The plan of a run that is over, past its deadline, compensating or stopped by a
    Budget; else None."""
    if state.terminal:
        return Plan()
    if state.cancellation is not None:
        # Nothing more is dispatched; what was dispatched is not recalled.
        return Plan(
            [Finish("Cancelled", output=partial_result(state), error=state.cancellation.reason)]
        )
    expired = config.deadline is not None and now >= state.started_at + config.deadline
    if expired and state.status != "Compensating":
        return Plan([Finish("Failed", error=f"deadline of {config.deadline} exceeded")])
    if state.status == "Compensating":
        failed = "; ".join(
            f"step {name} failed: {step.error}"
            for name, step in state.steps.items()
            if step.status == "Failed"
        )
        return Plan(_compensation_plan(config, state, failed))
    if (stopped := _budget_stop(state)) is not None:
        name, error = stopped
        if config.step(name).on_failure == "compensate":
            return Plan(_compensation_plan(config, state, error))
        return Plan([_ending(state, error)])
    return None


def attempt_deadline(config: EngineConfig, state: RunState, step: str, now: datetime) -> datetime:
    """When an attempt dispatched at ``now`` stops mattering: its step's timeout, or the
    run's deadline if that comes first. The agent drops the attempt past it."""
    expires = now + config.step(step).timeout
    if config.deadline is None:
        return expires
    return min(expires, state.started_at + config.deadline)


def plan(config: EngineConfig, state: RunState, now: datetime) -> Plan:
    """The actions that move ``state`` forward at ``now``."""
    if (settled := _winding_down(config, state, now)) is not None:
        return settled

    actions: list[Action] = []
    wake_at = state.started_at + config.deadline if config.deadline is not None else None
    finished: set[str] = set()
    for step in config.steps:
        current = state.steps.get(step.name)
        if current is None or current.status == "Pending":
            continue
        if current.status == "Succeeded":
            finished.add(step.name)
        elif current.status == "Running":
            assert current.dispatched_at is not None
            expires = current.dispatched_at + step.timeout
            if now >= expires:
                actions.append(
                    FailStep(step.name, current.attempt, f"timed out after {step.timeout}")
                )
            wake_at = _earliest(wake_at, expires)
        elif current.attempt < step.retry.max_attempts:
            assert current.finished_at is not None
            retry_at = current.finished_at + step.retry.delay(current.attempt)
            if now >= retry_at:
                actions.append(Dispatch(step.name, current.attempt + 1, current.input))
            wake_at = _earliest(wake_at, retry_at)
        elif step.on_failure == "continue":
            finished.add(step.name)
        elif step.on_failure == "compensate":
            return Plan(
                _compensation_plan(config, state, f"step {step.name} failed: {current.error}")
            )
        else:
            return Plan([Finish("Failed", error=f"step {step.name} failed: {current.error}")])

    if len(finished) == len(config.steps):
        return Plan([Finish("Succeeded", output=_final_output(config, state))])

    outputs = _outputs(state)
    for step in config.steps:
        if step.name in state.steps or not all(dep in finished for dep in step.depends_on):
            continue
        try:
            payload = map_input(step.input, step.depends_on, state.input, outputs)
        except MappingError as error:
            return Plan([Finish("Failed", error=f"step {step.name}: {error}")])
        actions.append(Dispatch(step.name, 1, payload))
    return Plan(actions, wake_at)
