"""The Approval CRD and the chart's admission policy on the real API server: the request is
immutable and a decision final (CRD CEL); a decision counts only from a named approver, as
themselves (the ValidatingAdmissionPolicy); RBAC refuses whoever may not patch at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.approval_support import (
    Person,
    approval,
    decision_patch,
    may_decide,
    may_read,
    person,
)
from tests.integration.operator_support import REFUSED_AT_CREATION, get, install_crds
from troupe_devcluster.fixtures import ClusterEndpoints


@pytest.fixture(scope="module")
def crds(cluster: ClusterEndpoints) -> None:
    install_crds(cluster)


@pytest.fixture
def people(
    crds: None, cluster: ClusterEndpoints, namespace: str, tmp_path: Path
) -> dict[str, Person]:
    """Alice and bob may patch approvals; carol may not."""
    found = {name: person(cluster, namespace, name, tmp_path) for name in ("alice", "bob", "carol")}
    may_decide(cluster, namespace, "alice", "bob")
    may_read(cluster, namespace, "carol")
    return found


def _create(cluster: ClusterEndpoints, namespace: str, manifest: dict[str, object]) -> None:
    cluster.kubectl("-n", namespace, "create", "-f", "-", stdin=json.dumps(manifest))


def _decide(who: Person, name: str, verdict: str, decided_by: str) -> tuple[int, str]:
    return who.kubectl(
        "patch", "approval", name, "--type=merge", "-p", decision_patch(verdict, decided_by, "ok")
    )


def test_an_approver_decides_as_themselves_and_the_decision_is_final(
    cluster: ClusterEndpoints, namespace: str, people: dict[str, Person]
) -> None:
    bob = people["bob"]
    _create(cluster, namespace, approval("gate", [bob.user]))
    code, said = _decide(bob, "gate", "Approve", bob.user)
    assert code == 0, said
    stored = get(cluster, namespace, "approval", "gate")
    assert stored["spec"]["decision"] == {
        "verdict": "Approve",
        "decidedBy": bob.user,
        "reason": "ok",
    }
    code, said = _decide(bob, "gate", "Deny", bob.user)
    assert code != 0
    assert "a decision once set is final" in said


def test_a_user_not_among_the_approvers_is_refused_with_the_policys_message(
    cluster: ClusterEndpoints, namespace: str, people: dict[str, Person]
) -> None:
    alice, bob = people["alice"], people["bob"]
    _create(cluster, namespace, approval("gate", [bob.user]))
    code, said = _decide(alice, "gate", "Approve", alice.user)
    assert code != 0
    assert f"{alice.user} is not an approver of Approval {namespace}/gate" in said
    assert "decision" not in get(cluster, namespace, "approval", "gate")["spec"]


def test_a_decision_in_someone_elses_name_is_refused(
    cluster: ClusterEndpoints, namespace: str, people: dict[str, Person]
) -> None:
    alice, bob = people["alice"], people["bob"]
    _create(cluster, namespace, approval("gate", [alice.user, bob.user]))
    code, said = _decide(alice, "gate", "Approve", bob.user)
    assert code != 0
    assert f"decidedBy must be your own user name, {alice.user}" in said


def test_a_member_of_an_approver_group_may_decide(
    cluster: ClusterEndpoints, namespace: str, people: dict[str, Person]
) -> None:
    alice = people["alice"]
    _create(cluster, namespace, approval("gate", [], [f"system:serviceaccounts:{namespace}"]))
    code, said = _decide(alice, "gate", "Deny", alice.user)
    assert code == 0, said
    assert get(cluster, namespace, "approval", "gate")["spec"]["decision"]["verdict"] == "Deny"


def test_a_user_without_patch_rights_is_refused_by_rbac(
    cluster: ClusterEndpoints, namespace: str, people: dict[str, Person]
) -> None:
    carol = people["carol"]
    _create(cluster, namespace, approval("gate", [carol.user]))
    code, said = _decide(carol, "gate", "Approve", carol.user)
    assert code != 0
    assert f'User "{carol.user}" cannot patch resource "approvals"' in said
    assert "decision" not in get(cluster, namespace, "approval", "gate")["spec"]


def test_an_approval_created_with_a_decision_is_refused(
    cluster: ClusterEndpoints, namespace: str, crds: None
) -> None:
    manifest = approval("gate", ["someone"])
    manifest["spec"]["decision"] = {"verdict": "Approve", "decidedBy": "someone"}
    said = cluster.kubectl(
        "-n", namespace, "create", "-f", "-", stdin=json.dumps(manifest), check=False
    )
    assert REFUSED_AT_CREATION in said


def test_the_request_cannot_be_changed_but_its_status_can(
    cluster: ClusterEndpoints, namespace: str, crds: None
) -> None:
    _create(cluster, namespace, approval("gate", ["someone"]))
    said = cluster.kubectl(
        "-n",
        namespace,
        "patch",
        "approval",
        "gate",
        "--type=merge",
        "-p",
        json.dumps({"spec": {"approvers": {"users": ["mallory"]}}}),
        check=False,
    )
    assert "only spec.decision may change" in said
    cluster.kubectl(
        "-n",
        namespace,
        "patch",
        "approval",
        "gate",
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"phase": "Approved"}}),
    )
    stored = get(cluster, namespace, "approval", "gate")
    assert stored["status"]["phase"] == "Approved"
    assert stored["spec"]["approvers"]["users"] == ["someone"]
