"""The operator against a real control plane and NATS: Agents become Deployments, ConfigMaps
and JetStream resources; status tells the truth; changes roll out; deletion cleans up; a
killed operator converges after a restart."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from nats.js import JetStreamContext

from tests.integration.operator_support import (
    OperatorProcess,
    agent,
    apply,
    condition,
    consumer_config,
    get,
    jetstream,
    stream_config,
    stream_names,
    wait_ready,
    workflow,
)
from troupe_devcluster.fixtures import ClusterEndpoints, create_namespace, wait_for
from troupe_devcluster.kube import apps_v1, core_v1
from troupe_runtime.contract import naming
from troupe_runtime.nats.provision import chaos_bucket_config

DEADLINE = 45.0
CONFIG_HASH = "troupe.dev/config-hash"


def _inbox(namespace: str, name: str) -> str:
    return f"TROUPE_{namespace}_{name}"


def _ready_at_generation(cluster: ClusterEndpoints, namespace: str, kind: str, name: str) -> bool:
    body = get(cluster, namespace, kind, name)
    ready = condition(body)
    generation = body["metadata"]["generation"]
    return (
        ready is not None
        and ready["status"] == "True"
        and body["status"]["observedGeneration"] == generation
        and ready["observedGeneration"] == generation
    )


def _http_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def _deployment(api_client: Any, namespace: str, name: str) -> Any:
    return apps_v1(api_client).read_namespaced_deployment(name, namespace)


def test_applied_agent_gets_its_objects_and_jetstream_resources_and_turns_ready(
    cluster: ClusterEndpoints, api_client: Any, operator: OperatorProcess
) -> None:
    # A restricted namespace also proves the pods pass the restricted Pod Security profile.
    namespace = create_namespace(
        api_client, labels={"pod-security.kubernetes.io/enforce": "restricted"}
    )
    try:
        apply(
            cluster, namespace, agent("writer", state=[{"name": "notes"}], runtime={"replicas": 2})
        )

        wait_ready(cluster, namespace, "agent", "writer")

        deployment = _deployment(api_client, namespace, "writer")
        assert deployment.status.ready_replicas == 2
        assert deployment.metadata.owner_references[0].kind == "Agent"
        config_map = core_v1(api_client).read_namespaced_config_map(
            naming.agent_config_map("writer"), namespace
        )
        assert json.loads(config_map.data["config.json"])["agent"] == "writer"
        assert {
            _inbox(namespace, "writer"),
            f"TROUPE_DLQ_{namespace}_writer",
            naming.kv_stream(naming.kv_bucket(namespace, "notes")),
            f"TROUPE_EVENTS_{namespace}",
        } <= stream_names(cluster.nats_url)
        assert consumer_config(cluster.nats_url, _inbox(namespace, "writer"), "writer_p0")
        status = get(cluster, namespace, "agent", "writer")["status"]
        assert (status["readyReplicas"], status["lag"], status["deadLetters"]) == (2, 0, 0)
        listing = cluster.kubectl("get", "ag", "-n", namespace)
        assert listing.split("\n")[1].split()[:4] == ["writer", "True", "Ready", "2"]
    finally:
        core_v1(api_client).delete_namespace(namespace)


def test_spec_change_rolls_the_pods_and_updates_stream_and_consumer(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, operator: OperatorProcess
) -> None:
    apply(cluster, namespace, agent("editor"))
    wait_ready(cluster, namespace, "agent", "editor")
    first_hash = _deployment(api_client, namespace, "editor").spec.template.metadata.annotations[
        CONFIG_HASH
    ]

    changed = agent(
        "editor",
        messaging={"ackWait": "45s"},
        timeout="20s",  # timeout + 10s must fit into 70% of ackWait
        retry={"maxAttempts": 5},
        deadLetter={"retention": "24h"},
    )
    apply(cluster, namespace, changed)

    wait_for(
        lambda: _ready_at_generation(cluster, namespace, "agent", "editor"),
        DEADLINE,
        "Ready at generation 2",
    )
    template = _deployment(api_client, namespace, "editor").spec.template
    assert template.metadata.annotations[CONFIG_HASH] != first_hash
    replica_sets = apps_v1(api_client).list_namespaced_replica_set(namespace).items
    assert len(replica_sets) == 2
    consumer = consumer_config(cluster.nats_url, _inbox(namespace, "editor"), "editor_p0")
    assert (consumer.ack_wait, consumer.max_deliver) == (45.0, 5 + 1)  # attempts + 1
    assert stream_config(cluster.nats_url, f"TROUPE_DLQ_{namespace}_editor").max_age == 86400.0


def test_deleting_an_agent_removes_its_objects_and_nats_resources(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, operator: OperatorProcess
) -> None:
    apply(cluster, namespace, agent("reader", state=[{"name": "cache"}]))
    wait_ready(cluster, namespace, "agent", "reader")
    # A runtime makes the chaos bucket to watch its key (these pods run on kwok, so the test
    # makes it as one would); the namespace's last Agent takes it along.
    chaos = naming.kv_stream(naming.chaos_bucket(namespace))

    async def watched(js: JetStreamContext) -> None:
        await js.create_key_value(chaos_bucket_config(namespace))

    jetstream(cluster.nats_url, watched)

    cluster.kubectl("delete", "-n", namespace, "agent/reader", "--timeout=45s")

    ours = {
        _inbox(namespace, "reader"),
        f"TROUPE_DLQ_{namespace}_reader",
        naming.kv_stream(naming.kv_bucket(namespace, "cache")),
        chaos,
        f"TROUPE_EVENTS_{namespace}",
    }
    wait_for(
        lambda: not ours & stream_names(cluster.nats_url), DEADLINE, "the agent's streams to go"
    )
    apps, core = apps_v1(api_client), core_v1(api_client)
    wait_for(
        lambda: (
            not apps.list_namespaced_deployment(namespace).items
            and not core.list_namespaced_config_map(
                namespace, label_selector="troupe.dev/agent"
            ).items
        ),
        DEADLINE,
        "the Deployment and ConfigMap to be garbage-collected",
    )


def test_retain_policy_keeps_the_streams_and_needs_no_finalizer(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    apply(cluster, namespace, agent("keeper", deletionPolicy="Retain"))
    wait_ready(cluster, namespace, "agent", "keeper")
    assert not get(cluster, namespace, "agent", "keeper")["metadata"].get("finalizers")

    cluster.kubectl("delete", "-n", namespace, "agent/keeper", "--timeout=45s")

    inbox, dead_letters = _inbox(namespace, "keeper"), f"TROUPE_DLQ_{namespace}_keeper"
    try:
        assert {inbox, dead_letters} <= stream_names(cluster.nats_url)
    finally:

        async def remove(js: JetStreamContext) -> None:
            for stream in (inbox, dead_letters, f"TROUPE_EVENTS_{namespace}"):
                await js.delete_stream(stream)

        jetstream(cluster.nats_url, remove)


def test_a_shared_bucket_stays_until_the_last_agent_declaring_it_goes(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    bucket = naming.kv_stream(naming.kv_bucket(namespace, "shared"))
    for name in ("first", "second"):
        apply(cluster, namespace, agent(name, state=[{"name": "shared"}]))
    for name in ("first", "second"):
        wait_ready(cluster, namespace, "agent", name)

    cluster.kubectl("delete", "-n", namespace, "agent/first", "--timeout=45s")
    assert bucket in stream_names(cluster.nats_url)

    cluster.kubectl("delete", "-n", namespace, "agent/second", "--timeout=45s")
    wait_for(lambda: bucket not in stream_names(cluster.nats_url), DEADLINE, f"{bucket} to go")


def test_jetstream_drift_is_corrected_by_the_resync(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    apply(cluster, namespace, agent("drifter"))
    wait_ready(cluster, namespace, "agent", "drifter")
    inbox, dead_letters = _inbox(namespace, "drifter"), f"TROUPE_DLQ_{namespace}_drifter"

    async def tamper(js: JetStreamContext) -> None:
        await js.delete_consumer(inbox, "drifter_p0")
        await js.delete_stream(dead_letters)

    jetstream(cluster.nats_url, tamper)

    wait_for(
        lambda: (
            consumer_config(cluster.nats_url, inbox, "drifter_p0") is not None
            and dead_letters in stream_names(cluster.nats_url)
        ),
        DEADLINE,
        "the consumer and dead-letter stream to be recreated",
    )


def test_unreachable_nats_is_reported_and_the_agent_recovers_when_it_is_fixed(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    apply(cluster, namespace, agent("lonely", nats={"url": "nats://127.0.0.1:1"}))

    def unavailable() -> dict[str, Any] | None:
        ready = condition(get(cluster, namespace, "agent", "lonely"))
        return ready if ready and ready["reason"] == "MessagingUnavailable" else None

    ready = wait_for(unavailable, DEADLINE, "Ready=False with reason MessagingUnavailable")
    assert ready["status"] == "False"
    assert "nats://127.0.0.1:1" in ready["message"]
    assert operator.alive()

    apply(cluster, namespace, agent("lonely", nats={"url": cluster.nats_url}))
    wait_for(
        lambda: _ready_at_generation(cluster, namespace, "agent", "lonely"),
        DEADLINE,
        "Ready once NATS is reachable",
    )


def test_a_missing_secret_is_reported_by_name(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    manifest = agent(
        "secretive", deletionPolicy="Retain", nats={"credentialsSecret": {"name": "nats-user"}}
    )
    apply(cluster, namespace, manifest)

    def not_found() -> dict[str, Any] | None:
        ready = condition(get(cluster, namespace, "agent", "secretive"))
        return ready if ready and ready["reason"] == "SecretNotFound" else None

    ready = wait_for(not_found, DEADLINE, "Ready=False with reason SecretNotFound")
    assert "spec.nats.credentialsSecret: Secret nats-user does not exist" in ready["message"]


def test_operator_killed_midway_converges_after_restart(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, operator: OperatorProcess
) -> None:
    apply(cluster, namespace, agent("survivor"))
    wait_for(
        lambda: apps_v1(api_client).list_namespaced_deployment(namespace).items,
        DEADLINE,
        "the operator to start on the agent",
    )

    operator.kill()
    apply(cluster, namespace, agent("survivor", runtime={"replicas": 2}, retry={"maxAttempts": 7}))
    apply(cluster, namespace, agent("latecomer"))
    operator.start()

    for name in ("survivor", "latecomer"):
        wait_for(
            lambda name=name: _ready_at_generation(cluster, namespace, "agent", name),
            DEADLINE,
            f"{name} Ready at its latest generation",
        )
    assert _deployment(api_client, namespace, "survivor").status.ready_replicas == 2
    consumer = consumer_config(cluster.nats_url, _inbox(namespace, "survivor"), "survivor_p0")
    assert consumer.max_deliver == 7 + 1  # attempts + the delivery that dead-letters
    assert consumer_config(cluster.nats_url, _inbox(namespace, "latecomer"), "latecomer_p0")


def test_workflow_naming_an_unknown_agent_is_not_ready_until_the_agent_exists(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    apply(cluster, namespace, agent("drafter"))
    steps: list[dict[str, Any]] = [
        {"name": "draft", "agentRef": "drafter"},
        {"name": "review", "agentRef": "reviewer", "dependsOn": ["draft"]},
    ]
    apply(cluster, namespace, workflow("article", steps))

    def agent_not_found() -> dict[str, Any] | None:
        ready = condition(get(cluster, namespace, "workflow", "article"))
        return ready if ready and ready["reason"] == "AgentNotFound" else None

    ready = wait_for(agent_not_found, DEADLINE, "Ready=False with reason AgentNotFound")
    assert ready["status"] == "False"
    assert "reviewer (step review)" in ready["message"]

    apply(cluster, namespace, agent("reviewer"))
    wait_ready(cluster, namespace, "workflow", "article")


def test_workflow_with_a_cycle_is_not_ready_and_names_its_steps(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    apply(cluster, namespace, agent("worker"))
    steps: list[dict[str, Any]] = [
        {"name": "start", "agentRef": "worker"},
        {"name": "left", "agentRef": "worker", "dependsOn": ["start", "right"]},
        {"name": "right", "agentRef": "worker", "dependsOn": ["left"]},
    ]
    apply(cluster, namespace, workflow("loop", steps))

    def cycle_detected() -> dict[str, Any] | None:
        ready = condition(get(cluster, namespace, "workflow", "loop"))
        return ready if ready and ready["reason"] == "CycleDetected" else None

    ready = wait_for(cycle_detected, DEADLINE, "Ready=False with reason CycleDetected")
    assert ready["status"] == "False"
    assert any(
        cycle in ready["message"] for cycle in ("left -> right -> left", "right -> left -> right")
    )
    assert "start" not in ready["message"].split(":", 1)[1]
    assert get(cluster, namespace, "workflow", "loop")["status"]["steps"] == 3


def test_operator_counts_reconciles_in_its_metrics(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    apply(cluster, namespace, agent("counted"))
    wait_ready(cluster, namespace, "agent", "counted")

    metrics = _http_text(operator.metrics_url)

    assert 'troupe_operator_reconciles_total{kind="Agent",result="ok"}' in metrics
    assert "troupe_operator_reconcile_duration_seconds_bucket" in metrics
    assert _http_text(operator.health_url)
