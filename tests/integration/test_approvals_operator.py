"""The operator's side of approvals on the real cluster and nats-server: a request in the
namespace's bucket becomes an Approval owned by its Workflow; a named approver's decision is
relayed to the run's approve subject with who and why; a refusal (RBAC, the approvers list)
relays nothing; a forged reply subject is never published to; the requester's final phase
reaches the status; deleting the Workflow removes its Approvals. The test stands in for the
Workflow's engine (the requester)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.approval_support import (
    Person,
    decision_patch,
    file_request,
    forget_namespace,
    may_decide,
    may_read,
    person,
    relayed,
    reply_stream,
    request,
    workflow_gate,
)
from tests.integration.operator_support import OperatorProcess, condition, explained
from troupe_devcluster.fixtures import ClusterEndpoints, wait_for
from troupe_runtime.contract import approvals, naming
from troupe_runtime.contract.approvals import ApprovalDecision, ApprovalRequest

DEADLINE = 30.0


@pytest.fixture
def people(cluster: ClusterEndpoints, namespace: str, tmp_path: Path) -> dict[str, Person]:
    """Bob is the approver the requests name; alice may patch approvals but is not named;
    carol may only read them."""
    found = {name: person(cluster, namespace, name, tmp_path) for name in ("alice", "bob", "carol")}
    may_decide(cluster, namespace, "alice", "bob")
    may_read(cluster, namespace, "carol")
    return found


@pytest.fixture(autouse=True)
def clean_nats(cluster: ClusterEndpoints, namespace: str) -> Iterator[None]:
    """The namespace's bucket and reply streams go with the test."""
    yield
    streams = [f"TEST_{kind}_{namespace}".replace("-", "_") for kind in ("APPROVE", "FORGED")]
    forget_namespace(cluster.nats_url, namespace, streams)


def _approval(cluster: ClusterEndpoints, namespace: str, name: str) -> dict[str, Any] | None:
    """The Approval, or None: one read (a name listed, then gone by a second read, would be a
    race with the garbage collector)."""
    found = cluster.kubectl(
        "get", "-n", namespace, "approval", name, "--ignore-not-found", "-o", "json"
    )
    body: dict[str, Any] | None = json.loads(found) if found.strip() else None
    return body


def _status_is(
    cluster: ClusterEndpoints, namespace: str, name: str, kind: str, reason: str
) -> dict[str, Any] | None:
    body = _approval(cluster, namespace, name)
    found = condition(body, kind) if body else None
    return body if found and found["status"] == "True" and found["reason"] == reason else None


def _decide(who: Person, name: str, verdict: str, reason: str) -> tuple[int, str]:
    return who.kubectl(
        "patch", "approval", name, "--type=merge", "-p", decision_patch(verdict, who.user, reason)
    )


def _resolve(nats_url: str, filed: ApprovalRequest, decision: ApprovalDecision) -> None:
    """What the engine does with a decision: write the request back with its final phase."""
    approved = decision.verdict == "Approve"
    file_request(
        nats_url,
        filed.model_copy(
            update={
                "phase": "Approved" if approved else "Denied",
                "approved": approved,
                "decided_by": decision.decided_by,
                "decided_at": decision.decided_at,
                "reason": decision.reason,
            }
        ),
    )


def _setup(
    cluster: ClusterEndpoints, namespace: str, bob: Person
) -> tuple[dict[str, Any], ApprovalRequest, str]:
    owner = workflow_gate(cluster, namespace, "deploy")
    run = uuid.uuid4().hex
    filed = request(namespace, "deploy", run, [bob.user])
    stream = f"TEST_APPROVE_{namespace}".replace("-", "_")
    reply_stream(cluster.nats_url, stream, filed.reply_subject)
    return owner, filed, stream


@pytest.mark.parametrize("verdict", ["Approve", "Deny"])
def test_a_request_becomes_an_approval_and_a_named_approvers_decision_is_relayed(
    operator: OperatorProcess,
    cluster: ClusterEndpoints,
    namespace: str,
    people: dict[str, Person],
    verdict: str,
) -> None:
    alice, bob, carol = people["alice"], people["bob"], people["carol"]
    owner, filed, stream = _setup(cluster, namespace, bob)
    with explained(cluster, namespace, operator):
        file_request(cluster.nats_url, filed)
        body = wait_for(
            lambda: _status_is(cluster, namespace, filed.name, "Reconciling", "AwaitingDecision"),
            DEADLINE,
            "the Approval, awaiting a decision",
        )
        (reference,) = body["metadata"]["ownerReferences"]
        assert (reference["kind"], reference["uid"]) == ("Workflow", owner["metadata"]["uid"])
        assert "finalizers" not in body["metadata"]
        assert body["spec"]["requester"]["runId"] == filed.requester.run_id
        assert body["spec"]["message"] == "Ship release 1.2? Approved by everyone"
        assert body["status"]["phase"] == "Pending"

        code, said = _decide(carol, filed.name, verdict, "carol says so")
        assert code != 0
        assert "cannot patch resource" in said
        code, said = _decide(alice, filed.name, verdict, "alice says so")
        assert code != 0
        assert f"{alice.user} is not an approver" in said
        code, said = _decide(bob, filed.name, verdict, "checked the \x1b[2Jchangelog\nok")
        assert code == 0, said

        (event,) = wait_for(lambda: relayed(cluster.nats_url, stream), DEADLINE, "the decision")
        assert event.type == approvals.DECISION_TYPE
        assert event.id == approvals.decision_message_id(filed, body["metadata"]["uid"])
        decision = ApprovalDecision.model_validate(event.data)
        assert (decision.name, decision.verdict) == (filed.name, verdict)
        assert decision.decided_by == bob.user
        assert decision.reason == "checked the  [2Jchangelog ok"
        relaying = wait_for(
            lambda: _status_is(cluster, namespace, filed.name, "Reconciling", "DecisionRelayed"),
            DEADLINE,
            "the status to say the decision was relayed",
        )
        assert relaying["status"]["decidedBy"] == bob.user
        assert relaying["status"]["phase"] == "Pending"

        _resolve(cluster.nats_url, filed, decision)
        phase = "Approved" if verdict == "Approve" else "Denied"
        final = wait_for(
            lambda: _status_is(cluster, namespace, filed.name, "Ready", phase),
            DEADLINE,
            f"the status to show {phase}",
        )
        assert final["status"]["phase"] == phase
        assert final["status"]["approved"] is (verdict == "Approve")
        assert condition(final, "Reconciling")["status"] == "False"  # type: ignore[index]
        assert len(relayed(cluster.nats_url, stream)) == 1, "relayed once"


def test_a_forged_reply_subject_is_never_published_to(
    operator: OperatorProcess, cluster: ClusterEndpoints, namespace: str, people: dict[str, Person]
) -> None:
    bob = people["bob"]
    workflow_gate(cluster, namespace, "deploy")
    other = naming.workflow_subject(namespace, "payroll", "approve", "r-9")
    forged = request(namespace, "deploy", uuid.uuid4().hex, [bob.user], reply_subject=other)
    stream = f"TEST_FORGED_{namespace}".replace("-", "_")
    reply_stream(cluster.nats_url, stream, other)
    with explained(cluster, namespace, operator):
        file_request(cluster.nats_url, forged)
        stalled = wait_for(
            lambda: _status_is(cluster, namespace, forged.name, "Stalled", "RequestRefused"),
            DEADLINE,
            "the Approval, Stalled on its forged reply subject",
        )
        assert other in condition(stalled, "Stalled")["message"]  # type: ignore[index]
        code, said = _decide(bob, forged.name, "Approve", "looks fine")
        assert code == 0, said
        seen = wait_for(
            lambda: (
                (body := _approval(cluster, namespace, forged.name))
                and (body.get("status") or {}).get("decidedBy") == bob.user
                and body
            ),
            DEADLINE,
            "the operator to have seen the decision",
        )
        assert "relayedAt" not in seen["status"]
        assert relayed(cluster.nats_url, stream) == []


def test_a_request_whose_workflow_does_not_exist_gets_no_approval(
    operator: OperatorProcess, cluster: ClusterEndpoints, namespace: str, people: dict[str, Person]
) -> None:
    bob = people["bob"]
    workflow_gate(cluster, namespace, "deploy")
    ghost = request(namespace, "ghost", uuid.uuid4().hex, [bob.user])
    first, second = (request(namespace, "deploy", uuid.uuid4().hex, [bob.user]) for _ in "12")
    with explained(cluster, namespace, operator):
        file_request(cluster.nats_url, ghost)
        file_request(cluster.nats_url, first)
        wait_for(lambda: _approval(cluster, namespace, first.name), DEADLINE, "the Approval")
        # Filed after the look that saw the ghost began: when its Approval exists, that
        # look (the loop runs one at a time) has finished with the ghost.
        file_request(cluster.nats_url, second)
        wait_for(lambda: _approval(cluster, namespace, second.name), DEADLINE, "the Approval")
        assert _approval(cluster, namespace, ghost.name) is None


def test_deleting_the_workflow_removes_its_approvals(
    operator: OperatorProcess, cluster: ClusterEndpoints, namespace: str, people: dict[str, Person]
) -> None:
    _, filed, _ = _setup(cluster, namespace, people["bob"])
    with explained(cluster, namespace, operator):
        file_request(cluster.nats_url, filed)
        wait_for(lambda: _approval(cluster, namespace, filed.name), DEADLINE, "the Approval")
        cluster.kubectl("delete", "-n", namespace, "workflow", "deploy", "--wait=false")
        wait_for(
            lambda: _approval(cluster, namespace, filed.name) is None,
            DEADLINE + 30,
            "the garbage collector to remove the Approval with its Workflow",
        )


def _troupe(who: Person, *args: str) -> subprocess.CompletedProcess[str]:
    """The ``troupe`` CLI as ``who``."""
    return subprocess.run(
        [sys.executable, "-m", "troupe_cli", *args, "--kubeconfig", str(who.kubeconfig)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KUBECONFIG": ""},
    )


def test_troupe_approvals_lists_what_waits_and_troupe_approve_decides_as_the_caller(
    operator: OperatorProcess, cluster: ClusterEndpoints, namespace: str, people: dict[str, Person]
) -> None:
    alice, bob = people["alice"], people["bob"]
    _, filed, stream = _setup(cluster, namespace, bob)
    with explained(cluster, namespace, operator):
        file_request(cluster.nats_url, filed)
        wait_for(lambda: _approval(cluster, namespace, filed.name), DEADLINE, "the Approval")
        inbox = cluster.kubectl("get", "approvals", "-A").splitlines()
        (line,) = [row.split() for row in inbox if filed.name in row]
        assert inbox[0].split()[:6] == ["NAMESPACE", "NAME", "REQUESTER", "STEP", "TOOL", "PHASE"]
        expires = filed.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ")  # type: ignore[union-attr]
        # No tool (a Workflow's step): kubectl leaves that cell blank.
        assert line[:6] == [namespace, filed.name, "deploy", "gate", "Pending", expires]
        listed = _troupe(bob, "approvals", "-n", namespace)
        assert listed.returncode == 0, listed.stderr
        assert filed.name in listed.stdout
        assert "Workflow/deploy" in listed.stdout
        assert "gate" in listed.stdout

        refused = _troupe(alice, "deny", filed.name, "-n", namespace, "--reason", "no")
        assert refused.returncode == 2
        assert f"{alice.user} is not an approver of Approval {namespace}/{filed.name}" in (
            refused.stderr
        )

        approved = _troupe(bob, "approve", filed.name, "-n", namespace, "--reason", "tested")
        assert approved.returncode == 0, approved.stderr
        assert f"Approved Approval {namespace}/{filed.name} as {bob.user}" in approved.stdout
        (event,) = wait_for(lambda: relayed(cluster.nats_url, stream), DEADLINE, "the decision")
        decision = ApprovalDecision.model_validate(event.data)
        assert (decision.verdict, decision.decided_by, decision.reason) == (
            "Approve",
            bob.user,
            "tested",
        )
        again = _troupe(bob, "deny", filed.name, "-n", namespace, "--reason", "changed my mind")
        assert again.returncode == 1
        assert "decided already: Approve by" in again.stderr
        pending = _troupe(bob, "approvals", "-n", namespace)
        assert filed.name not in pending.stdout, "a decided Approval no longer waits"
