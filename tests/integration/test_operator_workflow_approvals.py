"""A Workflow with an approval step, applied with kubectl and run by the operator's engine
on the process node: the operator provisions the namespace's approvals bucket, the run
waits (its request Pending in the bucket, the Workflow's lastRun WaitingForApproval), a
decision relayed as the operator relays it finishes it with the decider in its log, and
deleting the Workflow leaves the namespace's bucket."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import Header
from nats.js.errors import KeyNotFoundError, NotFoundError

from tests.integration.operator_support import (
    OperatorProcess,
    apply,
    explained,
    get,
    jetstream,
    running_agent,
    stream_names,
    wait_ready,
    workflow,
)
from troupe_devcluster.fixtures import ClusterEndpoints, wait_for
from troupe_runtime.contract import approvals, envelope, naming
from troupe_runtime.contract.approvals import ApprovalDecision, ApprovalRequest
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.run_events import ApprovalDecided, Event
from troupe_runtime.nats.streams import read_events

DEADLINE = 60.0
STEPS: list[dict[str, Any]] = [
    {
        "name": "gate",
        "approval": {
            "approvers": {"users": ["alice"]},
            "message": "release {trigger.version}?",
        },
    },
    {
        "name": "ship",
        "agentRef": "shipper",
        "dependsOn": ["gate"],
        "input": {"by": "steps.gate.output.decidedBy"},
    },
]


def _publish(nats_url: str, subject: str, event: CloudEvent, msg_id: str | None = None) -> None:
    headers, payload = envelope.to_binary(event)
    if msg_id is not None:
        headers = {**headers, Header.MSG_ID.value: msg_id}

    async def publish(js: JetStreamContext) -> None:
        await js.publish(subject, payload, headers=headers)

    jetstream(nats_url, publish)


def _request(nats_url: str, namespace: str, name: str) -> ApprovalRequest | None:
    async def read(js: JetStreamContext) -> ApprovalRequest | None:
        kv = await js.key_value(naming.approvals_bucket(namespace))
        try:
            entry = await kv.get(naming.approval_key(name))
        except KeyNotFoundError:
            return None
        return ApprovalRequest.model_validate_json(entry.value or b"")

    return jetstream(nats_url, read)


def _result(nats_url: str, stream: str, subject: str) -> dict[str, Any] | None:
    async def read(js: JetStreamContext) -> dict[str, Any] | None:
        try:
            msg = await js.get_last_msg(stream, subject)
        except NotFoundError:
            return None
        found: dict[str, Any] = json.loads(msg.data or b"{}")
        return found

    return jetstream(nats_url, read)


def test_an_approval_step_waits_for_a_decision_under_the_operator(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    stream = naming.workflow_stream(namespace, "release")
    bucket = naming.kv_stream(naming.approvals_bucket(namespace))
    with explained(cluster, namespace, operator):
        apply(cluster, namespace, running_agent("shipper"))
        apply(cluster, namespace, workflow("release", STEPS))
        wait_ready(cluster, namespace, "agent", "shipper")
        wait_ready(cluster, namespace, "workflow", "release")
        assert bucket in stream_names(cluster.nats_url)

        run = uuid.uuid4().hex
        trigger = get(cluster, namespace, "workflow", "release")["spec"]["trigger"]["subject"]
        _publish(
            cluster.nats_url,
            trigger,
            CloudEvent(id=run, source="/tests", type="test.start", data={"version": "7"}),
        )
        name = approvals.approval_name("release", run, "gate")
        pending = wait_for(
            lambda: _request(cluster.nats_url, namespace, name), DEADLINE, "the approval request"
        )
        assert (pending.phase, pending.message) == ("Pending", "release 7?")

        def waiting() -> dict[str, Any] | None:
            last = (get(cluster, namespace, "workflow", "release").get("status") or {}).get(
                "lastRun"
            ) or {}
            return last if last.get("status") == "WaitingForApproval" else None

        assert wait_for(waiting, DEADLINE, "lastRun WaitingForApproval")["id"] == run

        decision = ApprovalDecision(
            name=name,
            verdict="Approve",
            decided_by="alice",
            decided_at=datetime.now(UTC),
            reason="green",
        )
        event = approvals.decision_event(pending, decision, uuid.uuid4().hex)
        _publish(cluster.nats_url, pending.reply_subject, event, event.id)
        results = naming.workflow_subject(namespace, "release", "results", run)
        result = wait_for(
            lambda: _result(cluster.nats_url, stream, results), DEADLINE, f"the result of {run}"
        )
        assert result["status"] == "Succeeded", result

        async def events(js: JetStreamContext) -> list[Event]:
            return await read_events(
                js, stream, naming.workflow_subject(namespace, "release", "events", run)
            )

        decided = [e for e in jetstream(cluster.nats_url, events) if isinstance(e, ApprovalDecided)]
        assert [(d.decided_by, d.reason) for d in decided] == [("alice", "green")]
        final = _request(cluster.nats_url, namespace, name)
        assert final is not None
        assert final.phase == "Approved"

        cluster.kubectl("delete", "-n", namespace, "workflow/release", "--timeout=60s")
        wait_for(
            lambda: stream not in stream_names(cluster.nats_url),
            DEADLINE,
            "the workflow's stream to be deleted",
        )
        assert bucket in stream_names(cluster.nats_url)
