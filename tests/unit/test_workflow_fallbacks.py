"""Fallback agents of a Workflow step: the pure planner and the run's fold."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from troupe_cli import render
from troupe_cli.views import timeline
from troupe_runtime.contract import naming
from troupe_runtime.contract.approvals import Approvers
from troupe_runtime.contract.engine_config import (
    EngineApproval,
    EngineConfig,
    EngineStep,
    StepAgent,
)
from troupe_runtime.contract.policies import RetryPolicy
from troupe_runtime.contract.run_events import (
    BUDGET_EXCEEDED_REASON,
    Event,
    RunFinished,
    RunStarted,
    StepDispatched,
    StepFailed,
    StepFellBack,
    StepSucceeded,
    decode_event,
    encode_event,
)
from troupe_runtime.contract.run_state import RunState, apply, replay
from troupe_runtime.workflow.planner import (
    MAX_FALLBACK_ERROR_CHARS,
    Dispatch,
    FailStep,
    FallBack,
    Finish,
    plan,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TIMEOUT = timedelta(seconds=10)


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def _step(fallbacks: int, **extra: Any) -> EngineStep:
    """Step ``s``: its own agent ``a0``, then fallbacks ``a1`` … ``a<fallbacks>``."""
    return EngineStep(
        name="s",
        agent="a0",
        subject="in.a0",
        timeout=TIMEOUT,
        fallbacks=[StepAgent(agent=f"a{i}", subject=f"in.a{i}") for i in range(1, fallbacks + 1)],
        **extra,
    )


def _config(*steps: EngineStep) -> EngineConfig:
    return EngineConfig(workflow="wf", namespace="ns", trigger_subject="go", steps=list(steps))


def _run(*events: Event) -> RunState:
    state = replay([RunStarted(run_id="r", at=T0, input={"q": "hi"}), *events])
    assert state is not None
    return state


def _dispatched(attempt: int, agent: str, at: float = 0) -> StepDispatched:
    return StepDispatched(
        run_id="r", at=_at(at), step="s", attempt=attempt, input={"q": "hi"}, agent=agent
    )


def _failed(attempt: int, at: float = 1, reason: str | None = None) -> StepFailed:
    return StepFailed(
        run_id="r", at=_at(at), step="s", attempt=attempt, error="boom", reason=reason
    )


def _fell_back(attempt: int, fallback: int, at: float = 1) -> StepFellBack:
    return StepFellBack(
        run_id="r",
        at=_at(at),
        step="s",
        attempt=attempt,
        fallback=fallback,
        from_agent=f"a{fallback - 1}",
        to_agent=f"a{fallback}",
        error="boom",
    )


def test_a_failed_step_falls_back_to_its_next_agent() -> None:
    config = _config(_step(2))
    state = _run(_dispatched(1, "a0"), _failed(1))
    assert plan(config, state, _at(2)).actions == [FallBack("s", 1, 1, "a0", "a1", "boom")]


def test_after_the_hand_over_the_next_agent_gets_the_same_input_at_once() -> None:
    retry = RetryPolicy(max_attempts=1, backoff=[timedelta(seconds=30)])
    config = _config(_step(2, retry=retry))
    state = _run(_dispatched(1, "a0"), _failed(1), _fell_back(1, 1))
    assert state.steps["s"].fallback == 1
    assert state.steps["s"].status == "Failed"
    assert plan(config, state, _at(1)).actions == [Dispatch("s", 2, {"q": "hi"}, 1)]


def test_each_agent_gets_the_steps_retries_before_the_next_takes_over() -> None:
    retry = RetryPolicy(max_attempts=2, backoff=[timedelta(seconds=5)])
    config = _config(_step(1, retry=retry))
    state = _run(_dispatched(1, "a0"), _failed(1, at=1))
    assert plan(config, state, _at(6)).actions == [Dispatch("s", 2, {"q": "hi"}, 0)]
    state = apply(apply(state, _dispatched(2, "a0", at=6)), _failed(2, at=7))
    assert plan(config, state, _at(7)).actions == [FallBack("s", 2, 1, "a0", "a1", "boom")]
    state = apply(state, _fell_back(2, 1, at=7))
    assert plan(config, state, _at(7)).actions == [Dispatch("s", 3, {"q": "hi"}, 1)]
    state = apply(apply(state, _dispatched(3, "a1", at=7)), _failed(3, at=8))
    early = plan(config, state, _at(9))
    assert early.actions == []
    assert early.wake_at == _at(13)
    assert plan(config, state, _at(13)).actions == [Dispatch("s", 4, {"q": "hi"}, 1)]


def test_a_timed_out_attempt_falls_back_too() -> None:
    config = _config(_step(1))
    state = _run(_dispatched(1, "a0", at=0))
    assert plan(config, state, _at(10)).actions == [FailStep("s", 1, "timed out after 0:00:10")]
    state = apply(state, StepFailed(run_id="r", at=_at(10), step="s", attempt=1, error="late"))
    assert plan(config, state, _at(10)).actions == [FallBack("s", 1, 1, "a0", "a1", "late")]


def test_the_step_fails_only_when_its_last_agent_failed() -> None:
    config = _config(_step(1))
    state = _run(_dispatched(1, "a0"), _failed(1), _fell_back(1, 1), _dispatched(2, "a1"))
    assert plan(config, state, _at(2)).actions == []
    state = apply(state, _failed(2, at=3))
    assert plan(config, state, _at(3)).actions == [Finish("Failed", error="step s failed: boom")]


def test_the_fallbacks_answer_succeeds_the_step_and_records_its_agent() -> None:
    config = _config(_step(1))
    answer = StepSucceeded(run_id="r", at=_at(3), step="s", attempt=2, output="B", agent="a1")
    state = _run(_dispatched(1, "a0"), _failed(1), _fell_back(1, 1), _dispatched(2, "a1"), answer)
    step = state.steps["s"]
    assert (step.status, step.output, step.agent) == ("Succeeded", "B", "a1")
    assert [(f.from_agent, f.to_agent, f.error) for f in step.fell_back] == [("a0", "a1", "boom")]
    assert plan(config, state, _at(3)).actions == [Finish("Succeeded", output="B")]


def test_a_late_answer_from_the_agent_the_step_left_changes_nothing() -> None:
    late = StepSucceeded(run_id="r", at=_at(3), step="s", attempt=1, output="A", agent="a0")
    state = _run(_dispatched(1, "a0"), _failed(1), _fell_back(1, 1), _dispatched(2, "a1"), late)
    assert state.steps["s"].status == "Running"
    assert state.steps["s"].attempt == 2


def test_a_hand_over_logged_twice_counts_once() -> None:
    state = _run(_dispatched(1, "a0"), _failed(1), _fell_back(1, 1), _fell_back(1, 1))
    assert state.steps["s"].fallback == 1
    assert len(state.steps["s"].fell_back) == 1
    assert _fell_back(1, 1).key != _fell_back(2, 2).key


def test_a_budget_refusal_never_falls_back() -> None:
    config = _config(_step(2))
    state = _run(_dispatched(1, "a0"), _failed(1, reason=BUDGET_EXCEEDED_REASON))
    (action,) = plan(config, state, _at(2)).actions
    assert isinstance(action, Finish)
    assert action.status == "BudgetExceeded"


def test_a_step_whose_config_lost_its_fallback_fails_instead_of_dispatching() -> None:
    state = _run(_dispatched(1, "a0"), _failed(1), _fell_back(1, 1))
    shrunk = _config(_step(0))
    assert plan(shrunk, state, _at(2)).actions == [Finish("Failed", error="step s failed: boom")]


def test_a_hand_overs_error_is_cut() -> None:
    config = _config(_step(1))
    failed = StepFailed(run_id="r", at=_at(1), step="s", attempt=1, error="x" * 5000)
    (action,) = plan(config, _run(_dispatched(1, "a0"), failed), _at(2)).actions
    assert isinstance(action, FallBack)
    assert len(action.error) == MAX_FALLBACK_ERROR_CHARS


def test_the_fallback_event_round_trips_through_its_wire_form() -> None:
    event = _fell_back(3, 2)
    assert decode_event(encode_event(event)) == event


def test_a_fallbacks_inbox_honours_the_runs_priority_up_to_its_own_levels() -> None:
    inbox = naming.inbox_subject
    fallback = StepAgent(agent="a1", subject=inbox("ns", "a1", 0), priority_levels=2)
    step = EngineStep(name="s", agent="a0", subject=inbox("ns", "a0", 0), fallbacks=[fallback])
    config = _config(step)
    assert config.step_subject("s", None, 1) == inbox("ns", "a1", 0)
    assert config.step_subject("s", 5, 1) == inbox("ns", "a1", 1)
    assert config.step_subject("s", 5) == inbox("ns", "a0", 0)


def test_a_step_without_fallbacks_keeps_its_json_as_before() -> None:
    assert "fallbacks" not in _step(0).model_dump_json(by_alias=True)
    assert '"fallbacks"' in _step(1).model_dump_json(by_alias=True)


def test_an_agent_named_twice_in_a_steps_chain_is_refused() -> None:
    with pytest.raises(ValidationError, match="appears twice"):
        EngineStep(
            name="s", agent="a0", subject="in", fallbacks=[StepAgent(agent="a0", subject="in")]
        )


def test_an_approval_step_takes_no_fallbacks() -> None:
    with pytest.raises(ValidationError, match="no agent, fallbacks"):
        EngineStep(
            name="s",
            approval=EngineApproval(approvers=Approvers(users=["alice"])),
            fallbacks=[StepAgent(agent="a1", subject="in")],
        )


def _event_for(config: EngineConfig, action: Any, at: datetime) -> Event:
    """What the engine logs for ``action`` (``workflow.engine._act``)."""
    match action:
        case Dispatch(step, attempt, payload, fallback):
            agent = config.step(step).agents[fallback].agent
            return StepDispatched(
                run_id="r", at=at, step=step, attempt=attempt, input=payload, agent=agent
            )
        case FallBack(step, attempt, fallback, from_agent, to_agent, error):
            return StepFellBack(
                run_id="r",
                at=at,
                step=step,
                attempt=attempt,
                fallback=fallback,
                from_agent=from_agent,
                to_agent=to_agent,
                error=error,
            )
        case FailStep(step, attempt, error):
            return StepFailed(run_id="r", at=at, step=step, attempt=attempt, error=error)
        case Finish(status, output, error):
            return RunFinished(run_id="r", at=at, status=status, output=output, error=error)
    raise AssertionError(f"unexpected action {action}")


def _drive(config: EngineConfig, outcomes: list[str]) -> list[Event]:
    """Run the planner against agents that answer with ``outcomes`` in turn (``ok``,
    ``fail`` or ``silent``: the attempt times out), as the engine would; every prefix of
    the log is also replayed as a crashed engine's successor would, and must not plan a
    dispatch the log already holds."""
    events: list[Event] = [RunStarted(run_id="r", at=T0, input={"q": "hi"})]
    state = replay(events)
    assert state is not None
    now = T0
    answers = iter(outcomes)
    for _ in range(200):
        result = plan(config, state, now)
        if not result.actions:
            assert result.wake_at is not None, "a run that is not over must wake"
            now = max(now, result.wake_at)
            continue
        for action in result.actions:
            now += timedelta(seconds=1)
            logged = [_event_for(config, action, now)]
            if isinstance(action, Dispatch):
                answer = next(answers, "fail")
                agent = config.step(action.step).agents[action.fallback].agent
                if answer == "ok":
                    logged.append(
                        StepSucceeded(
                            run_id="r",
                            at=now,
                            step=action.step,
                            attempt=action.attempt,
                            output=agent,
                            agent=agent,
                        )
                    )
                elif answer == "fail":
                    logged.append(
                        StepFailed(
                            run_id="r", at=now, step="s", attempt=action.attempt, error=agent
                        )
                    )
            for event in logged:
                events.append(event)
                state = apply(state, event)
                resumed = replay(events)
                assert resumed == state
                assert resumed is not None
                done = {e.attempt for e in events if isinstance(e, StepDispatched)}
                for again in plan(config, resumed, now).actions:
                    assert not (isinstance(again, Dispatch) and again.attempt in done)
        if state.terminal:
            return events
    raise AssertionError("the run never ended")


_OUTCOMES = st.lists(st.sampled_from(["ok", "fail", "silent"]), max_size=30)


@given(fallbacks=st.integers(0, 8), outcomes=_OUTCOMES)
@settings(max_examples=150, deadline=None)
def test_fallbacks_are_tried_once_each_in_order_and_the_step_fails_iff_all_did(
    fallbacks: int, outcomes: list[str]
) -> None:
    config = _config(_step(fallbacks))
    events = _drive(config, outcomes)
    chain = [f"a{i}" for i in range(fallbacks + 1)]
    tried = [e.agent for e in events if isinstance(e, StepDispatched)]
    first_ok = next((i for i, o in enumerate(outcomes[: len(chain)]) if o == "ok"), None)
    assert tried == chain[: len(chain) if first_ok is None else first_ok + 1]
    attempts = [e.attempt for e in events if isinstance(e, StepDispatched)]
    assert attempts == list(range(1, len(tried) + 1))  # a new dispatch id each time
    handovers = [(e.from_agent, e.to_agent) for e in events if isinstance(e, StepFellBack)]
    assert handovers == list(itertools.pairwise(tried))
    end = events[-1]
    assert isinstance(end, RunFinished)
    if first_ok is None:
        assert end.status == "Failed"
    else:
        assert (end.status, end.output) == ("Succeeded", chain[first_ok])


@given(fallbacks=st.integers(0, 3), attempts=st.integers(1, 3), outcomes=_OUTCOMES)
@settings(max_examples=100, deadline=None)
def test_with_retries_each_agent_gets_at_most_the_steps_attempts_in_chain_order(
    fallbacks: int, attempts: int, outcomes: list[str]
) -> None:
    retry = RetryPolicy(max_attempts=attempts, backoff=[timedelta(seconds=2)])
    config = _config(_step(fallbacks, retry=retry))
    events = _drive(config, outcomes)
    tried = [e.agent for e in events if isinstance(e, StepDispatched)]
    order = [int(agent[1:]) for agent in tried if agent is not None]
    assert order == sorted(order)
    assert all(order.count(i) <= attempts for i in range(fallbacks + 1))
    end = events[-1]
    assert isinstance(end, RunFinished)
    assert (end.status == "Succeeded") == any(isinstance(e, StepSucceeded) for e in events)


def _fallen_back_run() -> list[Event]:
    return [
        RunStarted(run_id="r", at=T0, input={"q": "hi"}),
        _dispatched(1, "a0", at=0),
        _failed(1, at=1),
        _fell_back(1, 1, at=1),
        _dispatched(2, "a1", at=1),
        StepSucceeded(run_id="r", at=_at(2), step="s", attempt=2, output="B", agent="a1"),
        RunFinished(run_id="r", at=_at(2), status="Succeeded", output="B"),
    ]


def test_the_cli_timeline_names_each_attempts_agent_and_marks_the_hand_over() -> None:
    attempts = timeline(_fallen_back_run())
    assert [(a.attempt, a.agent, a.status) for a in attempts] == [
        (1, "a0", "FellBack"),
        (2, "a1", "Succeeded"),
    ]


def test_the_run_text_and_json_show_which_agent_answered() -> None:
    events = _fallen_back_run()
    state = replay(events)
    assert state is not None
    attempts = timeline(events)
    lines = render.run_text(state, attempts).splitlines()
    header = next(line for line in lines if line.startswith("STEP"))
    assert header.split()[:4] == ["STEP", "ATTEMPT", "AGENT", "STATUS"]
    assert any(line.split()[:4] == ["s", "2", "a1", "Succeeded"] for line in lines)
    assert any(line.split()[:4] == ["s", "1", "a0", "FellBack"] for line in lines)
    document = render.run_json(state, attempts)
    assert [(s["agent"], s["status"]) for s in document["steps"]] == [
        ("a0", "FellBack"),
        ("a1", "Succeeded"),
    ]
