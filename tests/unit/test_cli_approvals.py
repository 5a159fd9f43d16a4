"""troupe approvals, approve and deny without a cluster: what is listed as waiting, what
can no longer be decided, and the table whatever text an Approval holds."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from troupe_cli import approvals
from troupe_cli.main import build_parser


def _item(name: str, phase: str | None = None, decided: bool = False, message: str = "") -> Any:
    spec: dict[str, Any] = {
        "requester": {"kind": "Workflow", "name": "deploy", "runId": "r", "step": "gate"},
        "message": message,
    }
    if decided:
        spec["decision"] = {"verdict": "Deny", "decidedBy": "bob"}
    item: dict[str, Any] = {"metadata": {"name": name, "namespace": "team"}, "spec": spec}
    if phase:
        item["status"] = {"phase": phase}
    return item


def test_only_pending_undecided_approvals_wait_unless_all_are_asked_for() -> None:
    items = [_item("b"), _item("a", "Pending"), _item("c", decided=True), _item("d", "Approved")]
    assert [i["metadata"]["name"] for i in approvals.waiting(items, False)] == ["a", "b"]
    assert len(approvals.waiting(items, True)) == 4


def test_a_decided_or_resolved_approval_cannot_be_decided_again() -> None:
    assert approvals.decision_problem(_item("a")) is None
    assert "decided already: Deny by bob" in str(
        approvals.decision_problem(_item("a", decided=True))
    )
    assert "is TimedOut" in str(approvals.decision_problem(_item("a", "TimedOut")))


@given(message=st.text(max_size=500))
def test_the_table_shows_one_printable_line_per_approval_whatever_its_message(
    message: str,
) -> None:
    text = approvals.approvals_text([_item("a", message=message)], all_namespaces=True)
    lines = text.splitlines()
    assert len(lines) == 2
    assert lines[0].split()[:2] == ["NAMESPACE", "NAME"]
    assert lines[1].isprintable()


def test_approve_and_deny_need_a_reason_and_take_a_kubeconfig() -> None:
    args = build_parser().parse_args(
        ["approve", "gate-1", "--reason", "ok", "-n", "team", "--kubeconfig", "/k"]
    )
    assert (args.name, args.reason, args.namespace, str(args.kubeconfig)) == (
        "gate-1",
        "ok",
        "team",
        "/k",
    )
    assert args.kube_handler is approvals.approve
