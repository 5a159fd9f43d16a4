"""The workflow engine's pure core: events fold into a run, the planner moves it on."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from troupe_runtime.contract.engine_config import EngineCompensation, EngineConfig, EngineStep
from troupe_runtime.contract.policies import RetryPolicy
from troupe_runtime.contract.run_events import (
    MAX_CANCEL_REASON_CHARS,
    CancelRequested,
    CompensationDispatched,
    CompensationFinished,
    Event,
    RunFinished,
    RunStarted,
    StepDispatched,
    StepFailed,
    StepSucceeded,
    cancel_reason,
    decode_event,
    encode_event,
)
from troupe_runtime.contract.run_state import RunState, apply, replay
from troupe_runtime.workflow.mapping import MappingError, map_input
from troupe_runtime.workflow.planner import (
    Compensate,
    Dispatch,
    FailStep,
    Finish,
    attempt_deadline,
    plan,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _step(name: str, *deps: str, **extra: Any) -> EngineStep:
    return EngineStep(name=name, agent=name, subject=f"in.{name}", depends_on=list(deps), **extra)


def _config(*steps: EngineStep, **extra: Any) -> EngineConfig:
    return EngineConfig(
        workflow="wf", namespace="ns", trigger_subject="go", steps=list(steps), **extra
    )


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def _run(*events: Event) -> RunState:
    state = replay([RunStarted(run_id="r", at=T0, input={"q": "hi"}), *events])
    assert state is not None
    return state


def _dispatched(step: str, attempt: int = 1, at: float = 0, payload: Any = None) -> Event:
    return StepDispatched(run_id="r", at=_at(at), step=step, attempt=attempt, input=payload)


def _succeeded(step: str, output: Any, attempt: int = 1, at: float = 1) -> Event:
    return StepSucceeded(run_id="r", at=_at(at), step=step, attempt=attempt, output=output)


def _failed(step: str, attempt: int = 1, at: float = 1) -> Event:
    return StepFailed(run_id="r", at=_at(at), step=step, attempt=attempt, error="boom")


def test_a_new_run_dispatches_only_the_steps_without_dependencies() -> None:
    config = _config(_step("a"), _step("b", "a"), _step("c"))
    actions = plan(config, _run(), T0).actions
    assert actions == [Dispatch("a", 1, {"q": "hi"}), Dispatch("c", 1, {"q": "hi"})]


def test_a_linear_chain_passes_each_output_to_the_next_step() -> None:
    config = _config(_step("a"), _step("b", "a"))
    state = _run(_dispatched("a"), _succeeded("a", {"x": 1}))
    assert plan(config, state, _at(1)).actions == [Dispatch("b", 1, {"x": 1})]


def test_a_diamond_joins_only_when_both_parents_are_done() -> None:
    config = _config(_step("a"), _step("b", "a"), _step("c", "a"), _step("d", "b", "c"))
    halfway = _run(
        _dispatched("a"), _succeeded("a", 0), _dispatched("b"), _dispatched("c"), _succeeded("b", 2)
    )
    assert plan(config, halfway, _at(2)).actions == []
    joined = apply(halfway, _succeeded("c", 3))
    assert plan(config, joined, _at(2)).actions == [Dispatch("d", 1, {"b": 2, "c": 3})]


def test_the_run_succeeds_with_its_sink_step_output() -> None:
    config = _config(_step("a"), _step("b", "a"))
    state = _run(_dispatched("a"), _succeeded("a", 1), _dispatched("b"), _succeeded("b", 2))
    assert plan(config, state, _at(3)).actions == [Finish("Succeeded", output=2)]


def test_a_failed_step_is_retried_after_its_backoff_with_the_same_input() -> None:
    retry = RetryPolicy(max_attempts=2, backoff=[timedelta(seconds=5)])
    config = _config(_step("a", retry=retry))
    state = _run(_dispatched("a", payload={"q": "hi"}), _failed("a", at=1))
    early = plan(config, state, _at(3))
    assert early.actions == []
    assert early.wake_at == _at(6)
    assert plan(config, state, _at(6)).actions == [Dispatch("a", 2, {"q": "hi"})]


def test_a_step_that_exhausts_its_attempts_fails_the_run() -> None:
    config = _config(_step("a", retry=RetryPolicy(max_attempts=2, backoff=[])))
    state = _run(_dispatched("a"), _failed("a"), _dispatched("a", 2, at=2), _failed("a", 2, at=3))
    assert plan(config, state, _at(4)).actions == [Finish("Failed", error="step a failed: boom")]


def test_a_step_past_its_timeout_is_failed_by_the_engine() -> None:
    config = _config(_step("a", timeout=timedelta(seconds=10)))
    state = _run(_dispatched("a", at=0))
    assert plan(config, state, _at(9)).wake_at == _at(10)
    assert plan(config, state, _at(10)).actions == [FailStep("a", 1, "timed out after 0:00:10")]


def test_an_expired_deadline_fails_the_run() -> None:
    config = _config(_step("a"), deadline=timedelta(seconds=30))
    state = _run(_dispatched("a"))
    assert plan(config, state, _at(29)).actions == []
    assert plan(config, state, _at(30)).actions == [
        Finish("Failed", error="deadline of 0:00:30 exceeded")
    ]


def test_continue_lets_dependents_run_after_a_failure() -> None:
    config = _config(_step("a", on_failure="continue"), _step("b", "a"))
    state = _run(_dispatched("a"), _failed("a"))
    assert plan(config, state, _at(2)).actions == [Dispatch("b", 1, None)]


def test_compensation_undoes_completed_steps_in_reverse_order_then_fails() -> None:
    undo = {name: EngineCompensation(subject=f"undo.{name}") for name in "ab"}
    config = _config(
        _step("a", compensation=undo["a"]),
        _step("b", "a", compensation=undo["b"]),
        _step("c", "b", on_failure="compensate"),
    )
    state = _run(
        _dispatched("a"),
        _succeeded("a", "A"),
        _dispatched("b"),
        _succeeded("b", "B"),
        _dispatched("c"),
        _failed("c"),
    )
    assert plan(config, state, _at(2)).actions == [Compensate("b", "B")]
    state = apply(state, CompensationDispatched(run_id="r", at=_at(2), step="b"))
    assert state.status == "Compensating"
    assert plan(config, state, _at(2)).actions == []
    state = apply(state, CompensationFinished(run_id="r", at=_at(3), step="b"))
    assert plan(config, state, _at(3)).actions == [Compensate("a", "A")]
    state = apply(state, CompensationDispatched(run_id="r", at=_at(3), step="a"))
    state = apply(state, CompensationFinished(run_id="r", at=_at(4), step="a"))
    assert plan(config, state, _at(4)).actions == [Finish("Failed", error="step c failed: boom")]


def test_a_duplicate_reply_is_recorded_once() -> None:
    config = _config(_step("a"), _step("b", "a"))
    state = _run(_dispatched("a"), _succeeded("a", 1), _succeeded("a", 99))
    assert state.succeeded_order == ["a"]
    assert state.steps["a"].output == 1
    assert plan(config, state, _at(2)).actions == [Dispatch("b", 1, 1)]


def test_a_late_reply_for_an_earlier_attempt_is_ignored() -> None:
    state = _run(_dispatched("a"), _failed("a"), _dispatched("a", 2, at=2), _succeeded("a", "old"))
    assert state.steps["a"].status == "Running"
    assert state.steps["a"].attempt == 2


def test_a_finished_run_plans_nothing_and_ignores_later_events() -> None:
    config = _config(_step("a"))
    finished = RunFinished(run_id="r", at=_at(1), status="Failed", error="x")
    state = apply(_run(_dispatched("a"), finished), _succeeded("a", 1))
    assert state.status == "Failed"
    assert plan(config, state, _at(2)).actions == []


def test_events_round_trip_through_their_wire_form() -> None:
    event = _succeeded("a", {"x": [1, 2]})
    assert decode_event(encode_event(event)) == event


def test_input_mapping_reads_the_trigger_and_parent_outputs_with_jmespath() -> None:
    mapped = map_input(
        {"question": "trigger.q", "facts": "steps.search.output.hits[*].text"},
        ["search"],
        {"q": "why"},
        {"search": {"hits": [{"text": "t1"}, {"text": "t2"}]}},
    )
    assert mapped == {"question": "why", "facts": ["t1", "t2"]}


def test_a_broken_expression_names_the_input_field() -> None:
    with pytest.raises(MappingError, match=r"input\.question"):
        map_input({"question": "trigger.["}, [], {}, {})


def test_a_runs_priority_picks_the_agents_inbox_level_at_most_its_highest() -> None:
    config = _config(_step("a", priority_levels=3), _step("b"))
    assert config.step_subject("a", None) == "in.a"
    assert config.step_subject("a", 2) == "troupe.ns.agents.a.in.p2"
    assert config.step_subject("a", 7) == "troupe.ns.agents.a.in.p2"
    assert config.step_subject("b", 2) == "in.b"


@settings(max_examples=200, deadline=None)
@given(
    timeout=st.integers(min_value=1, max_value=10_000),
    started=st.integers(min_value=0, max_value=10_000),
    run_deadline=st.none() | st.integers(min_value=1, max_value=20_000),
)
def test_an_attempts_deadline_is_the_earlier_of_its_timeout_and_the_runs_deadline(
    timeout: int, started: int, run_deadline: int | None
) -> None:
    config = _config(
        _step("a", timeout=timedelta(seconds=timeout)),
        deadline=None if run_deadline is None else timedelta(seconds=run_deadline),
    )
    state = _run()
    now = _at(started)

    deadline = attempt_deadline(config, state, "a", now)

    candidates = [now + timedelta(seconds=timeout)]
    if run_deadline is not None:
        candidates.append(T0 + timedelta(seconds=run_deadline))
    assert deadline == min(candidates)


_CANCEL_EVENTS = st.lists(
    st.sampled_from(["dispatch-a", "succeed-a", "fail-a", "dispatch-b", "succeed-b"]),
    max_size=6,
)


@given(before=_CANCEL_EVENTS, reason=st.text(max_size=2000), now=st.floats(0, 1e6))
@settings(max_examples=200)
def test_a_cancelled_run_only_ever_ends_cancelled(
    before: list[str], reason: str, now: float
) -> None:
    """Whatever happened before the cancel, the plan after it dispatches nothing and ends the
    run Cancelled with the bounded reason; a second cancel changes nothing."""
    config = _config(_step("a"), _step("b", "a"))
    made = {
        "dispatch-a": _dispatched("a"),
        "succeed-a": _succeeded("a", 1),
        "fail-a": _failed("a"),
        "dispatch-b": _dispatched("b"),
        "succeed-b": _succeeded("b", 2),
    }
    bounded = cancel_reason({"reason": reason})
    assert 0 < len(bounded) <= MAX_CANCEL_REASON_CHARS
    assert all(c.isprintable() for c in bounded)
    state = _run(*(made[name] for name in before))
    cancel = CancelRequested(run_id=state.run_id, at=_at(2), reason=bounded)
    cancelled = apply(apply(state, cancel), cancel.model_copy(update={"reason": "again"}))
    actions = plan(config, cancelled, _at(now)).actions
    if state.terminal:
        assert actions == []
        return
    assert cancelled.cancellation is not None
    assert cancelled.cancellation.reason == bounded
    assert [type(a).__name__ for a in actions] == ["Finish"]
    assert actions[0] == Finish(
        "Cancelled", output={"steps": _outputs_of(cancelled)}, error=bounded
    )


def _outputs_of(state: RunState) -> dict[str, Any]:
    return {n: s.output for n, s in state.steps.items() if s.status == "Succeeded"}
