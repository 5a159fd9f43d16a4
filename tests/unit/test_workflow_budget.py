"""A run a Budget stops: the engine reads the reason off the failure reply, the planner
ends the run ``BudgetExceeded`` with the finished steps' outputs and never retries, and
the log stays replayable (old logs too). The CLI and the Workflow's lastRun show it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from troupe_cli import render
from troupe_cli.views import timeline
from troupe_operator.builders.status import last_run
from troupe_runtime.contract import envelope
from troupe_runtime.contract.engine_config import EngineCompensation, EngineConfig, EngineStep
from troupe_runtime.contract.envelope import ERROR_TYPE, CloudEvent
from troupe_runtime.contract.policies import RetryPolicy
from troupe_runtime.contract.run_events import (
    BUDGET_EXCEEDED_REASON,
    CompensationDispatched,
    CompensationFinished,
    Event,
    RunFinished,
    RunStarted,
    StepDispatched,
    StepFailed,
    StepSucceeded,
    decode_event,
    encode_event,
)
from troupe_runtime.contract.run_state import RunState, apply, replay
from troupe_runtime.workflow.engine import reply_event
from troupe_runtime.workflow.planner import Compensate, Dispatch, Finish, plan

T0 = datetime(2026, 12, 2, tzinfo=UTC)
REFUSAL = (
    "budget 'team': tokens spent 900 + held 0 + this call's 200 would pass the hard limit 1000"
)


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def _step(name: str, *deps: str, **extra: Any) -> EngineStep:
    return EngineStep(name=name, agent=name, subject=f"in.{name}", depends_on=list(deps), **extra)


def _config(*steps: EngineStep) -> EngineConfig:
    return EngineConfig(workflow="wf", namespace="ns", trigger_subject="go", steps=list(steps))


def _retried(name: str, *deps: str, **extra: Any) -> EngineStep:
    """A step with attempts to spare: a refusal must not use them."""
    retry = RetryPolicy(max_attempts=3, backoff=[timedelta(0)])
    return _step(name, *deps, retry=retry, **extra)


def _run(*events: Event) -> RunState:
    state = replay([RunStarted(run_id="r", at=T0, input="in"), *events])
    assert state is not None
    return state


def _dispatched(step: str, attempt: int = 1, at: float = 0) -> StepDispatched:
    return StepDispatched(run_id="r", at=_at(at), step=step, attempt=attempt)


def _succeeded(step: str, output: Any, at: float = 1) -> StepSucceeded:
    return StepSucceeded(run_id="r", at=_at(at), step=step, attempt=1, output=output)


def _refused(step: str, attempt: int = 1, at: float = 1) -> StepFailed:
    return StepFailed(
        run_id="r",
        at=_at(at),
        step=step,
        attempt=attempt,
        error=REFUSAL,
        reason=BUDGET_EXCEEDED_REASON,
    )


def _reply(data: Any, causation: str = "r/b/1", type: str = ERROR_TYPE) -> CloudEvent:
    """A reply as the engine reads it off the wire."""
    event = CloudEvent(id="x", source="/ns/b", type=type, causationid=causation, data=data)
    headers, payload = envelope.to_binary(event)
    return envelope.parse(headers, payload)


# The engine reads the reason.


def test_a_failure_reply_saying_budget_exceeded_records_the_reason() -> None:
    event = reply_event(_reply({"error": REFUSAL, "reason": "budget-exceeded"}), T0)
    assert isinstance(event, StepFailed)
    assert event.reason == BUDGET_EXCEEDED_REASON
    assert event.error == REFUSAL


def test_other_reasons_and_odd_replies_record_no_reason() -> None:
    for data in (
        {"error": "boom", "reason": "exhausted"},
        {"error": "boom"},
        "budget-exceeded",
        ["budget-exceeded"],
        {"error": "boom", "reason": ["budget-exceeded"]},
    ):
        event = reply_event(_reply(data), T0)
        assert isinstance(event, StepFailed)
        assert event.reason is None


def test_a_successful_reply_whose_data_says_budget_exceeded_is_still_a_success() -> None:
    data = {"error": "x", "reason": "budget-exceeded"}
    event = reply_event(_reply(data, type="troupe.step.result"), T0)
    assert isinstance(event, StepSucceeded)
    assert event.output == data


@given(
    st.recursive(
        st.none() | st.text() | st.integers(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
        max_leaves=10,
    )
)
def test_no_failure_data_breaks_the_reply_event(data: Any) -> None:
    event = reply_event(_reply(data), T0)
    assert isinstance(event, StepFailed)
    is_refusal = isinstance(data, dict) and data.get("reason") == "budget-exceeded"
    assert (event.reason == BUDGET_EXCEEDED_REASON) == is_refusal


# The planner ends the run.


def test_a_refused_step_ends_the_run_budget_exceeded_with_the_finished_outputs() -> None:
    config = _config(_retried("a"), _retried("b", "a"), _retried("c", "b"))
    state = _run(_dispatched("a"), _succeeded("a", {"x": 1}), _dispatched("b", at=2))
    state = apply(state, _refused("b", at=3))
    assert state.steps["b"].reason == BUDGET_EXCEEDED_REASON
    assert plan(config, state, _at(100)).actions == [
        Finish(
            "BudgetExceeded",
            output={"steps": {"a": {"x": 1}}},
            error=f"step b exceeded a budget: {REFUSAL}",
        )
    ]


def test_an_ordinary_failure_with_attempts_left_is_still_retried() -> None:
    config = _config(_retried("a"))
    state = _run(
        _dispatched("a"), StepFailed(run_id="r", at=_at(1), step="a", attempt=1, error="x")
    )
    assert plan(config, state, _at(2)).actions == [Dispatch("a", 2, None)]


def test_continue_does_not_carry_a_refused_run_on() -> None:
    config = _config(_step("a", on_failure="continue"), _step("b", "a"))
    state = _run(_dispatched("a"), _refused("a"))
    assert plan(config, state, _at(2)).actions == [
        Finish("BudgetExceeded", output={"steps": {}}, error=f"step a exceeded a budget: {REFUSAL}")
    ]


def test_a_refusal_ends_the_run_while_a_sibling_still_runs() -> None:
    config = _config(_step("a"), _step("b"), _step("c", "a", "b"))
    state = _run(_dispatched("a"), _dispatched("b"), _refused("a"))
    [finish] = plan(config, state, _at(2)).actions
    assert isinstance(finish, Finish)
    assert finish.status == "BudgetExceeded"
    state = apply(state, RunFinished(run_id="r", at=_at(2), status="BudgetExceeded"))
    assert state.terminal
    assert apply(state, _succeeded("b", "late", at=3)) == state  # a finished run stays as it was


def test_compensations_run_first_then_the_run_ends_budget_exceeded() -> None:
    undo = EngineCompensation(subject="undo.a")
    config = _config(_step("a", compensation=undo), _retried("b", "a", on_failure="compensate"))
    state = _run(
        _dispatched("a"), _succeeded("a", "A"), _dispatched("b", at=2), _refused("b", at=3)
    )
    assert plan(config, state, _at(4)).actions == [Compensate("a", "A")]
    state = apply(state, CompensationDispatched(run_id="r", at=_at(4), step="a"))
    assert plan(config, state, _at(5)).actions == []
    # The compensation may be refused too: the run still ends as the budget said.
    state = apply(state, CompensationFinished(run_id="r", at=_at(6), step="a", error=REFUSAL))
    assert plan(config, state, _at(7)).actions == [
        Finish(
            "BudgetExceeded",
            output={"steps": {"a": "A"}},
            error=f"step b exceeded a budget: {REFUSAL}",
        )
    ]


def test_a_deadline_passed_still_fails_the_run_as_before() -> None:
    config = EngineConfig(
        workflow="wf",
        namespace="ns",
        trigger_subject="go",
        steps=[_step("a")],
        deadline=timedelta(seconds=10),
    )
    state = _run(_dispatched("a"))
    [finish] = plan(config, state, _at(11)).actions
    assert isinstance(finish, Finish)
    assert finish.status == "Failed"


@settings(max_examples=200, deadline=None)
@given(
    chain=st.integers(min_value=1, max_value=6),
    refused_at=st.integers(min_value=0, max_value=5),
    attempts=st.integers(min_value=1, max_value=5),
    on_failure=st.sampled_from(["fail", "continue", "compensate"]),
    earlier_failures=st.integers(min_value=0, max_value=4),
)
def test_a_refusal_anywhere_in_a_chain_is_never_retried_and_keeps_every_output(
    chain: int, refused_at: int, attempts: int, on_failure: str, earlier_failures: int
) -> None:
    refused_at = min(refused_at, chain - 1)
    names = [f"s{i}" for i in range(chain)]
    retry = RetryPolicy(max_attempts=attempts, backoff=[timedelta(0)])
    steps = [
        _step(name, *names[:i][-1:], retry=retry, on_failure=on_failure)
        for i, name in enumerate(names)
    ]
    config = _config(*steps)
    events: list[Event] = []
    for i, name in enumerate(names[:refused_at]):
        events += [_dispatched(name, at=2 * i), _succeeded(name, i, at=2 * i + 1)]
    target = names[refused_at]
    # Ordinary failures first, while attempts last; then the refusal.
    attempt = 1
    for _ in range(min(earlier_failures, attempts - 1)):
        events += [
            _dispatched(target, attempt, at=100 + attempt),
            StepFailed(run_id="r", at=_at(100 + attempt), step=target, attempt=attempt, error="x"),
        ]
        attempt += 1
    events += [_dispatched(target, attempt, at=200), _refused(target, attempt, at=201)]
    state = _run(*events)
    actions = plan(config, state, _at(1000)).actions
    assert not any(isinstance(action, Dispatch) for action in actions)
    assert actions == [
        Finish(
            "BudgetExceeded",
            output={"steps": {name: i for i, name in enumerate(names[:refused_at])}},
            error=f"step {target} exceeded a budget: {REFUSAL}",
        )
    ]
    # The log, encoded and read back, replays to the same run.
    finished = [*events, RunFinished(run_id="r", at=_at(1000), status="BudgetExceeded")]
    decoded = [decode_event(encode_event(event)) for event in finished]
    assert replay([RunStarted(run_id="r", at=T0, input="in"), *decoded]) == apply(
        state, finished[-1]
    )


# The log stays replayable.


def test_a_log_written_before_budgets_still_replays() -> None:
    old = [
        {"kind": "RunStarted", "runId": "r", "at": "2026-01-01T00:00:00Z", "input": 1},
        {
            "kind": "StepDispatched",
            "runId": "r",
            "at": "2026-01-01T00:00:01Z",
            "step": "a",
            "attempt": 1,
        },
        {
            "kind": "StepFailed",
            "runId": "r",
            "at": "2026-01-01T00:00:02Z",
            "step": "a",
            "attempt": 1,
            "error": "boom",
        },
        {
            "kind": "RunFinished",
            "runId": "r",
            "at": "2026-01-01T00:00:03Z",
            "status": "Failed",
            "error": "e",
        },
    ]
    events = [decode_event(json.dumps(event).encode()) for event in old]
    state = replay(events)
    assert state is not None
    assert state.status == "Failed"
    assert state.steps["a"].reason is None
    projection = {
        "runId": "r",
        "status": "Failed",
        "startedAt": "2026-01-01T00:00:00Z",
        "steps": {"a": {"status": "Failed", "attempt": 1, "error": "boom"}},
    }
    assert RunState.model_validate_json(json.dumps(projection)).steps["a"].reason is None


def test_the_reason_and_the_new_status_survive_the_wire() -> None:
    for event in (
        _refused("b"),
        RunFinished(run_id="r", at=T0, status="BudgetExceeded", output={"steps": {}}, error="e"),
    ):
        assert decode_event(encode_event(event)) == event


# What people see.


def _stopped_run() -> list[Event]:
    return [
        RunStarted(run_id="r", at=T0),
        _dispatched("a"),
        _succeeded("a", "A"),
        _dispatched("b", at=2),
        _refused("b", at=3),
        RunFinished(
            run_id="r",
            at=_at(4),
            status="BudgetExceeded",
            output={"steps": {"a": "A"}},
            error=f"step b exceeded a budget: {REFUSAL}",
        ),
    ]


def test_runs_show_and_list_say_budget_exceeded() -> None:
    events = _stopped_run()
    state = replay(events)
    assert state is not None
    attempts = timeline(events)
    assert [(a.step, a.status) for a in attempts] == [("a", "Succeeded"), ("b", "BudgetExceeded")]
    text = render.run_text(state, attempts)
    assert "status:    BudgetExceeded" in text
    assert "step b exceeded a budget" in text
    document = render.run_json(state, attempts)
    assert document["status"] == "BudgetExceeded"
    assert document["output"] == {"steps": {"a": "A"}}
    assert document["steps"][1]["status"] == "BudgetExceeded"
    assert "BudgetExceeded" in render.runs_text([state])
    assert render.runs_json([state])[0]["status"] == "BudgetExceeded"


def test_the_workflows_last_run_shows_budget_exceeded() -> None:
    state = replay(_stopped_run())
    shown = last_run(state)
    assert shown is not None
    assert shown.status == "BudgetExceeded"
    assert shown.model_dump(by_alias=True)["finishedAt"] is not None
