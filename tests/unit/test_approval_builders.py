"""builders.approvals: what the operator makes of a request from the untrusted bucket, what
it relays and the status it shows; pure, so every case is a function call."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from troupe_operator.api.approval import ApprovalStatus
from troupe_operator.builders import approvals as builders
from troupe_runtime.contract import approvals, naming
from troupe_runtime.contract.approvals import ApprovalRequest, Approvers, Requester

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
OWNER = {"metadata": {"name": "deploy", "uid": "uid-wf"}}


def _request(**changes: Any) -> ApprovalRequest:
    base = ApprovalRequest(
        name=approvals.approval_name("deploy", "r-1", "gate"),
        namespace="team",
        requester=Requester(kind="Workflow", name="deploy", run_id="r-1", step="gate"),
        approvers=Approvers(users=["bob"]),
        message="ship?",
        requested_at=NOW,
        expires_at=NOW + timedelta(hours=1),
        reply_subject=naming.workflow_subject("team", "deploy", "approve", "r-1"),
    )
    return base.model_copy(update=changes)


def _body(
    request: ApprovalRequest, decision: bool = False, relayed: bool = False
) -> dict[str, Any]:
    body = builders.approval_manifest(request, OWNER)
    body["metadata"] |= {"uid": "uid-apr", "generation": 2 if decision else 1}
    if decision:
        body["spec"]["decision"] = {"verdict": "Approve", "decidedBy": "bob", "reason": "ok"}
    if relayed:
        body["status"] = {"relayedAt": "2026-12-03T12:00:00Z"}
    return body


def _plan(
    request: ApprovalRequest, body: dict[str, Any] | None, owner: bool = True
) -> builders.Plan:
    return builders.plan("team", request.name, request, body, owner)


def test_a_pending_request_whose_owner_exists_gets_its_approval() -> None:
    assert _plan(_request(), None).actions == ("create", "status")


def test_no_approval_is_made_without_its_owner_or_once_resolved() -> None:
    assert _plan(_request(), None, owner=False).actions == ()
    assert _plan(_request(phase="Approved"), None).actions == ()


def test_a_request_claiming_another_namespace_or_key_is_left_alone() -> None:
    assert _plan(_request(namespace="other"), None).actions == ()
    assert builders.plan("team", "another-key", _request(), None, True).actions == ()


def test_a_decision_is_relayed_once_while_the_request_is_pending() -> None:
    request = _request()
    assert _plan(request, _body(request, decision=True)).actions == ("relay", "status")
    assert _plan(request, _body(request, decision=True, relayed=True)).actions == ("status",)
    resolved = request.model_copy(update={"phase": "TimedOut"})
    assert _plan(resolved, _body(request, decision=True)).actions == ("status",)


def test_a_forged_reply_subject_is_made_visible_but_never_relayed_to() -> None:
    forged = _request(reply_subject=naming.workflow_subject("team", "payroll", "approve", "r-1"))
    made = _plan(forged, None)
    assert made.actions == ("create", "status")
    assert made.refused is not None
    assert "payroll" in made.refused
    decided = _plan(forged, _body(forged, decision=True))
    assert decided.actions == ("status",)


def test_an_approval_not_made_from_the_request_relays_nothing() -> None:
    request = _request()
    impostor = _body(request, decision=True)
    impostor["spec"]["approvers"] = {"users": ["mallory"]}
    planned = _plan(request, impostor)
    assert planned.actions == ("status",)
    assert planned.refused is not None


def test_the_manifest_is_owned_by_the_requester_without_finalizers_and_bounded() -> None:
    request = _request(message="line one\nApproved\x1b[2J " + "x" * 5000)
    manifest = builders.approval_manifest(request, OWNER)
    assert manifest["metadata"]["name"] == request.name
    assert manifest["metadata"]["ownerReferences"][0]["uid"] == "uid-wf"
    assert "finalizers" not in manifest["metadata"]
    message = manifest["spec"]["message"]
    assert len(message) <= approvals.MAX_MESSAGE_CHARS
    assert message.isprintable()


requests = st.builds(
    _request,
    phase=st.sampled_from(["Pending", "Approved", "Denied", "TimedOut", "Withdrawn"]),
    reply_subject=st.one_of(
        st.just(naming.workflow_subject("team", "deploy", "approve", "r-1")),
        st.text(min_size=1, max_size=60),
    ),
    message=st.text(max_size=200),
    approvers=st.builds(Approvers, users=st.lists(st.text(min_size=1, max_size=20), max_size=3)),
)


@given(request=requests, decision=st.booleans(), relayed=st.booleans(), exists=st.booleans())
def test_a_decision_is_relayed_only_to_the_requesters_own_subject_and_only_once(
    request: ApprovalRequest, decision: bool, relayed: bool, exists: bool
) -> None:
    body = _body(request, decision, relayed) if exists else None
    planned = _plan(request, body)
    if "relay" in planned.actions:
        assert request.reply_subject == approvals.reply_subject_for("team", request.requester)
        assert request.pending
        assert decision
        assert not relayed
    if "create" in planned.actions:
        assert body is None
        assert request.pending


@given(
    request=st.one_of(st.none(), requests),
    problem=st.one_of(st.none(), st.text(max_size=100)),
    decided=st.booleans(),
    relayed=st.booleans(),
)
def test_the_status_settles_an_idle_pass_writes_nothing_and_one_condition_holds(
    request: ApprovalRequest | None, problem: str | None, decided: bool, relayed: bool
) -> None:
    given_decision = None
    if decided:
        given_decision = builders.decision_of(_body(_request(), decision=True))
    relayed_at = "2026-12-03T12:00:00Z" if relayed else None
    first = builders.approval_status(
        ApprovalStatus(), request, problem, given_decision, relayed_at, None, 2, NOW
    )
    later = builders.approval_status(
        first, request, problem, given_decision, relayed_at, None, 2, NOW + timedelta(minutes=5)
    )
    assert later == first
    holding = [c.type for c in first.conditions if c.status == "True"]
    assert len(holding) == 1
    assert (first.phase != "Pending") == (holding == ["Ready"])
    for found in first.conditions:
        assert found.message.isprintable()
        assert len(found.message) <= builders.MESSAGE_CHARS


def test_a_resolved_approval_whose_request_aged_out_stays_resolved() -> None:
    resolved = builders.approval_status(
        ApprovalStatus(),
        _request(phase="Approved", decided_by="bob"),
        None,
        None,
        None,
        None,
        1,
        NOW,
    )
    gone = builders.approval_status(resolved, None, "not in the bucket", None, None, None, 1, NOW)
    assert gone == resolved
    assert gone.phase == "Approved"
