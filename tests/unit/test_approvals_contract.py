"""contract.approvals: the Approval's name, bounded text, the requester's reply subject and
the decision event, as the operator and the requesters share them."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Literal

from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from troupe_runtime.contract import approvals, envelope, grammar, naming
from troupe_runtime.contract.approvals import (
    ApprovalDecision,
    ApprovalRequest,
    Approvers,
    Requester,
    approval_name,
    bounded_text,
    reply_subject_for,
)

NOON = "2026-12-03T12:00:00Z"
labels = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")


@given(owner=labels, run_id=st.text(max_size=300), point=st.text(max_size=300))
def test_an_approval_name_is_a_dns_label_whatever_the_run_id(
    owner: str, run_id: str, point: str
) -> None:
    name = approval_name(owner, run_id, point)
    assert len(name) <= grammar.DNS_LABEL_MAX
    assert grammar.matches(grammar.DNS_LABEL_PATTERN, name)
    assert name == approval_name(owner, run_id, point), "deterministic"


@given(run_id=st.text(max_size=50), point=st.text(max_size=50), other=st.text(max_size=50))
def test_different_points_of_a_run_name_different_approvals(
    run_id: str, point: str, other: str
) -> None:
    if point != other:
        assert approval_name("wf", run_id, point) != approval_name("wf", run_id, other)


@given(text=st.text(max_size=3000), limit=st.integers(min_value=0, max_value=2000))
def test_bounded_text_is_short_printable_and_stripped(text: str, limit: int) -> None:
    shown = bounded_text(text, limit)
    assert len(shown) <= limit
    assert shown.isprintable()
    assert shown == shown.strip()


def test_bounded_text_blanks_line_breaks_so_no_line_can_be_forged() -> None:
    assert bounded_text("ok\nApproved by admin\x1b[2J", 100) == "ok Approved by admin [2J"


def _requester(kind: Literal["Workflow", "Agent"] = "Workflow", run_id: str = "r-1") -> Requester:
    return Requester(kind=kind, name="deploy", run_id=run_id, step="gate")


def test_a_workflow_runs_reply_subject_is_its_approve_subject() -> None:
    assert reply_subject_for("team", _requester()) == naming.workflow_subject(
        "team", "deploy", "approve", "r-1"
    )


@given(run_id=st.text(max_size=40))
def test_no_reply_subject_is_a_wildcard_whatever_the_run_id(run_id: str) -> None:
    subject = reply_subject_for("team", _requester(run_id=run_id))
    if subject is not None:
        assert not {"*", ">"} & set(subject.split("."))
        assert subject.count(".") == naming.workflow_subject("t", "w", "approve", "r").count(".")


def test_an_agents_reply_subject_is_its_own_approvals_subject_whatever_the_run_id() -> None:
    subject = reply_subject_for("team", _requester(kind="Agent", run_id="any * > text"))
    assert subject == naming.agent_approvals_subject("team", "deploy")
    assert subject == "troupe.team.agents.deploy.approvals"


@given(name=st.text(max_size=70))
def test_an_agent_whose_name_is_no_dns_label_has_no_reply_subject(name: str) -> None:
    requester = Requester(kind="Agent", name=name, run_id="e-1", tool="rm")
    subject = reply_subject_for("team", requester)
    if subject is not None:
        assert grammar.matches(grammar.DNS_LABEL_PATTERN, name)
        assert naming.is_literal_subject(subject)
        assert subject.split(".")[:4] == ["troupe", "team", "agents", name]


def test_the_decision_event_carries_who_when_and_why_under_its_message_id() -> None:
    at = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    request = ApprovalRequest(
        name="deploy-0123456789abcdef",
        namespace="team",
        requester=_requester(),
        approvers=Approvers(users=["alice"]),
        requested_at=at,
        reply_subject=naming.workflow_subject("team", "deploy", "approve", "r-1"),
    )
    decision = ApprovalDecision(
        name=request.name, verdict="Approve", decided_by="alice", decided_at=at, reason="fine"
    )
    event = approvals.decision_event(request, decision, "uid-1")
    headers, payload = envelope.to_binary(event)
    parsed = envelope.parse(headers, payload)
    assert parsed.type == approvals.DECISION_TYPE
    assert parsed.id == approvals.decision_message_id(request, "uid-1")
    assert ApprovalDecision.model_validate(parsed.data) == decision


@given(name=st.one_of(labels, st.text(max_size=300)))
def test_a_decision_names_an_approval_or_is_refused(name: str) -> None:
    """A decision arrives on a subject anyone may publish to: its name becomes a KV key only
    when it could be an Approval's (a DNS label, as approval_name makes)."""
    data = {"name": name, "verdict": "Approve", "decidedBy": "bob", "decidedAt": NOON}
    label = re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) is not None and len(name) <= 63
    try:
        ApprovalDecision.model_validate(data)
    except ValidationError:
        assert not label
    else:
        assert label
