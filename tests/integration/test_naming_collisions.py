"""Names that used to collide, applied with kubectl to the real API server, operator and
nats-server: each object gets its own subjects, streams and buckets, and objects sharing a
bucket agree on its settings."""

from __future__ import annotations

import asyncio
import time
import uuid

import nats
from nats.js import JetStreamContext
from nats.js.errors import NoKeysError

from tests.integration.operator_support import (
    OperatorProcess,
    agent,
    apply,
    get,
    jetstream,
    stream_config,
    stream_names,
    wait_ready,
    workflow,
)
from troupe_devcluster.fixtures import ClusterEndpoints
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.envelope import CloudEvent

DEADLINE = 45.0


def _stored_by(nats_url: str, subject: str) -> str:
    """The stream JetStream stores a message on ``subject`` in (from the publish ack)."""
    event = CloudEvent(id=uuid.uuid4().hex, source="/tests/naming", type="test.naming", data={})
    headers, payload = envelope.to_binary(event)

    async def publish(js: JetStreamContext) -> str:
        return (await js.publish(subject, payload, headers=headers)).stream

    return jetstream(nats_url, publish)


def test_an_agent_wf_and_a_workflow_in_are_ready_with_their_traffic_apart(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    """Agent ``wf`` and Workflow ``in`` once shared ``troupe.<ns>.wf.in.…``; an Agent
    ``events`` had its dead letters under the event log's ``troupe.<ns>.events.*``."""
    apply(cluster, namespace, agent("wf"))
    apply(cluster, namespace, agent("events"))
    apply(cluster, namespace, workflow("in", [{"name": "step", "agentRef": "wf"}]))
    for kind, name in (("agent", "wf"), ("agent", "events"), ("workflow", "in")):
        wait_ready(cluster, namespace, kind, name)

    expected = {
        naming.inbox_subject(namespace, "wf", 0): naming.inbox_stream(namespace, "wf"),
        naming.dead_letter_subject(namespace, "wf"): naming.dead_letter_stream(namespace, "wf"),
        naming.dead_letter_subject(namespace, "events"): naming.dead_letter_stream(
            namespace, "events"
        ),
        naming.event_log_subject(namespace, "r1"): naming.event_log_stream(namespace),
        naming.workflow_subject(namespace, "in", "start", "r1"): naming.workflow_stream(
            namespace, "in"
        ),
    }
    assert {subject: _stored_by(cluster.nats_url, subject) for subject in expected} == expected


def test_status_shows_the_subjects_to_publish_to(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    apply(cluster, namespace, agent("ranked", messaging={"priorityLevels": 2}))
    manifest = workflow("flow", [{"name": "step", "agentRef": "ranked"}])
    apply(cluster, namespace, manifest)
    wait_ready(cluster, namespace, "agent", "ranked")
    wait_ready(cluster, namespace, "workflow", "flow")

    assert get(cluster, namespace, "agent", "ranked")["status"]["subjects"] == {
        "inbox": [naming.inbox_subject(namespace, "ranked", p) for p in (0, 1)],
        "deadLetters": naming.dead_letter_subject(namespace, "ranked"),
    }
    assert get(cluster, namespace, "workflow", "flow")["status"]["subjects"] == {
        "trigger": manifest["spec"]["trigger"]["subject"],
        "start": naming.workflow_subject(namespace, "flow", "start"),
    }


def test_a_state_bucket_named_ratelimits_leaves_the_rate_limits_alone(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    state = [{"name": "ratelimits", "history": 3}]
    limit = {"rate": 5, "burst": 5, "scope": "global"}
    apply(cluster, namespace, agent("limited", state=state, rateLimit=limit))
    wait_ready(cluster, namespace, "agent", "limited")
    state_bucket = naming.kv_bucket(namespace, "ratelimits")
    limits_bucket = naming.rate_limit_bucket(namespace)

    assert {naming.kv_stream(state_bucket), naming.kv_stream(limits_bucket)} <= stream_names(
        cluster.nats_url
    )
    assert stream_config(cluster.nats_url, naming.kv_stream(state_bucket)).max_msgs_per_subject == 3
    assert (
        stream_config(cluster.nats_url, naming.kv_stream(limits_bucket)).max_msgs_per_subject == 1
    )

    async def write_then_list(js: JetStreamContext) -> list[str]:
        await (await js.key_value(state_bucket)).put("limited", b"rewritten")
        try:
            return list(await (await js.key_value(limits_bucket)).keys())
        except NoKeysError:
            return []

    assert "limited" not in jetstream(cluster.nats_url, write_then_list)


async def _bucket_traffic(nats_url: str, stream: str, passes: int) -> list[str]:
    """The stream's update advisories seen while the operator reads the stream ``passes``
    times (each pass of each declaring Agent reads it once)."""
    connection = await nats.connect(nats_url)
    try:
        reads = await connection.subscribe(f"$JS.API.STREAM.INFO.{stream}")
        updates = await connection.subscribe(f"$JS.EVENT.ADVISORY.STREAM.UPDATED.{stream}")
        seen = 0
        deadline = time.monotonic() + DEADLINE
        while seen < passes:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"saw {seen} of {passes} operator reads of {stream}"
            await reads.next_msg(timeout=remaining)
            seen += 1
        found = []
        while True:
            try:
                found.append((await updates.next_msg(timeout=0.1)).subject)
            except nats.errors.TimeoutError:
                return found
    finally:
        await connection.close()


def test_two_agents_declaring_one_bucket_with_different_history_stop_undoing_each_other(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    # The second Agent comes once the first is Ready, so that each pass of either sees both.
    for name, history in (("most", 5), ("least", 2)):
        apply(cluster, namespace, agent(name, state=[{"name": "shared", "history": history}]))
        wait_ready(cluster, namespace, "agent", name)
    stream = naming.kv_stream(naming.kv_bucket(namespace, "shared"))

    # Two resyncs of both Agents at least: before, every pass rewrote the history.
    updates = asyncio.run(_bucket_traffic(cluster.nats_url, stream, passes=4))

    assert updates == []
    assert stream_config(cluster.nats_url, stream).max_msgs_per_subject == 5
