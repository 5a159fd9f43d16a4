"""Nothing is lost while the operator is down: a decision made meanwhile is relayed once
when it is back, and a request filed meanwhile gets its Approval. The module runs an
operator of its own, SIGKILLed and started again by the test."""

from __future__ import annotations

import uuid
from pathlib import Path

from tests.integration.approval_support import (
    decision_patch,
    file_request,
    forget_namespace,
    may_decide,
    person,
    relayed,
    reply_stream,
    request,
    workflow_gate,
)
from tests.integration.operator_support import (
    FINALIZE_DEADLINE,
    OperatorProcess,
    get,
    install_crds,
)
from troupe_devcluster.fixtures import ClusterEndpoints, wait_for
from troupe_runtime.contract.approvals import ApprovalDecision

DEADLINE = 30.0


def _exists(cluster: ClusterEndpoints, namespace: str, name: str) -> bool:
    found = cluster.kubectl(
        "get", "-n", namespace, "approval", name, "--ignore-not-found", "-o", "name"
    )
    return bool(found.strip())


def test_a_decision_made_while_the_operator_is_down_is_relayed_once_it_is_back(
    cluster: ClusterEndpoints, namespace: str, tmp_path: Path
) -> None:
    install_crds(cluster)
    bob = person(cluster, namespace, "bob", tmp_path)
    may_decide(cluster, namespace, "bob")
    process = OperatorProcess(cluster, tmp_path / "operator.log")
    process.start()
    stream = f"TEST_RESTART_{namespace}".replace("-", "_")
    try:
        workflow_gate(cluster, namespace, "deploy")
        filed = request(namespace, "deploy", uuid.uuid4().hex, [bob.user])
        later = request(namespace, "deploy", uuid.uuid4().hex, [bob.user])
        reply_stream(cluster.nats_url, stream, filed.reply_subject)
        file_request(cluster.nats_url, filed)
        wait_for(lambda: _exists(cluster, namespace, filed.name), DEADLINE, "the Approval")
        process.kill()

        patch = decision_patch("Approve", bob.user, "while you slept")
        code, said = bob.kubectl("patch", "approval", filed.name, "--type=merge", "-p", patch)
        assert code == 0, said
        file_request(cluster.nats_url, later)
        assert relayed(cluster.nats_url, stream) == [], "nobody relays while the operator is down"
        process.start()

        (event,) = wait_for(lambda: relayed(cluster.nats_url, stream), DEADLINE, "the decision")
        decision = ApprovalDecision.model_validate(event.data)
        assert (decision.decided_by, decision.reason) == (bob.user, "while you slept")
        wait_for(lambda: _exists(cluster, namespace, later.name), DEADLINE, "the later Approval")
        status = get(cluster, namespace, "approval", filed.name)["status"]
        assert status["relayedAt"]
        assert len(relayed(cluster.nats_url, stream)) == 1
    except BaseException:
        print(f"--- operator\n{process.log_tail(80)}")
        raise
    finally:
        if not process.alive():
            process.start()
        cluster.kubectl("delete", "-n", namespace, "workflow", "deploy", "--ignore-not-found")
        wait_for(
            lambda: not cluster.kubectl("get", "-n", namespace, "workflows", "-o", "name").strip(),
            FINALIZE_DEADLINE,
            "the Workflow to be finalized",
        )
        process.stop()
        forget_namespace(cluster.nats_url, namespace, [stream])
