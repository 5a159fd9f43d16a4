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

An approval step whose dependencies are done is not dispatched: ``RequestApproval`` files
its request (its message rendered from the run, cut to ``approvals.MAX_MESSAGE_CHARS``) and
the step waits, costing nothing, until a decision is logged or ``expires_at``: its own
timeout, or the run's deadline when that comes first. Step timeouts do not apply to the
wait. At ``expires_at`` (a ``wake_at``) ``ExpireApproval`` resolves it per ``onTimeout``;
the run's deadline, when it comes first, fails the run instead, and the engine withdraws
the request.

A step with fallback agents (``EngineStep.agents``) gives each agent, in order, the
step's full retry policy: when the current agent's last attempt has failed (a failure
reply or the step's timeout), ``FallBack`` logs the hand-over, and the next round
dispatches the same input to the next agent at once (no backoff: a different agent owes
nothing to the last one's failure). Only when the last agent has failed does
``onFailure`` apply. A failure a Budget refused never falls back: the run ends
``BudgetExceeded`` as above, since a Workflow's Budget counts every agent's calls in its
runs and another agent would spend the same budget. A late reply from an agent the step
has left is an attempt no longer awaited, and changes nothing. If the engine's config
lost fallbacks while a run had moved to one (the Workflow was edited), the step has no
agent left and fails as it would at the end of its chain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from troupe_runtime.contract import approvals
from troupe_runtime.contract.durations import format_duration
from troupe_runtime.contract.engine_config import EngineConfig, EngineStep
from troupe_runtime.contract.run_events import BUDGET_EXCEEDED_REASON, RunOutcome
from troupe_runtime.contract.run_state import RunState, StepState
from troupe_runtime.workflow.mapping import MappingError, map_input, render_template

MAX_FALLBACK_ERROR_CHARS = 1000
"""A hand-over's error is the failed attempt's, kept in full in its ``StepFailed``; the
copy in ``StepFellBack`` (and every projection after it) is cut to this."""


@dataclass(frozen=True)
class Dispatch:
    step: str
    attempt: int
    input: Any
    fallback: int = 0
    """Which of the step's agents gets it (``EngineStep.agents``): 0 its own."""


@dataclass(frozen=True)
class FallBack:
    """Record that the step goes on with its agent number ``fallback``, the last one's
    ``attempt`` having failed with ``error``; the dispatch follows once it is logged."""

    step: str
    attempt: int
    fallback: int
    from_agent: str
    to_agent: str
    error: str


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


@dataclass(frozen=True)
class RequestApproval:
    """File an approval step's request and wait for its decision."""

    step: str
    name: str
    message: str
    expires_at: datetime


@dataclass(frozen=True)
class ExpireApproval:
    """Resolve a request nobody decided in time, per the step's ``onTimeout``."""

    step: str
    approved: bool
    reason: str


Action = Dispatch | FailStep | FallBack | Compensate | Finish | RequestApproval | ExpireApproval


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


def _request(config: EngineConfig, state: RunState, step: EngineStep, now: datetime) -> Action:
    assert step.approval is not None
    expires = now + step.approval.timeout
    if config.deadline is not None:
        expires = min(expires, state.started_at + config.deadline)
    message = render_template(step.approval.message, state.input, _outputs(state))
    return RequestApproval(
        step=step.name,
        name=approvals.approval_name(config.workflow, state.run_id, step.name),
        message=approvals.bounded_text(message, approvals.MAX_MESSAGE_CHARS),
        expires_at=expires,
    )


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
        elif current.status in ("Running", "WaitingForApproval"):
            due, expires = _in_flight(step, current, now)
            actions.extend(due)
            wake_at = _earliest(wake_at, expires)
        elif _retrying(step, current):
            assert current.finished_at is not None
            retry_at = current.finished_at
            if current.agent_attempts > 0:  # a fallback's first attempt goes at once
                retry_at += step.retry.delay(current.agent_attempts)
            if now >= retry_at:
                actions.append(_redispatch(step, current))
            wake_at = _earliest(wake_at, retry_at)
        elif current.fallback + 1 < len(step.agents):
            actions.append(_fall_back(step, current))
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

    try:
        actions.extend(_ready_steps(config, state, finished, now))
    except MappingError as error:
        return Plan([Finish("Failed", error=str(error))])
    return Plan(actions, wake_at)


def _retrying(step: EngineStep, current: StepState) -> bool:
    """Whether the failed step's current agent has attempts left (and is still one of the
    step's agents: the config may have lost it)."""
    return current.fallback < len(step.agents) and current.agent_attempts < step.retry.max_attempts


def _redispatch(step: EngineStep, current: StepState) -> Dispatch:
    return Dispatch(step.name, current.attempt + 1, current.input, current.fallback)


def _fall_back(step: EngineStep, current: StepState) -> FallBack:
    agents = step.agents
    return FallBack(
        step=step.name,
        attempt=current.attempt,
        fallback=current.fallback + 1,
        from_agent=agents[current.fallback].agent,
        to_agent=agents[current.fallback + 1].agent,
        error=(current.error or "failed")[:MAX_FALLBACK_ERROR_CHARS],
    )


def _in_flight(
    step: EngineStep, current: StepState, now: datetime
) -> tuple[list[Action], datetime]:
    """What is due for a step that runs (its timeout) or waits for approval (its
    request's expiry, resolved per ``onTimeout``), and when it falls due."""
    if current.approval is not None and step.approval is not None:
        expires = current.approval.expires_at
        if now < expires:
            return [], expires
        reason = f"no decision within {format_duration(step.approval.timeout)}"
        return [ExpireApproval(step.name, step.approval.on_timeout == "approve", reason)], expires
    assert current.dispatched_at is not None
    expires = current.dispatched_at + step.timeout
    if now < expires:
        return [], expires
    return [FailStep(step.name, current.attempt, f"timed out after {step.timeout}")], expires


def _ready_steps(
    config: EngineConfig, state: RunState, finished: set[str], now: datetime
) -> list[Action]:
    """The first action of each step not started whose dependencies are done: a dispatch,
    or an approval step's request. ``MappingError`` (naming the step) for an input that
    cannot be mapped."""
    outputs = _outputs(state)
    actions: list[Action] = []
    for step in config.steps:
        if step.name in state.steps or not all(dep in finished for dep in step.depends_on):
            continue
        if step.approval is not None:
            actions.append(_request(config, state, step, now))
            continue
        try:
            payload = map_input(step.input, step.depends_on, state.input, outputs)
        except MappingError as error:
            raise MappingError(f"step {step.name}: {error}") from error
        actions.append(Dispatch(step.name, 1, payload))
    return actions
