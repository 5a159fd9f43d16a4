"""An LLM agent's tool-call approvals, the pure parts: the journal's parked and decided
records, and what a decision makes of a request (``agent/llm/approvals.py``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from a2a.types.a2a_pb2 import TaskState as A2ATaskState
from hypothesis import given
from hypothesis import strategies as st
from troupe_gateway import a2a_tasks
from troupe_gateway.calls import agent_view

from troupe_runtime.agent.llm.approvals import (
    TIMEOUT_REASON,
    foreign,
    journaled,
    records,
    resolve,
    timeout_event,
)
from troupe_runtime.agent.llm.journal import (
    DECIDED,
    PARKED,
    Decision,
    Parked,
    Record,
    decided_record,
    parked_record,
    resume,
)
from troupe_runtime.agent.llm.loop import refusal
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.agent_resources import build_agent_resources
from troupe_runtime.contract.approvals import (
    DECISION_TYPE,
    REQUEST_TYPE,
    TIMEOUT_DECIDER,
    ApprovalDecision,
    ApprovalRequest,
    Approvers,
    Requester,
)
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.gateway import TaskRecord

AT = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
PARKED_CALL = Parked(0, "e1", "ops-0123456789abcdef", "erase", {"ce-id": "x"}, b"\x00data")


def request(**fields: Any) -> ApprovalRequest:
    base: dict[str, Any] = {
        "name": "ops-0123456789abcdef",
        "namespace": "team",
        "requester": Requester(kind="Agent", name="ops", run_id="task-1", tool="erase"),
        "approvers": Approvers(users=["alice"]),
        "requested_at": AT,
        "expires_at": AT + timedelta(hours=1),
        "reply_subject": "troupe.team.agents.ops.approvals",
    }
    return ApprovalRequest.model_validate({**base, **fields})


def decision(**fields: Any) -> ApprovalDecision:
    base: dict[str, Any] = {
        "name": "ops-0123456789abcdef",
        "verdict": "Approve",
        "decided_by": "alice",
        "decided_at": AT + timedelta(minutes=5),
        "reason": "fine",
    }
    return ApprovalDecision.model_validate({**base, **fields})


def test_a_parked_call_folds_back_with_its_message_and_the_first_decision_counts() -> None:
    approve = Decision(PARKED_CALL.approval, True, "Approved", "alice", AT.isoformat(), "ok")
    deny = Decision(PARKED_CALL.approval, False, "Denied", "bob", AT.isoformat(), "no")
    state = resume(
        [
            Record("parked-0-e1", PARKED, parked_record(0, "e1", PARKED_CALL)),
            Record("decided-0-e1", DECIDED, decided_record(0, "e1", approve)),
            Record("decided-0-e1-again", DECIDED, decided_record(0, "e1", deny)),
        ]
    )
    assert state.parked == {"0-e1": PARKED_CALL}
    assert state.parked_as(PARKED_CALL.approval) == PARKED_CALL
    assert state.parked_as("other") is None
    assert state.decisions == {"0-e1": approve}


def test_a_parked_record_whose_message_does_not_decode_is_skipped() -> None:
    data = {**parked_record(0, "e1", PARKED_CALL), "payload": "not base64!"}
    assert resume([Record("parked-0-e1", PARKED, data)]).parked == {}
    data = {**parked_record(0, "e1", PARKED_CALL), "turn": "0"}
    assert resume([Record("parked-0-e1", PARKED, data)]).parked == {}


def test_a_persons_decision_makes_the_request_final_with_who_when_and_why() -> None:
    final = resolve(request(), decision(verdict="Deny", reason="too\nrisky"), AT)
    assert isinstance(final, ApprovalRequest)
    assert (final.phase, final.approved, final.decided_by) == ("Denied", False, "alice")
    assert final.decided_at == AT + timedelta(minutes=5)
    assert final.reason == "too risky"  # no forged line
    assert records(final, decision(verdict="Deny", reason="too\nrisky"))
    assert not records(final, decision(verdict="Approve"))
    assert refusal("erase", journaled(final)) == (
        "error: alice denied this call of 'erase', so it did not run: too risky."
    )


def test_a_decision_on_a_request_no_longer_pending_changes_nothing() -> None:
    decided = request(phase="Approved", approved=True, decided_by="alice", decided_at=AT)
    assert resolve(decided, decision(verdict="Deny", decided_by="bob"), AT) == (
        "the request is Approved already"
    )


def test_a_timeout_is_believed_only_once_the_request_expired() -> None:
    timeout = decision(decided_by=TIMEOUT_DECIDER, verdict="Approve")
    assert isinstance(resolve(request(), timeout, AT), str)
    final = resolve(request(on_timeout="reject"), timeout, AT + timedelta(hours=2))
    assert isinstance(final, ApprovalRequest)
    assert (final.phase, final.approved, final.reason) == ("TimedOut", False, TIMEOUT_REASON)
    assert final.decided_at == AT + timedelta(hours=1)  # the expiry, whoever noticed it
    approved = resolve(request(on_timeout="approve"), timeout, AT + timedelta(hours=2))
    assert isinstance(approved, ApprovalRequest)
    assert approved.approved
    assert "within its approval timeout" in refusal("erase", journaled(final))


def test_the_timeout_event_is_the_decision_a_replica_publishes_once_per_request() -> None:
    event = timeout_event(request(on_timeout="approve"), "ops")
    assert event.type == DECISION_TYPE
    assert event.id == "approval-timeout:ops-0123456789abcdef"
    sent = ApprovalDecision.model_validate(event.data)
    assert (sent.decided_by, sent.verdict, sent.decided_at) == (
        TIMEOUT_DECIDER,
        "Approve",
        AT + timedelta(hours=1),
    )


def test_troupes_own_deciders_cannot_be_claimed_by_a_decision() -> None:
    claimed = decision(decided_by="troupe:withdrawn")
    assert resolve(request(), claimed, AT) == "decidedBy 'troupe:withdrawn' is reserved to Troupe"


def test_a_request_of_another_requester_or_under_another_key_is_foreign() -> None:
    assert foreign(request(), "ops-0123456789abcdef", "team", "ops") is None
    assert foreign(request(), "other-key", "team", "ops") is not None
    assert foreign(request(), "ops-0123456789abcdef", "other", "ops") is not None
    assert foreign(request(), "ops-0123456789abcdef", "team", "dev") is not None
    workflow = request(requester=Requester(kind="Workflow", name="ops", run_id="r", step="s"))
    assert foreign(workflow, "ops-0123456789abcdef", "team", "ops") is not None


@given(
    verdict=st.sampled_from(["Approve", "Deny"]),
    decided_by=st.text(min_size=1, max_size=256),
    reason=st.text(max_size=1024),
    name=st.sampled_from(["ops-0123456789abcdef", "ops-fedcba9876543210"]),
    now=st.datetimes(timezones=st.just(UTC)),
    phase=st.sampled_from(["Pending", "Approved", "Denied", "TimedOut", "Withdrawn"]),
)
def test_a_decision_is_final_and_printable_or_changes_nothing(
    verdict: str, decided_by: str, reason: str, name: str, now: datetime, phase: str
) -> None:
    made = decision(verdict=verdict, decided_by=decided_by, reason=reason, name=name)
    stored = request(phase=phase)
    final = resolve(stored, made, now)
    if isinstance(final, str):
        return
    assert stored.pending
    assert name == stored.name
    assert not final.pending
    assert final.approved is (
        stored.on_timeout == "approve" if final.phase == "TimedOut" else verdict == "Approve"
    )
    assert (final.decided_by or "").isprintable()
    assert (final.reason or "").isprintable()
    assert records(final, made)
    assert resolve(final, made, now) == f"the request is {final.phase} already"  # twice is once


def test_an_llm_agents_inbox_stores_its_approvals_subject_and_priority_0_reads_it() -> None:
    llm = {
        "policy": {"model": {"provider": "p", "model": "m"}},
        "providers": [{"name": "p", "spec": {"baseUrl": "http://p/v1", "models": [{"name": "m"}]}}],
    }
    base = {"agent": "ops", "namespace": "team", "messaging": {"priorityLevels": 2}}
    plain = build_agent_resources(RuntimeConfig.model_validate(base))
    smart = build_agent_resources(
        RuntimeConfig.model_validate({**base, "handler": {"type": "llm"}, "llm": llm})
    )
    subject = "troupe.team.agents.ops.approvals"
    assert subject not in (plain.inbox.subjects or [])
    assert subject in (smart.inbox.subjects or [])
    first, second = smart.consumers
    assert first.filter_subjects == ["troupe.team.agents.ops.in.p0", subject]
    assert first.filter_subject is None
    assert second.filter_subject == "troupe.team.agents.ops.in.p1"
    assert [c.filter_subject for c in plain.consumers] == [
        "troupe.team.agents.ops.in.p0",
        "troupe.team.agents.ops.in.p1",
    ]


AGENT_TASK = TaskRecord(task_id="t1", kind="Agent", name="ops", context_id="c1", created_at=AT)


def waiting(data: Any) -> CloudEvent:
    return CloudEvent(
        id="t1-waiting", source="/team/ops", type=REQUEST_TYPE, causationid="t1", data=data
    )


def test_an_agents_call_waiting_for_approval_is_an_input_required_task() -> None:
    data = {"approval": "ops-0123456789abcdef", "tool": "erase", "message": "erase /?"}
    view = agent_view(AGENT_TASK, waiting(data))
    assert (view.state, view.approvals) == ("input-required", ("ops-0123456789abcdef",))
    assert not view.terminal
    status = a2a_tasks.status(view)
    assert status.state == A2ATaskState.TASK_STATE_INPUT_REQUIRED
    assert status.message.parts[0].text == "approval ops-0123456789abcdef (tool erase): erase /?"
    assert list(status.message.metadata["approvals"]) == ["ops-0123456789abcdef"]


@given(data=st.one_of(st.none(), st.text(), st.dictionaries(st.text(), st.text() | st.integers())))
def test_whatever_the_waiting_event_holds_the_task_waits_with_printable_text(data: Any) -> None:
    view = agent_view(AGENT_TASK, waiting(data))
    assert view.state == "input-required"
    assert (view.prompt or "").isprintable()
    assert all(name.isprintable() and len(name) <= 63 for name in view.approvals)
