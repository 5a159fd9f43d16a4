"""A Workflow applied with kubectl runs end to end: the operator (a real subprocess) gives
it an engine Deployment and JetStream resources, Agents and the engine run as real
processes on the process node, a CloudEvent on the trigger subject starts a run, the
result lands in the workflow's stream and the Workflow's status counts it; deletion
takes the engine and (deletionPolicy Delete) the streams with it."""

from __future__ import annotations

import json
import uuid
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from tests.integration.operator_support import (
    OperatorProcess,
    apply,
    condition,
    explained,
    get,
    jetstream,
    running_agent,
    stream_names,
    wait_ready,
    workflow,
)
from troupe_devcluster.fixtures import ClusterEndpoints, wait_for
from troupe_devcluster.kube import apps_v1, core_v1
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.envelope import CloudEvent

DEADLINE = 60.0
LINEAR_STEPS: list[dict[str, Any]] = [
    {"name": "first", "agentRef": "a"},
    {"name": "second", "agentRef": "b", "dependsOn": ["first"]},
    {"name": "third", "agentRef": "c", "dependsOn": ["second"]},
]


def _deployment_exists(api_client: Any, namespace: str, name: str) -> bool:
    return any(
        d.metadata.name == name
        for d in apps_v1(api_client).list_namespaced_deployment(namespace).items
    )


def _start_run(nats_url: str, subject: str, data: Any) -> str:
    """Publish a CloudEvent to the trigger subject; its id is the run id."""
    run_id = uuid.uuid4().hex
    event = CloudEvent(id=run_id, source="/tests/operator", type="test.start", data=data)
    headers, payload = envelope.to_binary(event)

    async def publish(js: JetStreamContext) -> None:
        await js.publish(subject, payload, headers=headers)

    jetstream(nats_url, publish)
    return run_id


def _result(nats_url: str, stream: str, subject: str) -> dict[str, Any] | None:
    async def read(js: JetStreamContext) -> dict[str, Any] | None:
        try:
            msg = await js.get_last_msg(stream, subject)
        except NotFoundError:
            return None
        found: dict[str, Any] = json.loads(msg.data or b"{}")
        return found

    return jetstream(nats_url, read)


def test_a_linear_workflow_applied_with_kubectl_runs_end_to_end_and_is_cleaned_up(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, operator: OperatorProcess
) -> None:
    manifest = workflow("pipeline", LINEAR_STEPS)
    trigger = manifest["spec"]["trigger"]["subject"]
    stream = naming.workflow_stream(namespace, "pipeline")
    runs_bucket = naming.kv_stream(naming.workflow_runs_bucket(namespace, "pipeline"))
    with explained(cluster, namespace, operator):
        for name in "abc":
            apply(cluster, namespace, running_agent(name))
        apply(cluster, namespace, manifest)

        for name in "abc":
            wait_ready(cluster, namespace, "agent", name)
        wait_ready(cluster, namespace, "workflow", "pipeline")
        assert {stream, runs_bucket} <= stream_names(cluster.nats_url)

        run_id = _start_run(cluster.nats_url, trigger, ["start"])
        results = naming.workflow_subject(namespace, "pipeline", "results", run_id)
        result = wait_for(
            lambda: _result(cluster.nats_url, stream, results), DEADLINE, f"the result of {run_id}"
        )
        assert result == {"status": "Succeeded", "output": ["start", "a", "b", "c"], "error": None}

        def counted() -> dict[str, Any] | None:
            status = get(cluster, namespace, "workflow", "pipeline").get("status") or {}
            return status if status.get("runs", {}).get("succeeded") == 1 else None

        status = wait_for(counted, DEADLINE, "status.runs.succeeded == 1")
        assert status["runs"] == {
            "running": 0,
            "succeeded": 1,
            "failed": 0,
            "budgetExceeded": 0,
            "cancelled": 0,
        }
        assert (status["lastRun"]["id"], status["lastRun"]["status"]) == (run_id, "Succeeded")
        assert "finishedAt" in status["lastRun"]

        cluster.kubectl("delete", "-n", namespace, "workflow/pipeline", "--timeout=60s")

        wait_for(
            lambda: not _deployment_exists(api_client, namespace, "pipeline-engine"),
            DEADLINE,
            "the engine Deployment to be garbage-collected",
        )
        wait_for(
            lambda: not {stream, runs_bucket} & stream_names(cluster.nats_url),
            DEADLINE,
            "the workflow's stream and runs bucket to be deleted",
        )


def test_a_workflow_naming_a_missing_agent_gets_no_engine_and_is_not_ready(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, operator: OperatorProcess
) -> None:
    steps: list[dict[str, Any]] = [
        {"name": "first", "agentRef": "present"},
        {"name": "second", "agentRef": "absent", "dependsOn": ["first"]},
    ]
    with explained(cluster, namespace, operator):
        apply(cluster, namespace, running_agent("present"))
        apply(cluster, namespace, workflow("orphan", steps))

        def agent_not_found() -> dict[str, Any] | None:
            ready = condition(get(cluster, namespace, "workflow", "orphan"))
            return ready if ready and ready["reason"] == "AgentNotFound" else None

        ready = wait_for(agent_not_found, DEADLINE, "Ready=False with reason AgentNotFound")

        assert ready["status"] == "False"
        assert "absent (step second)" in ready["message"]
        assert not _deployment_exists(api_client, namespace, "orphan-engine")
        config_maps = core_v1(api_client).list_namespaced_config_map(
            namespace, label_selector="troupe.dev/workflow"
        )
        assert not config_maps.items
        engine = condition(get(cluster, namespace, "workflow", "orphan"), "WorkloadAvailable")
        assert engine is not None
        assert engine["reason"] == "EngineStopped"
