"""A Workflow applied before its Agents (as GitOps tools apply a directory) turns from Stalled
AgentNotFound to found as soon as the Agent's pass runs, not at the next resync: the resync
here is an hour away, so only the Agent's pass waking its Workflows can explain it."""

from __future__ import annotations

import pytest

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


@pytest.fixture(scope="module")
def operator_env() -> dict[str, str]:
    return {"TROUPE_RESYNC_SECONDS": "3600"}


def _agents_found(cluster: ClusterEndpoints, namespace: str, name: str) -> str | None:
    found = condition(get(cluster, namespace, "workflow", name), "AgentsFound")
    return None if found is None else f"{found['status']}/{found['reason']}"


def test_a_workflow_waiting_for_its_agent_is_passed_again_when_the_agent_appears(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    apply(cluster, namespace, workflow("early", [{"name": "only", "agentRef": "late"}]))
    wait_for(
        lambda: _agents_found(cluster, namespace, "early") == "False/AgentNotFound",
        DEADLINE,
        "the Workflow to report its Agent missing",
    )
    stalled = condition(get(cluster, namespace, "workflow", "early"), "Stalled")
    assert stalled is not None
    assert stalled["status"] == "True"

    apply(cluster, namespace, agent("late"))
    wait_for(
        lambda: _agents_found(cluster, namespace, "early") == "True/AgentsFound",
        DEADLINE,
        "the Workflow to find the Agent long before the resync",
    )
    assert operator.alive()
