"""Approval steps in the workflow engine's pure core: the planner files a request and
waits, a decision (a person's or the timeout's) resolves the step once, the run shows
WaitingForApproval, and the message is a template over the run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from troupe_runtime.contract import approvals
from troupe_runtime.contract.approvals import ApprovalDecision, Approvers
from troupe_runtime.contract.engine_config import EngineApproval, EngineConfig, EngineStep
from troupe_runtime.contract.expressions import (
    MAX_PLACEHOLDERS,
    Placeholder,
    TemplateError,
    split_template,
    template_problem,
)
from troupe_runtime.contract.run_events import (
    ApprovalDecided,
    ApprovalRequested,
    CancelRequested,
    Event,
    RunFinished,
    RunStarted,
    StepDispatched,
    StepSucceeded,
    decode_event,
    encode_event,
)
from troupe_runtime.contract.run_state import RunState, apply, pending_approvals, replay
from troupe_runtime.workflow.approvals import (
    decided_event,
    decision_problem,
    request_for,
    withdrawn,
)
from troupe_runtime.workflow.mapping import render_template
from troupe_runtime.workflow.planner import (
    Dispatch,
    ExpireApproval,
    Finish,
    RequestApproval,
    plan,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NAME = approvals.approval_name("wf", "r", "gate")


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def _agent(name: str, *deps: str, **extra: Any) -> EngineStep:
    return EngineStep(name=name, agent=name, subject=f"in.{name}", depends_on=list(deps), **extra)


def _gate(*deps: str, message: str = "", on_timeout: str = "reject", **extra: Any) -> EngineStep:
    return EngineStep(
        name="gate",
        depends_on=list(deps),
        approval=EngineApproval(
            approvers=Approvers(users=["alice"]),
            message=message,
            timeout=timedelta(seconds=60),
            on_timeout=on_timeout,  # type: ignore[arg-type]
        ),
        **extra,
    )


def _config(*steps: EngineStep, **extra: Any) -> EngineConfig:
    return EngineConfig(
        workflow="wf", namespace="ns", trigger_subject="go", steps=list(steps), **extra
    )


def _run(*events: Event) -> RunState:
    state = replay([RunStarted(run_id="r", at=T0, input={"v": "1.2"}), *events])
    assert state is not None
    return state


def _requested(at: float = 1, expires: float = 61, name: str = NAME) -> ApprovalRequested:
    return ApprovalRequested(
        run_id="r", at=_at(at), step="gate", name=name, message="ok?", expires_at=_at(expires)
    )


def _decided(
    approved: bool = True, by: str = "alice", reason: str = "fine", name: str = NAME, at: float = 5
) -> ApprovalDecided:
    return ApprovalDecided(
        run_id="r",
        at=_at(at),
        step="gate",
        name=name,
        phase="Approved" if approved else "Denied",
        approved=approved,
        decided_by=by,
        decided_at=_at(at),
        reason=reason,
    )


def _built(a: Any = "built") -> list[Event]:
    return [
        StepDispatched(run_id="r", at=T0, step="build", attempt=1),
        StepSucceeded(run_id="r", at=_at(1), step="build", attempt=1, output=a),
    ]


def test_an_approval_step_whose_dependencies_are_done_requests_approval() -> None:
    config = _config(
        _agent("build"), _gate("build", message="ship {trigger.v} ({steps.build.output})?")
    )
    actions = plan(config, _run(*_built()), _at(1)).actions
    assert actions == [RequestApproval("gate", NAME, "ship 1.2 (built)?", _at(61))]


def test_the_request_expires_at_the_run_deadline_when_that_comes_first() -> None:
    config = _config(_gate(), deadline=timedelta(seconds=30))
    [action] = plan(config, _run(), _at(10)).actions
    assert isinstance(action, RequestApproval)
    assert action.expires_at == _at(30)


def test_a_waiting_step_makes_the_run_wait_for_approval_and_wakes_at_its_expiry() -> None:
    config = _config(_gate())
    state = _run(_requested())
    assert state.status == "WaitingForApproval"
    assert state.steps["gate"].status == "WaitingForApproval"
    result = plan(config, state, _at(30))
    assert result.actions == []
    assert result.wake_at == _at(61)


def test_the_run_is_running_while_another_step_runs_beside_the_wait() -> None:
    state = _run(_requested(), StepDispatched(run_id="r", at=_at(1), step="other", attempt=1))
    assert state.status == "Running"
    state = apply(state, StepSucceeded(run_id="r", at=_at(2), step="other", attempt=1))
    assert state.status == "WaitingForApproval"


def test_step_timeouts_do_not_apply_to_the_wait() -> None:
    gate = _gate().model_copy(update={"timeout": timedelta(seconds=1)})
    assert plan(_config(gate), _run(_requested()), _at(50)).actions == []


def test_an_approval_succeeds_the_step_with_who_decided_for_the_next_step() -> None:
    config = _config(_gate(), _agent("deploy", "gate", input={"by": "steps.gate.output.decidedBy"}))
    state = _run(_requested(), _decided())
    assert state.status == "Running"
    assert state.steps["gate"].output == {"approved": True, "decidedBy": "alice", "reason": "fine"}
    assert state.steps["gate"].approval is not None
    assert state.steps["gate"].approval.phase == "Approved"
    assert plan(config, state, _at(5)).actions == [Dispatch("deploy", 1, {"by": "alice"})]


def test_a_denial_fails_the_run_naming_who_denied_and_why() -> None:
    config = _config(_gate(), _agent("deploy", "gate"))
    state = _run(_requested(), _decided(approved=False, by="bob", reason="not today"))
    assert plan(config, state, _at(5)).actions == [
        Finish("Failed", error=f"step gate failed: approval {NAME} denied by bob: not today")
    ]


def test_a_denial_of_a_continue_step_lets_the_run_go_on() -> None:
    config = _config(_gate(on_failure="continue"), _agent("deploy", "gate"))
    state = _run(_requested(), _decided(approved=False))
    assert plan(config, state, _at(5)).actions == [Dispatch("deploy", 1, None)]


@pytest.mark.parametrize(("on_timeout", "approved"), [("reject", False), ("approve", True)])
def test_the_timeout_resolves_the_wait_per_on_timeout(on_timeout: str, approved: bool) -> None:
    config = _config(_gate(on_timeout=on_timeout))
    state = _run(_requested())
    assert plan(config, state, _at(60.9)).actions == []
    assert plan(config, state, _at(61)).actions == [
        ExpireApproval("gate", approved, "no decision within 1m")
    ]


def test_a_timeout_with_reject_fails_the_run_naming_the_timeout() -> None:
    timed_out = _decided(approved=False, by=approvals.TIMEOUT_DECIDER, reason="no decision")
    timed_out = timed_out.model_copy(update={"phase": "TimedOut"})
    [finish] = plan(_config(_gate()), _run(_requested(), timed_out), _at(61)).actions
    assert isinstance(finish, Finish)
    assert finish.status == "Failed"
    assert (
        finish.error
        == f"step gate failed: approval {NAME} timed out: no decision (onTimeout: reject)"
    )


def test_the_run_deadline_fails_a_waiting_run() -> None:
    config = _config(_gate(), deadline=timedelta(seconds=30))
    assert plan(config, _run(_requested(expires=30)), _at(30)).actions == [
        Finish("Failed", error="deadline of 0:00:30 exceeded")
    ]


def test_a_decision_applies_once_and_one_for_another_request_or_after_the_end_not_at_all() -> None:
    state = _run(_requested(), _decided(reason="first"), _decided(approved=False, reason="second"))
    assert state.steps["gate"].status == "Succeeded"
    assert state.steps["gate"].output["reason"] == "first"
    assert state.succeeded_order == ["gate"]
    other = _run(_requested(), _decided(name="wf-0000000000000000"))
    assert other.steps["gate"].status == "WaitingForApproval"
    ended = _run(_requested(), RunFinished(run_id="r", at=_at(2), status="Cancelled"), _decided())
    assert ended.steps["gate"].status == "WaitingForApproval"
    assert ended.status == "Cancelled"


def test_a_second_request_for_the_same_step_changes_nothing() -> None:
    state = _run(_requested(), _requested(at=9, expires=99))
    assert state.steps["gate"].approval is not None
    assert state.steps["gate"].approval.expires_at == _at(61)


def test_approval_events_round_trip_through_their_wire_form() -> None:
    for event in (_requested(), _decided()):
        assert decode_event(encode_event(event)) == event
    assert _requested().key != _decided().key


def test_the_request_in_the_bucket_follows_the_log() -> None:
    config = _config(_gate())
    pending = request_for(config, _run(_requested()), "gate")
    assert pending is not None
    assert pending.phase == "Pending"
    assert pending.pending
    assert pending.reply_subject == "troupe.ns.workflows.wf.approve.r"
    assert pending.requester.step == "gate"
    assert pending.requester.run_id == "r"
    assert pending.approvers.users == ["alice"]
    decided = request_for(config, _run(_requested(), _decided(approved=False, by="bob")), "gate")
    assert decided is not None
    assert (decided.phase, decided.approved, decided.decided_by) == ("Denied", False, "bob")
    gone = withdrawn(pending, _at(9))
    assert (gone.phase, gone.decided_by) == ("Withdrawn", approvals.WITHDRAWN_DECIDER)
    assert request_for(config, _run(), "gate") is None


def _decision(
    name: str = NAME, by: str = "alice", verdict: approvals.Verdict = "Approve"
) -> ApprovalDecision:
    return ApprovalDecision(
        name=name,
        verdict=verdict,
        decided_by=by,
        decided_at=_at(3),
        reason="ok\nforged line",
    )


def test_a_decision_counts_only_for_the_waiting_request_of_a_run_going_on() -> None:
    waiting = _run(_requested())
    assert decision_problem(waiting, _decision()) is None
    assert "no step" in (decision_problem(waiting, _decision(name="other")) or "")
    assert "reserved" in (decision_problem(waiting, _decision(by="troupe:timeout")) or "")
    assert decision_problem(None, _decision()) is not None
    assert decision_problem(_run(_requested(), _decided()), _decision()) is not None
    cancelled = apply(waiting, CancelRequested(run_id="r", at=_at(2)))
    assert decision_problem(cancelled, _decision()) is not None


def test_a_decision_is_logged_with_its_text_blanked_of_control_characters() -> None:
    event = decided_event(_run(_requested()), "gate", _decision(verdict="Deny"), _at(4))
    assert (event.phase, event.approved, event.decided_at) == ("Denied", False, _at(3))
    assert event.reason == "ok forged line"


def test_an_engine_step_is_an_agent_or_an_approval() -> None:
    with pytest.raises(ValidationError):
        EngineStep(name="x")
    with pytest.raises(ValidationError):
        EngineStep(
            name="x", agent="a", subject="in.a", approval=EngineApproval(approvers=Approvers())
        )
    assert _config(_gate()).has_approvals
    assert not _config(_agent("a")).has_approvals


def test_a_template_splits_into_text_and_placeholders() -> None:
    parts = split_template("ship {trigger.v} {{as is}} to {steps.a.output | {n: name}}")
    assert parts == ["ship ", "trigger.v", " {as is} to ", "steps.a.output | {n: name}"]
    assert isinstance(parts[1], Placeholder)
    assert not isinstance(parts[2], Placeholder)
    assert split_template("{'}'}") == ["'}'"]


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("a { b", "never closed"),
        ("a } b", "lone"),
        ("a {  } b", "empty"),
        ("{ ]] }", "not a valid JMESPath"),
        ("{a}" * (MAX_PLACEHOLDERS + 1), "more than"),
    ],
)
def test_a_template_that_cannot_render_is_named(template: str, problem: str) -> None:
    assert problem in (template_problem(template) or "")


def test_a_template_renders_strings_json_and_nothing_for_null() -> None:
    rendered = render_template(
        "v={trigger.v} out={steps.a.output} x={trigger.missing} n={length(trigger.v)}",
        {"v": "1.2"},
        {"a": {"n": 1}},
    )
    assert rendered == 'v=1.2 out={"n":1} x= n=3'
    assert render_template("{length(trigger)}", 5, {}).startswith("<error:")


@given(st.text(max_size=200))
@settings(max_examples=300)
def test_any_template_either_parses_or_is_named_and_always_renders(template: str) -> None:
    try:
        split_template(template)
    except TemplateError:
        assert template_problem(template) is not None
    assert isinstance(render_template(template, {"a": 1}, {"s": [1]}), str)


_STEPS = st.sampled_from(["gate", "other"])
_NAMES = st.sampled_from([NAME, "wf-0000000000000000"])
_TIMES = st.floats(0, 100)


def _events() -> st.SearchStrategy[Event]:
    requested = st.builds(
        lambda step, name, at: ApprovalRequested(
            run_id="r", at=_at(at), step=step, name=name, expires_at=_at(at + 60)
        ),
        _STEPS,
        _NAMES,
        _TIMES,
    )
    decided = st.builds(
        lambda step, name, approved, by, at: ApprovalDecided(
            run_id="r",
            at=_at(at),
            step=step,
            name=name,
            phase="Approved" if approved else "Denied",
            approved=approved,
            decided_by=by,
            decided_at=_at(at),
        ),
        _STEPS,
        _NAMES,
        st.booleans(),
        st.sampled_from(["alice", "bob"]),
        _TIMES,
    )
    others = st.one_of(
        st.builds(
            lambda at: StepDispatched(run_id="r", at=_at(at), step="work", attempt=1), _TIMES
        ),
        st.builds(lambda at: StepSucceeded(run_id="r", at=_at(at), step="work", attempt=1), _TIMES),
        st.builds(lambda at: CancelRequested(run_id="r", at=_at(at)), _TIMES),
        st.builds(lambda at: RunFinished(run_id="r", at=_at(at), status="Cancelled"), _TIMES),
    )
    return st.one_of(requested, decided, others)


@given(st.lists(_events(), max_size=25))
@settings(max_examples=400, deadline=None)
def test_any_sequence_of_events_folds_to_a_consistent_state(events: list[Event]) -> None:
    state = _run()
    first: dict[str, ApprovalDecided] = {}
    for event in events:
        before = state
        state = apply(state, event)
        if before.terminal:
            assert state == before  # nothing changes after the end
        if isinstance(event, ApprovalDecided):
            step = before.steps.get(event.step)
            counts = (
                not before.terminal
                and step is not None
                and step.status == "WaitingForApproval"
                and step.approval is not None
                and step.approval.name == event.name
            )
            if counts:
                first.setdefault(event.step, event)
            else:  # for another request, a step not waiting, or after the end
                assert state.steps == before.steps
        statuses = {s.status for s in state.steps.values()}
        if not state.terminal:
            waiting = "WaitingForApproval" in statuses and "Running" not in statuses
            assert state.status == ("WaitingForApproval" if waiting else "Running")
            assert set(pending_approvals(state)) == {
                n for n, s in state.steps.items() if s.status == "WaitingForApproval"
            }
    for name, decision in first.items():  # the first decision that counted is the one kept
        approval = state.steps[name].approval
        assert approval is not None
        assert (approval.decided_by, approval.approved) == (decision.decided_by, decision.approved)
        assert state.succeeded_order.count(name) == (1 if decision.approved else 0)


@given(
    name=st.sampled_from([NAME, "wf-0000000000000000", ""]),
    by=st.text(max_size=20),
    verdict=st.sampled_from(["Approve", "Deny"]),
)
@settings(max_examples=300)
def test_a_decision_counts_exactly_when_it_names_the_waiting_request_and_a_person(
    name: str, by: str, verdict: approvals.Verdict
) -> None:
    decider = approvals.bounded_text(by, 256)
    try:
        decision = _decision(name=name, by=by, verdict=verdict)
    except ValidationError:
        # decidedBy may not be empty, and a name that is no DNS label is no decision at all
        # (it cannot count either way)
        assert not by or name == ""
        return
    counts = name == NAME and bool(decider) and not decider.startswith("troupe:")
    assert (decision_problem(_run(_requested()), decision) is None) == counts
    if counts:
        event = decided_event(_run(_requested()), "gate", decision, _at(4))
        assert apply(_run(_requested()), event).steps["gate"].status in ("Succeeded", "Failed")
