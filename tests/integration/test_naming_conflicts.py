"""JetStream refusing a config is a config problem, not an unreachable NATS: applied with
kubectl to the real API server, operator and nats-server, a Workflow whose trigger another
stream already stores is Stalled with SubjectConflict naming that stream's owner, and one
whose stream JetStream refuses otherwise is Stalled with StreamRejected."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from tests.integration.operator_support import (
    OperatorProcess,
    agent,
    apply,
    condition,
    get,
    jetstream,
    wait_ready,
    workflow,
)
from troupe_devcluster.fixtures import ClusterEndpoints, create_namespace, wait_for
from troupe_devcluster.kube import core_v1
from troupe_runtime.contract import naming

DEADLINE = 45.0
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "research-team" / "workflow.yaml"


@pytest.fixture
def second_namespace(api_client: Any) -> Iterator[str]:
    name = create_namespace(api_client)
    yield name
    core_v1(api_client).delete_namespace(name)


def _stalled(cluster: ClusterEndpoints, namespace: str, name: str, reason: str) -> dict[str, Any]:
    """The Workflow's Ready condition once it is False for ``reason`` and Stalled is True."""

    def stalled() -> dict[str, Any] | None:
        body = get(cluster, namespace, "workflow", name)
        ready, stall = condition(body), condition(body, "Stalled")
        if ready is None or stall is None or ready["reason"] != reason:
            return None
        return ready if (ready["status"], stall["status"]) == ("False", "True") else None

    found: dict[str, Any] = wait_for(
        stalled, DEADLINE, f"workflow {namespace}/{name} Stalled with {reason}"
    )
    return found


def _with_agents(cluster: ClusterEndpoints, namespace: str, manifest: dict[str, Any]) -> None:
    """Apply the Workflow and an Agent for each step, so that only NATS can hold it back."""
    for step in manifest["spec"]["steps"]:
        apply(cluster, namespace, agent(step["agentRef"]))
    apply(cluster, namespace, manifest)


def test_the_example_workflow_in_a_second_namespace_names_the_first_as_the_conflict(
    cluster: ClusterEndpoints, namespace: str, second_namespace: str, operator: OperatorProcess
) -> None:
    example = yaml.safe_load(EXAMPLE.read_text())
    _with_agents(cluster, namespace, example)
    wait_ready(cluster, namespace, "workflow", "research")
    _with_agents(cluster, second_namespace, example)

    ready = _stalled(cluster, second_namespace, "research", "SubjectConflict")

    assert "spec.trigger.subject" in ready["message"]
    assert f"Workflow {namespace}/research" in ready["message"]
    assert naming.workflow_stream(namespace, "research") in ready["message"]


def test_a_trigger_overlapping_another_workflows_is_a_subject_conflict(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    wide = workflow("wide", [{"name": "s", "agentRef": "a"}], trigger={"subject": f"{prefix}.>"})
    narrow = workflow(
        "narrow", [{"name": "s", "agentRef": "a"}], trigger={"subject": f"{prefix}.orders"}
    )
    _with_agents(cluster, namespace, wide)
    wait_ready(cluster, namespace, "workflow", "wide")
    _with_agents(cluster, namespace, narrow)

    ready = _stalled(cluster, namespace, "narrow", "SubjectConflict")

    assert f"{prefix}.orders" in ready["message"]
    assert f"Workflow {namespace}/wide" in ready["message"]


def test_a_trigger_a_stream_of_someone_else_stores_names_that_stream(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    subject = f"t{uuid.uuid4().hex[:8]}.orders"
    stream = f"ORDERS_{uuid.uuid4().hex[:8]}"

    async def create(js: JetStreamContext) -> None:
        await js.add_stream(StreamConfig(name=stream, subjects=[subject]))

    async def delete(js: JetStreamContext) -> None:
        await js.delete_stream(stream)

    jetstream(cluster.nats_url, create)
    try:
        manifest = workflow(
            "orders", [{"name": "s", "agentRef": "a"}], trigger={"subject": subject}
        )
        _with_agents(cluster, namespace, manifest)

        ready = _stalled(cluster, namespace, "orders", "SubjectConflict")

        assert f"overlaps stream {stream}," in ready["message"]
    finally:
        jetstream(cluster.nats_url, delete)


def test_a_stream_config_jetstream_refuses_is_stream_rejected_not_unavailable(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    """A stream of the Workflow's name held in memory: JetStream refuses to move it to file."""
    manifest = workflow("kept", [{"name": "s", "agentRef": "a"}])
    stream = naming.workflow_stream(namespace, "kept")

    async def create(js: JetStreamContext) -> None:
        await js.add_stream(
            StreamConfig(
                name=stream,
                subjects=[manifest["spec"]["trigger"]["subject"]],
                storage=StorageType.MEMORY,
            )
        )

    jetstream(cluster.nats_url, create)
    _with_agents(cluster, namespace, manifest)

    ready = _stalled(cluster, namespace, "kept", "StreamRejected")

    assert f"stream/{stream}" in ready["message"]
