"""Fallback agents through the operator: the API server refuses fallbacks that cannot
work, a Workflow waits (AgentNotFound) for a missing fallback and turns Ready once it is
applied, and a run whose step's agent fails is answered by the fallback, with the
hand-over in the run log. Agents and the engine run as real processes on the process
node."""

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
    wait_ready,
    workflow,
)
from troupe_devcluster.fixtures import ClusterEndpoints, wait_for
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.run_events import Event, StepFellBack, StepSucceeded
from troupe_runtime.nats.streams import read_events

DEADLINE = 60.0
REFUSING = {
    "runtime": {
        "handler": {"type": "python", "entrypoint": "tests.integration.workflow_handlers:refuse"}
    },
    "retry": {"maxAttempts": 1},
}


def _refusal(cluster: ClusterEndpoints, namespace: str, step: dict[str, Any]) -> str:
    manifest = workflow("refused", [{"name": "s", **step}])
    return cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", stdin=json.dumps(manifest), check=False
    )


def test_the_api_server_refuses_fallbacks_that_cannot_work(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    own = _refusal(cluster, namespace, {"agentRef": "a", "fallbacks": ["b", "a"]})
    twice = _refusal(cluster, namespace, {"agentRef": "a", "fallbacks": ["b", "b"]})
    approval = _refusal(
        cluster, namespace, {"approval": {"approvers": {"users": ["u"]}}, "fallbacks": ["b"]}
    )
    assert "spec.steps[0].fallbacks" in own
    assert "must not name its own agentRef" in own
    assert "each fallback agent once" in twice
    assert "approval step takes no fallbacks" in approval
    explained_field = " ".join(cluster.kubectl("explain", "workflows.spec.steps.fallbacks").split())
    assert "take the step over, in order, with the same input" in explained_field


def _start_run(nats_url: str, subject: str) -> str:
    run_id = uuid.uuid4().hex
    event = CloudEvent(id=run_id, source="/tests/operator", type="test.start", data=["start"])
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


def test_a_workflow_waits_for_its_fallback_then_the_fallback_answers_a_failing_step(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    steps = [{"name": "s", "agentRef": "primary", "fallbacks": ["backup"], "timeout": "20s"}]
    manifest = workflow("resilient", steps)
    stream = naming.workflow_stream(namespace, "resilient")
    with explained(cluster, namespace, operator):
        apply(cluster, namespace, running_agent("primary", **REFUSING))
        apply(cluster, namespace, manifest)

        def fallback_missing() -> dict[str, Any] | None:
            ready = condition(get(cluster, namespace, "workflow", "resilient"))
            return ready if ready and ready["reason"] == "AgentNotFound" else None

        ready = wait_for(fallback_missing, DEADLINE, "Ready=False with reason AgentNotFound")
        assert "backup (step s.fallbacks)" in ready["message"]

        apply(cluster, namespace, running_agent("backup"))
        wait_ready(cluster, namespace, "agent", "primary")
        wait_ready(cluster, namespace, "agent", "backup")
        wait_ready(cluster, namespace, "workflow", "resilient")

        run_id = _start_run(cluster.nats_url, manifest["spec"]["trigger"]["subject"])
        results = naming.workflow_subject(namespace, "resilient", "results", run_id)
        result = wait_for(
            lambda: _result(cluster.nats_url, stream, results), DEADLINE, f"the result of {run_id}"
        )
        assert result == {"status": "Succeeded", "output": ["start", "backup"], "error": None}

        async def events(js: JetStreamContext) -> list[Event]:
            subject = naming.workflow_subject(namespace, "resilient", "events", run_id)
            return await read_events(js, stream, subject)

        logged = jetstream(cluster.nats_url, events)
        (handover,) = [e for e in logged if isinstance(e, StepFellBack)]
        assert (handover.from_agent, handover.to_agent) == ("primary", "backup")
        assert "primary is down" in handover.error
        (answer,) = [e for e in logged if isinstance(e, StepSucceeded)]
        assert answer.agent == "backup"
