"""The whole round trip with nothing stood in: a Workflow's approval step run by its engine on
the process node, the operator mirroring the request as an Approval, ``troupe approve`` as a
named ServiceAccount, the operator relaying the decision, the run finishing with the decider
in its log, and the Approval's status Approved from the engine's final word."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import Header
from nats.js.errors import NotFoundError

from tests.integration.approval_support import may_decide, person
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
from troupe_runtime.contract import approvals, envelope, naming
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.run_events import ApprovalDecided, Event
from troupe_runtime.nats.streams import read_events

DEADLINE = 60.0


def _start(nats_url: str, subject: str, run: str) -> None:
    event = CloudEvent(id=run, source="/tests", type="test.start", data={"version": "7"})
    headers, payload = envelope.to_binary(event)

    async def publish(js: JetStreamContext) -> None:
        await js.publish(subject, payload, headers={**headers, Header.MSG_ID.value: run})

    jetstream(nats_url, publish)


def _result(nats_url: str, stream: str, subject: str) -> dict[str, Any] | None:
    async def read(js: JetStreamContext) -> dict[str, Any] | None:
        try:
            msg = await js.get_last_msg(stream, subject)
        except NotFoundError:
            return None
        found: dict[str, Any] = json.loads(msg.data or b"{}")
        return found

    return jetstream(nats_url, read)


def test_a_run_waits_for_troupe_approve_and_goes_on_with_who_approved(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess, tmp_path: Path
) -> None:
    bob = person(cluster, namespace, "bob", tmp_path)
    may_decide(cluster, namespace, "bob")
    steps: list[dict[str, Any]] = [
        {
            "name": "gate",
            "approval": {
                "approvers": {"users": [bob.user]},
                "message": "release {trigger.version}?",
            },
        },
        {"name": "ship", "agentRef": "shipper", "dependsOn": ["gate"]},
    ]
    stream = naming.workflow_stream(namespace, "release")
    with explained(cluster, namespace, operator):
        apply(cluster, namespace, running_agent("shipper"))
        apply(cluster, namespace, workflow("release", steps))
        wait_ready(cluster, namespace, "agent", "shipper")
        wait_ready(cluster, namespace, "workflow", "release")
        run = uuid.uuid4().hex
        trigger = get(cluster, namespace, "workflow", "release")["spec"]["trigger"]["subject"]
        _start(cluster.nats_url, trigger, run)

        name = approvals.approval_name("release", run, "gate")

        def mirrored() -> dict[str, Any] | None:
            found = cluster.kubectl(
                "get", "-n", namespace, "approval", name, "--ignore-not-found", "-o", "json"
            )
            return json.loads(found) if found.strip() else None

        approval = wait_for(mirrored, DEADLINE, "the run's Approval")
        assert approval["spec"]["message"] == "release 7?"
        assert approval["metadata"]["ownerReferences"][0]["kind"] == "Workflow"

        command = ["approve", name, "-n", namespace, "--reason", "green build"]
        approved = subprocess.run(
            [sys.executable, "-m", "troupe_cli", *command, "--kubeconfig", str(bob.kubeconfig)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "KUBECONFIG": ""},
        )
        assert approved.returncode == 0, approved.stderr

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
        assert [(d.phase, d.decided_by, d.reason) for d in decided] == [
            ("Approved", bob.user, "green build")
        ]

        def resolved() -> dict[str, Any] | None:
            body = mirrored()
            ready = condition(body, "Ready") if body else None
            return body if ready and ready["status"] == "True" else None

        final = wait_for(resolved, DEADLINE, "the Approval's status Approved")
        assert final["status"]["phase"] == "Approved"
        assert final["status"]["decidedBy"] == bob.user
        assert final["status"]["reason"] == "green build"
