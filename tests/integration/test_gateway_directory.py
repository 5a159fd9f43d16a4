"""The gateway's directory as the operator keeps it, against a real API server, operator and
nats-server: each Agent and Workflow is listed under its key in the namespace's bucket with
what the spec resolves to and its readiness; a spec change rewrites it, an idle resync
writes nothing, junk is overwritten; deletion withdraws it, and the last object takes the
bucket with it."""

from __future__ import annotations

import urllib.request
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import StorageType
from nats.js.errors import NotFoundError

from tests.integration.operator_support import (
    OperatorProcess,
    agent,
    apply,
    explained,
    get,
    jetstream,
    stream_config,
    workflow,
)
from troupe_devcluster.fixtures import ClusterEndpoints, wait_for
from troupe_runtime.contract import naming
from troupe_runtime.contract.gateway import DirectoryEntry, TargetKind

DEADLINE = 45.0
IDLE_RESYNCS = 3
SCHEMA = {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}


def _stored(nats_url: str, namespace: str, kind: TargetKind, name: str) -> tuple[int, bytes] | None:
    """The key's revision and value; None when it, or the bucket, is absent."""

    async def read(js: JetStreamContext) -> tuple[int, bytes] | None:
        try:
            kv = await js.key_value(naming.directory_bucket(namespace))
            entry = await kv.get(naming.directory_key(kind, name))
        except NotFoundError:
            return None
        return entry.revision or 0, entry.value or b""

    return jetstream(nats_url, read)


def _entry(nats_url: str, namespace: str, kind: TargetKind, name: str) -> DirectoryEntry | None:
    stored = _stored(nats_url, namespace, kind, name)
    if stored is None:
        return None
    try:
        return DirectoryEntry.model_validate_json(stored[1])
    except ValueError:
        return None


def _put(nats_url: str, namespace: str, key: str, value: bytes) -> None:
    async def put(js: JetStreamContext) -> None:
        await (await js.key_value(naming.directory_bucket(namespace))).put(key, value)

    jetstream(nats_url, put)


def _bucket_exists(nats_url: str, namespace: str) -> bool:
    return stream_config(nats_url, naming.kv_stream(naming.directory_bucket(namespace))) is not None


def _agent_passes(operator: OperatorProcess) -> float:
    """The operator's Agent passes so far, from its metrics."""
    with urllib.request.urlopen(operator.metrics_url, timeout=5) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('troupe_operator_reconciles_total{kind="Agent"')
    )


def _ready_entry(
    cluster: ClusterEndpoints, namespace: str, kind: TargetKind, name: str, generation: int
) -> DirectoryEntry:
    def found() -> DirectoryEntry | None:
        entry = _entry(cluster.nats_url, namespace, kind, name)
        return entry if entry and entry.ready and entry.generation == generation else None

    found_entry: DirectoryEntry = wait_for(
        found, DEADLINE, f"the ready directory entry of {kind} {name} at generation {generation}"
    )
    return found_entry


def test_an_agent_is_listed_with_its_inbox_contract_and_readiness(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    with explained(cluster, namespace, operator):
        apply(
            cluster,
            namespace,
            agent(
                "summariser",
                role="Summarise documents",
                description="Cuts at 10k words.",
                contract={"inputSchema": SCHEMA, "outputSchema": {"type": "string"}},
            ),
        )

        entry = _ready_entry(cluster, namespace, "Agent", "summariser", 1)

        assert entry.kind == "Agent"
        assert (entry.namespace, entry.name) == (namespace, "summariser")
        assert entry.subject == naming.inbox_subject(namespace, "summariser", 0)
        assert entry.description == "Summarise documents\n\nCuts at 10k words."
        assert entry.input_schema == SCHEMA
        assert entry.output_schema == {"type": "string"}
        assert not entry.streaming
        bucket = stream_config(
            cluster.nats_url, naming.kv_stream(naming.directory_bucket(namespace))
        )
        assert bucket.max_msgs_per_subject == 1
        assert bucket.storage == StorageType.FILE


def test_a_spec_change_rewrites_the_entry(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    with explained(cluster, namespace, operator):
        apply(cluster, namespace, agent("writer", role="Writes"))
        _ready_entry(cluster, namespace, "Agent", "writer", 1)

        apply(
            cluster,
            namespace,
            agent("writer", role="Writes reports", contract={"inputSchema": SCHEMA}),
        )

        entry = _ready_entry(cluster, namespace, "Agent", "writer", 2)
        assert entry.description == "Writes reports"
        assert entry.input_schema == SCHEMA


def test_an_idle_resync_writes_nothing_and_junk_is_overwritten(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    with explained(cluster, namespace, operator):
        apply(cluster, namespace, agent("idle"))
        entry = _ready_entry(cluster, namespace, "Agent", "idle", 1)
        stored = _stored(cluster.nats_url, namespace, "Agent", "idle")
        assert stored is not None
        agents = len(cluster.kubectl("get", "agents", "-A", "-o", "name").split())
        passes = _agent_passes(operator)

        # Every resync passes every Agent: wait for as many passes as IDLE_RESYNCS resyncs.
        wait_for(
            lambda: _agent_passes(operator) >= passes + IDLE_RESYNCS * agents,
            DEADLINE,
            f"{IDLE_RESYNCS} resyncs",
        )

        assert _stored(cluster.nats_url, namespace, "Agent", "idle") == stored
        key = naming.directory_key("Agent", "idle")
        _put(cluster.nats_url, namespace, key, b'{"kind": "Agent", "subject": ' + b"[" * 5000)

        wait_for(
            lambda: _entry(cluster.nats_url, namespace, "Agent", "idle") == entry,
            DEADLINE,
            "the junk entry to be overwritten",
        )


def test_a_workflow_is_listed_with_its_start_subject(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    with explained(cluster, namespace, operator):
        apply(cluster, namespace, agent("step"))
        apply(
            cluster,
            namespace,
            workflow(
                "pipeline", [{"name": "one", "agentRef": "step"}], description="Runs one step"
            ),
        )

        entry = wait_for(
            lambda: _entry(cluster.nats_url, namespace, "Workflow", "pipeline"),
            DEADLINE,
            "the Workflow's directory entry",
        )

        assert entry.kind == "Workflow"
        assert entry.subject == naming.workflow_subject(namespace, "pipeline", "start", "*")
        assert entry.description == "Runs one step"
        assert entry.input_schema is None
        assert (
            entry.generation
            == get(cluster, namespace, "workflow", "pipeline")["metadata"]["generation"]
        )


def test_deletion_withdraws_the_entry_and_the_last_object_takes_the_bucket(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    with explained(cluster, namespace, operator):
        apply(cluster, namespace, agent("first"))
        apply(cluster, namespace, workflow("flow", [{"name": "one", "agentRef": "first"}]))
        _ready_entry(cluster, namespace, "Agent", "first", 1)
        wait_for(
            lambda: _entry(cluster.nats_url, namespace, "Workflow", "flow"),
            DEADLINE,
            "the Workflow's directory entry",
        )

        cluster.kubectl("delete", "agent", "first", "-n", namespace)

        wait_for(
            lambda: _stored(cluster.nats_url, namespace, "Agent", "first") is None,
            DEADLINE,
            "the Agent's entry to be withdrawn",
        )
        assert _bucket_exists(cluster.nats_url, namespace)
        assert _entry(cluster.nats_url, namespace, "Workflow", "flow") is not None

        cluster.kubectl("delete", "workflow", "flow", "-n", namespace)

        wait_for(
            lambda: not _bucket_exists(cluster.nats_url, namespace),
            DEADLINE,
            "the directory bucket to go with the last object",
        )


def test_an_entry_left_by_a_retained_agent_is_swept(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    """A Retain deletion has no finalizer: the resync's sweep withdraws the entry."""
    with explained(cluster, namespace, operator):
        apply(cluster, namespace, agent("keeper"))
        apply(cluster, namespace, agent("kept", deletionPolicy="Retain"))
        _ready_entry(cluster, namespace, "Agent", "kept", 1)

        cluster.kubectl("delete", "agent", "kept", "-n", namespace)

        wait_for(
            lambda: _stored(cluster.nats_url, namespace, "Agent", "kept") is None,
            DEADLINE,
            "the retained Agent's entry to be swept",
        )
        subjects = _subjects(cluster.nats_url, namespace)
        wait_for(
            lambda: (
                f"$KV.{naming.directory_bucket(namespace)}.agents.kept"
                not in _subjects(cluster.nats_url, namespace)
            ),
            DEADLINE,
            f"the purge marker to be swept too (subjects {subjects})",
        )


def _subjects(nats_url: str, namespace: str) -> dict[str, Any]:
    bucket = naming.directory_bucket(namespace)

    async def read(js: JetStreamContext) -> dict[str, Any]:
        info = await js.stream_info(naming.kv_stream(bucket), subjects_filter=">")
        return dict(info.state.subjects or {})

    return jetstream(nats_url, read)
