"""Status as kstatus wants it: Ready derived from sub-conditions, stable transition times."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from troupe_operator.api import AgentStatus, WorkflowStatus
from troupe_operator.api.status import ConsumerCounts, LastRun, RunCounts
from troupe_operator.builders.problems import Problem
from troupe_operator.builders.status import (
    ENGINE_STOPPED,
    DagObservation,
    MessagingObservation,
    RunObservation,
    WorkloadObservation,
    agent_status,
    last_run,
    merge_patch,
    observe_deployment,
    workflow_status,
)
from troupe_runtime.contract.run_state import RunState, RunStatus

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
        "Reconciling",
        "Stalled",
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
    assert _condition(status, "Reconciling")[:2] == ("True", "MessagingUnavailable")
    assert _condition(status, "Stalled")[0] == "False"


def test_missing_secret_outranks_other_failures_in_ready() -> None:
    status = agent_status(
        AgentStatus(),
        1,
        T0,
        WorkloadObservation(1, 0, 1, current_generation=True),
        missing_secrets=[
            Problem("spec.nats.credentialsSecret", "SecretNotFound", "Secret nats-user is absent")
        ],
    )

    expected = ("SecretNotFound", "spec.nats.credentialsSecret: Secret nats-user is absent")
    assert _condition(status, "Ready") == ("False", *expected)
    assert _condition(status, "Stalled") == ("True", *expected)
    assert _condition(status, "Reconciling")[0] == "False"


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
    graph = DagObservation(3, [["a", "c", "b"]], {"writer": ["draft", "edit"]})

    status = workflow_status(WorkflowStatus(), 1, T0, dag=graph, workload=ENGINE_STOPPED)

    assert _condition(status, "DagValid")[:2] == ("False", "CycleDetected")
    assert "a -> c -> b -> a" in _condition(status, "DagValid")[2]
    assert _condition(status, "AgentsFound") == (
        "False",
        "AgentNotFound",
        "no such Agent in the namespace: writer (step draft, edit)",
    )
    assert _condition(status, "Ready")[:2] == ("False", "CycleDetected")
    assert _condition(status, "Stalled")[:2] == ("True", "CycleDetected")
    assert _condition(status, "WorkloadAvailable")[:2] == ("False", "EngineStopped")
    assert not graph.valid


ENGINE_READY = WorkloadObservation(desired=1, ready=1, updated=1, current_generation=True)


def test_valid_workflow_is_ready_once_its_engine_and_messaging_are() -> None:
    graph = DagObservation(2)

    status = workflow_status(
        WorkflowStatus(), 2, T0, graph, ENGINE_READY, MessagingObservation("nats://nats:4222"), []
    )

    assert _condition(status, "Ready")[:2] == ("True", "Ready")
    assert [c.type for c in status.conditions] == [
        "Ready",
        "Reconciling",
        "Stalled",
        "DagValid",
        "AgentsFound",
        "SecretsResolved",
        "MessagingReady",
        "WorkloadAvailable",
    ]
    assert status.steps == 2


def test_valid_workflow_waits_for_its_engine() -> None:
    starting = WorkloadObservation(desired=1, ready=0, updated=1, current_generation=True)

    status = workflow_status(WorkflowStatus(), 1, T0, DagObservation(3), starting, NATS_OK, [])

    assert _condition(status, "Ready") == ("False", "ReplicasNotReady", "0/1 replicas ready")


def test_workflow_engine_refresh_keeps_the_other_conditions() -> None:
    down = MessagingObservation("nats://nowhere:4222", error="no servers available")
    first = workflow_status(WorkflowStatus(), 1, T0, DagObservation(3), ENGINE_READY, down, [])

    refreshed = workflow_status(first, 1, T0, workload=ENGINE_READY)

    assert _condition(refreshed, "Ready")[:2] == ("False", "MessagingUnavailable")
    assert refreshed.steps == 3


def _run(run_id: str, status: RunStatus, minute: int, finished: bool = True) -> RunState:
    started = T0 + timedelta(minutes=minute)
    return RunState(
        run_id=run_id,
        status=status,
        started_at=started,
        finished_at=started + timedelta(seconds=30) if finished else None,
    )


def test_runs_counted_in_the_stream_and_the_latest_run_reach_the_status() -> None:
    observed = RunObservation(
        RunCounts(running=2, succeeded=2, failed=1), last_run(_run("r4", "Running", 3, False))
    )

    status = workflow_status(WorkflowStatus(), 1, T0, runs=observed)

    assert status.runs == RunCounts(running=2, succeeded=2, failed=1)
    assert status.last_run == LastRun(id="r4", status="Running", started_at="2026-01-01T00:03:00Z")
    assert last_run(_run("r1", "Succeeded", 0)) == LastRun(
        id="r1",
        status="Succeeded",
        started_at="2026-01-01T00:00:00Z",
        finished_at="2026-01-01T00:00:30Z",
    )


def test_a_workflow_without_runs_has_no_last_run() -> None:
    assert last_run(None) is None


def test_a_budget_that_does_not_fit_is_reported_without_holding_ready_back() -> None:
    problem = "step a: timeout 10s is shorter than agent x's worst case 3m6s"
    status = workflow_status(
        WorkflowStatus(),
        1,
        T0,
        dag=DagObservation(1),
        workload=READY_WORKLOAD,
        messaging=NATS_OK,
        missing_secrets=[],
        budgets=[problem],
    )

    assert _condition(status, "Ready")[:2] == ("True", "Ready")
    assert status.conditions[-1].type == "BudgetsFit"
    assert _condition(status, "BudgetsFit") == ("False", "StepTimeoutTooShort", problem)


def test_the_status_patch_drops_fields_gone_at_any_depth() -> None:
    previous = {
        "steps": 3,
        "lastRun": {"id": "r1", "status": "Succeeded", "finishedAt": "2026-01-01T00:00:30Z"},
        "stale": 1,
    }
    desired = {"steps": 3, "lastRun": {"id": "r2", "status": "Running"}}

    assert merge_patch(previous, desired) == {
        "stale": None,
        "steps": 3,
        "lastRun": {"id": "r2", "status": "Running", "finishedAt": None},
    }
