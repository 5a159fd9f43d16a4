"""What Argo CD and kstatus (Flux, kpt) conclude from real Agents and Workflows, read back
from the API server while the real operator reconciles them: Healthy and Current once
Ready, Progressing and InProgress while the operator converges or has not yet seen the
latest spec, Degraded and Failed when a person must act, then Healthy and Current again. The
argocd-cm snippet patches in as documented."""

from __future__ import annotations

from typing import Any

import pytest

from tests.health_support import ARGOCD, HEALTH_LUA, argocd_health, kstatus
from tests.integration.operator_support import (
    OperatorProcess,
    agent,
    apply,
    condition,
    get,
    workflow,
)
from troupe_devcluster.fixtures import ClusterEndpoints, wait_for

DEADLINE = 45.0


def _verdicts(body: dict[str, Any]) -> tuple[str, str]:
    return argocd_health(body).status, kstatus(body).status


def _with_ready_reason(
    cluster: ClusterEndpoints, namespace: str, kind: str, name: str, reason: str
) -> dict[str, Any]:
    """The object as read back once its Ready condition gives ``reason``."""

    def read() -> dict[str, Any] | None:
        body = get(cluster, namespace, kind, name)
        ready = condition(body)
        return body if ready and ready["reason"] == reason else None

    found: dict[str, Any] = wait_for(read, DEADLINE, f"{kind}/{name} with Ready reason {reason}")
    return found


def _ready_at_generation(
    cluster: ClusterEndpoints, namespace: str, kind: str, name: str
) -> dict[str, Any]:
    def read() -> dict[str, Any] | None:
        body = get(cluster, namespace, kind, name)
        ready = condition(body)
        current = (body.get("status") or {}).get("observedGeneration")
        if ready and ready["status"] == "True" and current == body["metadata"]["generation"]:
            return body
        return None

    found: dict[str, Any] = wait_for(read, DEADLINE, f"{kind}/{name} Ready at its generation")
    return found


def test_the_argocd_cm_snippet_patches_both_checks_into_argocd_cm(
    cluster: ClusterEndpoints, namespace: str
) -> None:
    cluster.kubectl(
        "create", "configmap", "argocd-cm", "-n", namespace, "--from-literal=url=https://cd.test"
    )

    cluster.kubectl(
        "patch",
        "configmap",
        "argocd-cm",
        "-n",
        namespace,
        "--patch-file",
        str(ARGOCD / "argocd-cm.yaml"),
    )

    data = get(cluster, namespace, "configmap", "argocd-cm")["data"]
    script = HEALTH_LUA.read_text()
    assert data == {
        "url": "https://cd.test",
        "resource.customizations.health.troupe.dev_Agent": script,
        "resource.customizations.health.troupe.dev_Workflow": script,
        "resource.customizations.health.troupe.dev_ModelProvider": script,
        "resource.customizations.health.troupe.dev_Budget": script,
        "resource.customizations.health.troupe.dev_ChaosExperiment": script,
    }


def test_a_ready_agent_is_healthy_and_current(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    apply(cluster, namespace, agent("steady", runtime={"replicas": 2}))

    body = _ready_at_generation(cluster, namespace, "agent", "steady")

    assert _verdicts(body) == ("Healthy", "Current")
    ready = condition(body)
    assert ready is not None
    assert argocd_health(body).message == ready["message"]


@pytest.mark.parametrize(
    ("broken", "reason", "message"),
    [
        ({"nats": {"url": "nats://127.0.0.1:1"}}, "MessagingUnavailable", "nats://127.0.0.1:1"),
        ({"runtime": {"nodeSelector": {"type": "nowhere"}}}, "ReplicasNotReady", "0/1"),
    ],
    ids=["nats unreachable", "pods unschedulable"],
)
def test_an_agent_still_converging_is_progressing_and_in_progress_until_it_is_ready(
    cluster: ClusterEndpoints,
    namespace: str,
    operator: OperatorProcess,
    broken: dict[str, Any],
    reason: str,
    message: str,
) -> None:
    apply(cluster, namespace, agent("waiting", **broken))

    body = _with_ready_reason(cluster, namespace, "agent", "waiting", reason)

    assert _verdicts(body) == ("Progressing", "InProgress")
    assert message in argocd_health(body).message

    apply(cluster, namespace, agent("waiting", nats={"url": cluster.nats_url}))
    body = _ready_at_generation(cluster, namespace, "agent", "waiting")
    assert _verdicts(body) == ("Healthy", "Current")


def test_a_spec_the_operator_has_not_observed_is_progressing_and_in_progress(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    apply(cluster, namespace, agent("changing"))
    _ready_at_generation(cluster, namespace, "agent", "changing")

    operator.kill()
    try:
        apply(cluster, namespace, agent("changing", retry={"maxAttempts": 4}))
        body = get(cluster, namespace, "agent", "changing")
    finally:
        operator.start()

    ready = condition(body)
    assert ready is not None
    assert ready["status"] == "True"
    assert body["status"]["observedGeneration"] < body["metadata"]["generation"]
    assert _verdicts(body) == ("Progressing", "InProgress")
    body = _ready_at_generation(cluster, namespace, "agent", "changing")
    assert _verdicts(body) == ("Healthy", "Current")


def test_an_agent_naming_a_missing_secret_is_degraded_and_failed_until_it_names_none(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    apply(cluster, namespace, agent("secretive", nats={"credentialsSecret": {"name": "gone"}}))

    body = _with_ready_reason(cluster, namespace, "agent", "secretive", "SecretNotFound")

    assert _verdicts(body) == ("Degraded", "Failed")
    assert "Secret gone does not exist" in argocd_health(body).message
    assert kstatus(body).message == argocd_health(body).message

    apply(cluster, namespace, agent("secretive"))
    body = _ready_at_generation(cluster, namespace, "agent", "secretive")
    assert _verdicts(body) == ("Healthy", "Current")


def test_a_ready_workflow_is_healthy_and_current(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    apply(cluster, namespace, agent("drafter"))
    apply(cluster, namespace, workflow("article", [{"name": "draft", "agentRef": "drafter"}]))

    body = _ready_at_generation(cluster, namespace, "workflow", "article")

    assert _verdicts(body) == ("Healthy", "Current")


def test_a_workflow_with_a_cycle_is_degraded_and_failed(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    apply(cluster, namespace, agent("worker"))
    steps: list[dict[str, Any]] = [
        {"name": "left", "agentRef": "worker", "dependsOn": ["right"]},
        {"name": "right", "agentRef": "worker", "dependsOn": ["left"]},
    ]
    apply(cluster, namespace, workflow("loop", steps))

    body = _with_ready_reason(cluster, namespace, "workflow", "loop", "CycleDetected")

    assert _verdicts(body) == ("Degraded", "Failed")
    assert "cycle" in argocd_health(body).message
    assert kstatus(body).message == argocd_health(body).message


def test_a_workflow_missing_an_agent_is_degraded_and_failed_until_the_agent_exists(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    apply(cluster, namespace, workflow("orphan", [{"name": "only", "agentRef": "absent"}]))

    body = _with_ready_reason(cluster, namespace, "workflow", "orphan", "AgentNotFound")

    assert _verdicts(body) == ("Degraded", "Failed")
    assert "absent (step only)" in argocd_health(body).message

    apply(cluster, namespace, agent("absent"))
    body = _ready_at_generation(cluster, namespace, "workflow", "orphan")
    assert _verdicts(body) == ("Healthy", "Current")
