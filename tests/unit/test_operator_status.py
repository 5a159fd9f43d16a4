"""Status as kstatus wants it: Ready derived from sub-conditions, stable transition times."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from troupe_operator.api import AgentStatus, WorkflowStatus
from troupe_operator.api.status import ConsumerCounts
from troupe_operator.builders.status import (
    MessagingObservation,
    WorkloadObservation,
    agent_status,
    observe_deployment,
    workflow_status,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
READY_WORKLOAD = WorkloadObservation(desired=2, ready=2, updated=2, current_generation=True)
NATS_OK = MessagingObservation(
    "nats://nats:4222", counts=ConsumerCounts(pending=3, ack_pending=2, redelivered=1)
)


def _condition(status: AgentStatus | WorkflowStatus, kind: str) -> tuple[str, str, str]:
    (found,) = [c for c in status.conditions if c.type == kind]
    return found.status, found.reason, found.message


def test_agent_is_ready_when_secrets_messaging_and_workload_are() -> None:
    status = agent_status(AgentStatus(), 3, T0, READY_WORKLOAD, NATS_OK, missing_secrets=[])

    assert _condition(status, "Ready")[:2] == ("True", "Ready")
    assert [c.type for c in status.conditions] == [
        "Ready",
        "SecretsResolved",
        "MessagingReady",
        "WorkloadAvailable",
    ]
    assert status.observed_generation == 3
    assert all(c.observed_generation == 3 for c in status.conditions)
    assert (status.ready_replicas, status.lag, status.consumers.redelivered) == (2, 5, 1)


def test_unreachable_nats_makes_ready_false_with_reason_messaging_unavailable() -> None:
    down = MessagingObservation("nats://nowhere:4222", error="no servers available")

    status = agent_status(AgentStatus(), 1, T0, READY_WORKLOAD, down, missing_secrets=[])

    reason, message = _condition(status, "Ready")[1:]
    assert _condition(status, "Ready")[0] == "False"
    assert reason == "MessagingUnavailable"
    assert "nats://nowhere:4222" in message
    assert "no servers available" in message


def test_missing_secret_outranks_other_failures_in_ready() -> None:
    status = agent_status(
        AgentStatus(),
        1,
        T0,
        WorkloadObservation(1, 0, 1, current_generation=True),
        missing_secrets=["Secret nats-user (named by spec.nats.credentialsSecret) does not exist"],
    )

    assert _condition(status, "Ready") == (
        "False",
        "SecretNotFound",
        "Secret nats-user (named by spec.nats.credentialsSecret) does not exist",
    )


def test_transition_time_changes_only_when_status_changes() -> None:
    first = agent_status(AgentStatus(), 1, T0, READY_WORKLOAD, NATS_OK, missing_secrets=[])
    later = T0 + timedelta(minutes=5)

    same = agent_status(first, 2, later, READY_WORKLOAD, NATS_OK, missing_secrets=[])
    scaled = WorkloadObservation(desired=3, ready=2, updated=3, current_generation=True)
    changed = agent_status(same, 3, later, scaled, NATS_OK, missing_secrets=[])

    def ready_time(status: AgentStatus) -> str:
        (ready,) = [c for c in status.conditions if c.type == "Ready"]
        return ready.last_transition_time

    assert ready_time(same) == ready_time(first) == "2026-01-01T00:00:00Z"
    assert ready_time(changed) == "2026-01-01T00:05:00Z"
    assert _condition(changed, "Ready")[1] == "ReplicasNotReady"


def test_unobserved_sub_conditions_and_counts_are_carried_over() -> None:
    first = agent_status(AgentStatus(), 1, T0, READY_WORKLOAD, NATS_OK, missing_secrets=[])

    refreshed = agent_status(first, 1, T0, WorkloadObservation(2, 1, 2, current_generation=True))

    assert _condition(refreshed, "MessagingReady")[0] == "True"
    assert refreshed.consumers == first.consumers
    assert _condition(refreshed, "Ready")[:2] == ("False", "ReplicasNotReady")


def test_rollout_in_progress_until_the_deployment_saw_its_generation() -> None:
    deployment = {
        "metadata": {"generation": 4},
        "spec": {"replicas": 1},
        "status": {"observedGeneration": 3, "readyReplicas": 1, "updatedReplicas": 1},
    }

    observation = observe_deployment(deployment)

    assert observation.condition().reason == "RolloutInProgress"
    assert observe_deployment(None).condition().reason == "DeploymentMissing"


def test_workflow_with_a_cycle_and_unknown_agents_names_them() -> None:
    status = workflow_status(
        WorkflowStatus(),
        1,
        T0,
        steps=3,
        cycles=[["a", "c", "b"]],
        unknown_agents={"writer": ["draft", "edit"]},
    )

    assert _condition(status, "DagValid")[:2] == ("False", "CycleDetected")
    assert "a -> c -> b -> a" in _condition(status, "DagValid")[2]
    assert _condition(status, "AgentsFound") == (
        "False",
        "AgentNotFound",
        "no such Agent in the namespace: writer (step draft, edit)",
    )
    assert _condition(status, "Ready")[:2] == ("False", "CycleDetected")


def test_valid_workflow_is_ready() -> None:
    status = workflow_status(WorkflowStatus(), 2, T0, steps=2, cycles=[], unknown_agents={})

    assert _condition(status, "Ready")[:2] == ("True", "Ready")
    assert status.steps == 2
