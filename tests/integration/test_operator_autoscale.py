"""Autoscaled Agents against the real API server, controller-manager, process node and NATS:
an idle agent scales to zero and back for a message, which is handled exactly once; lag
above the target scales out; an HPA scaling the Deployment is never fought over replicas;
with KEDA's real CRD installed the generated ScaledObject is accepted; and a message to an
agent at zero wakes the autoscaler through its inbox."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nats
import pytest
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from tests.integration.operator_support import (
    OperatorProcess,
    agent,
    apply,
    condition,
    explained,
    get,
    jetstream,
    running_agent,
    wait_ready,
)
from troupe_devcluster.fixtures import ClusterEndpoints, wait_for
from troupe_devcluster.kube import apps_v1, core_v1
from troupe_operator.api.agent import AgentAutoscale
from troupe_operator.builders.autoscale import AUTOSCALER_MANAGER
from troupe_operator.builders.pods import FIELD_MANAGER
from troupe_operator.clients.nats import NatsPool, NatsTarget
from troupe_operator.reconcilers.autoscaler import Wakers
from troupe_operator.reconcilers.common import Autoscaled
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.envelope import CloudEvent

DEADLINE = 45.0
IDLE = "3s"
KEDA_CRD = Path(__file__).parent / "fixtures" / "keda.sh_scaledobjects.yaml"


def _established(cluster: ClusterEndpoints, crd: str) -> bool:
    """Whether the API server serves ``crd`` (its Established condition is True)."""
    found = json.loads(cluster.kubectl("get", f"crd/{crd}", "-o", "json"))
    conditions = (found.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)


"""KEDA v2.16.1's ScaledObject CRD, as its module ships it (config/crd/bases)."""


@pytest.fixture(scope="module")
def operator_env() -> dict[str, str]:
    return {"TROUPE_AUTOSCALE_SECONDS": "0.5", "TROUPE_CRD_RECHECK": "1"}


def _deployment(cluster: ClusterEndpoints, namespace: str, name: str) -> dict[str, Any]:
    """The Deployment with its managedFields (kubectl hides them unless asked)."""
    body: dict[str, Any] = json.loads(
        cluster.kubectl(
            "get", "-n", namespace, "deployment", name, "-o", "json", "--show-managed-fields"
        )
    )
    return body


def _replicas(cluster: ClusterEndpoints, namespace: str, name: str) -> int | None:
    """``spec.replicas``, or None while the operator has not made the Deployment yet (a
    condition polled right after the Agent is applied must wait, not fail)."""
    found = cluster.kubectl("get", "-n", namespace, "deployment", name, "-o", "json", check=False)
    if not found.strip():
        return None
    return int(json.loads(found)["spec"].get("replicas", 1))


def _replica_owners(deployment: dict[str, Any]) -> list[str]:
    return [
        entry["manager"]
        for entry in deployment["metadata"].get("managedFields", [])
        if "f:replicas" in (entry.get("fieldsV1") or {}).get("f:spec", {})
    ]


def _pods(api_client: Any, namespace: str, agent_name: str) -> list[Any]:
    selector = f"troupe.dev/agent={agent_name}"
    return list(core_v1(api_client).list_namespaced_pod(namespace, label_selector=selector).items)


def _event_reasons(api_client: Any, namespace: str, name: str) -> set[str]:
    listing = core_v1(api_client).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name},involvedObject.kind=Agent"
    )
    return {event.reason for event in listing.items}


def _publish(nats_url: str, namespace: str, name: str, data: Any, count: int = 1) -> None:
    async def publish(js: JetStreamContext) -> None:
        for _ in range(count):
            event = CloudEvent(id=uuid.uuid4().hex, source="/tests", type="test.input", data=data)
            headers, payload = envelope.to_binary(event)
            await js.publish(naming.inbox_subject(namespace, name, 0), payload, headers=headers)

    jetstream(nats_url, publish)


def _outputs(nats_url: str, stream: str) -> list[Any]:
    async def read(js: JetStreamContext) -> list[Any]:
        found = []
        for seq in range(1, (await js.stream_info(stream)).state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            found.append(envelope.parse(msg.headers, msg.data or b"").data)
        return found

    return jetstream(nats_url, read)


@pytest.fixture
def output_stream(cluster: ClusterEndpoints, namespace: str) -> Iterator[tuple[str, str]]:
    subject, stream = f"out.{namespace}.autoscaled", f"OUT_{namespace}"

    async def add(js: JetStreamContext) -> None:
        await js.add_stream(StreamConfig(name=stream, subjects=[subject]))

    async def remove(js: JetStreamContext) -> None:
        await js.delete_stream(stream)

    jetstream(cluster.nats_url, add)
    yield subject, stream
    jetstream(cluster.nats_url, remove)


def test_an_idle_agent_scales_to_zero_and_back_and_its_message_is_handled_exactly_once(
    cluster: ClusterEndpoints,
    api_client: Any,
    namespace: str,
    operator: OperatorProcess,
    output_stream: tuple[str, str],
) -> None:
    subject, stream = output_stream
    policy = {"minReplicas": 0, "maxReplicas": 2, "scaleToZeroAfter": IDLE}
    manifest = running_agent(
        "sleeper", contract={"outputSubjects": [subject]}, runtime={"autoscale": policy}
    )
    with explained(cluster, namespace, operator):
        apply(cluster, namespace, manifest)
        wait_ready(cluster, namespace, "agent", "sleeper")

        wait_for(lambda: _replicas(cluster, namespace, "sleeper") == 0, DEADLINE, "scaled to zero")

        def ready_at_zero() -> bool:
            body = get(cluster, namespace, "agent", "sleeper")
            ready, scaled = condition(body), condition(body, "Autoscaled")
            autoscale = body["status"].get("autoscale") or {}
            return bool(
                ready
                and ready["status"] == "True"
                and scaled
                and scaled["reason"] == "ScaledToZero"
                and autoscale.get("desiredReplicas") == 0
            )

        # At zero by design, the Agent is Ready, not Reconciling forever.
        wait_for(ready_at_zero, DEADLINE, "Ready at zero replicas")
        wait_for(
            lambda: "ScaledToZero" in _event_reasons(api_client, namespace, "sleeper"),
            DEADLINE,
            "a ScaledToZero Event",
        )
        assert _replica_owners(_deployment(cluster, namespace, "sleeper")) == [AUTOSCALER_MANAGER]

        # The last pod stops gracefully: until it is gone it may still take the message.
        wait_for(lambda: not _pods(api_client, namespace, "sleeper"), DEADLINE, "no pods left")
        published = time.monotonic()
        _publish(cluster.nats_url, namespace, "sleeper", ["hi"])
        outputs = wait_for(lambda: _outputs(cluster.nats_url, stream), DEADLINE, "the output")
        print(f"scale-from-zero: processed {time.monotonic() - published:.1f}s after publish")

        assert outputs == [["hi", "sleeper"]]
        wait_for(
            lambda: "ScaledFromZero" in _event_reasons(api_client, namespace, "sleeper"),
            DEADLINE,
            "a ScaledFromZero Event",
        )

        def settled() -> bool:
            status = get(cluster, namespace, "agent", "sleeper")["status"]
            return bool(status["lag"] == 0 and status["consumers"]["pending"] == 0)

        wait_for(settled, DEADLINE, "the message acknowledged")
        # Idle again, it goes back to zero; the one message was handled once, none lost.
        wait_for(lambda: _replicas(cluster, namespace, "sleeper") == 0, DEADLINE, "zero again")
        assert _outputs(cluster.nats_url, stream) == [["hi", "sleeper"]]
        assert get(cluster, namespace, "agent", "sleeper")["status"]["deadLetters"] == 0


def test_a_message_sent_while_the_operator_is_down_wakes_the_agent_after_its_restart(
    cluster: ClusterEndpoints,
    api_client: Any,
    namespace: str,
    operator: OperatorProcess,
    output_stream: tuple[str, str],
) -> None:
    subject, stream = output_stream
    policy = {"minReplicas": 0, "maxReplicas": 1, "scaleToZeroAfter": IDLE}
    manifest = running_agent(
        "dozer", contract={"outputSubjects": [subject]}, runtime={"autoscale": policy}
    )
    with explained(cluster, namespace, operator):
        apply(cluster, namespace, manifest)
        wait_for(lambda: _replicas(cluster, namespace, "dozer") == 0, DEADLINE, "at zero")
        wait_for(lambda: not _pods(api_client, namespace, "dozer"), DEADLINE, "no pods left")

        operator.kill()
        try:
            _publish(cluster.nats_url, namespace, "dozer", ["late"])
        finally:
            # The new operator knows nothing of the old one's memory: it finds the Agent on
            # resume and decides from the consumer's count alone.
            operator.start()
        outputs = wait_for(lambda: _outputs(cluster.nats_url, stream), DEADLINE, "the output")
        assert outputs == [["late", "dozer"]]


def test_lag_above_the_target_scales_out_under_the_autoscalers_field_manager(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, operator: OperatorProcess
) -> None:
    # kwok pods never consume: the backlog stays, and so does the decision.
    policy = {"minReplicas": 1, "maxReplicas": 3, "targetPending": 2}
    apply(cluster, namespace, agent("busy", runtime={"replicas": 1, "autoscale": policy}))
    wait_ready(cluster, namespace, "agent", "busy")

    _publish(cluster.nats_url, namespace, "busy", ["work"], count=5)

    wait_for(lambda: _replicas(cluster, namespace, "busy") == 3, DEADLINE, "3 replicas")
    deployment = _deployment(cluster, namespace, "busy")
    assert _replica_owners(deployment) == [AUTOSCALER_MANAGER]

    def reported() -> dict[str, Any] | None:
        autoscale = get(cluster, namespace, "agent", "busy")["status"].get("autoscale") or {}
        return autoscale if autoscale.get("desiredReplicas") == 3 else None

    autoscale = wait_for(reported, DEADLINE, "status.autoscale.desiredReplicas 3")
    assert autoscale["lag"] == 5
    assert "ScaledUp" in _event_reasons(api_client, namespace, "busy")


def test_fixed_replicas_become_autoscaled_without_falling_back_to_one_pod(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, operator: OperatorProcess
) -> None:
    apply(cluster, namespace, agent("steady", runtime={"replicas": 3}))
    wait_ready(cluster, namespace, "agent", "steady")
    first = _deployment(cluster, namespace, "steady")
    assert _replica_owners(first) == [FIELD_MANAGER]

    policy = {"minReplicas": 3, "maxReplicas": 4}
    apply(cluster, namespace, agent("steady", runtime={"replicas": 3, "autoscale": policy}))

    wait_for(
        lambda: _replica_owners(_deployment(cluster, namespace, "steady")) == [AUTOSCALER_MANAGER],
        DEADLINE,
        "replicas handed over to the autoscaler",
    )
    # Had the operator dropped replicas before the autoscaler owned them, the Deployment
    # would have gone to its default of 1 (a new generation) and back to 3 (another).
    after = _deployment(cluster, namespace, "steady")
    assert after["spec"]["replicas"] == 3
    assert after["metadata"]["generation"] == first["metadata"]["generation"]


def _hpa(name: str, target: str, min_replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
            "minReplicas": min_replicas,
            "maxReplicas": min_replicas + 1,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": 80},
                    },
                }
            ],
        },
    }


def test_an_hpa_scaling_the_deployment_is_never_fought_over_replicas(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, operator: OperatorProcess
) -> None:
    apply(cluster, namespace, agent("scaled", runtime={"replicas": 1}))
    wait_ready(cluster, namespace, "agent", "scaled")

    # The real HPA controller raises replicas to its minimum (no metrics needed for that).
    apply(cluster, namespace, _hpa("scaled-hpa", "scaled", min_replicas=2))
    wait_for(lambda: _replicas(cluster, namespace, "scaled") == 2, DEADLINE, "the HPA's 2")

    def externally() -> dict[str, Any] | None:
        found = condition(get(cluster, namespace, "agent", "scaled"), "Autoscaled")
        return found if found and found["reason"] == "ScaledExternally" else None

    said = wait_for(externally, DEADLINE, "Autoscaled ScaledExternally")
    assert "HorizontalPodAutoscaler scaled-hpa" in said["message"]
    # A spec change and resyncs later, replicas are still the HPA's, and Troupe owns none.
    apply(cluster, namespace, agent("scaled", runtime={"replicas": 5}))
    generation = get(cluster, namespace, "agent", "scaled")["metadata"]["generation"]
    wait_for(
        lambda: (
            get(cluster, namespace, "agent", "scaled")["status"]["observedGeneration"] == generation
        ),
        DEADLINE,
        "the changed spec observed",
    )
    resyncs = time.monotonic() + 7  # two resyncs of the test operator (3 s each)
    while time.monotonic() < resyncs:
        deployment = _deployment(cluster, namespace, "scaled")
        assert deployment["spec"]["replicas"] == 2
        assert FIELD_MANAGER not in _replica_owners(deployment)
        assert AUTOSCALER_MANAGER not in _replica_owners(deployment)
        time.sleep(0.5)


def test_engine_keda_reports_keda_missing_then_generates_a_scaled_object_the_api_accepts(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, operator: OperatorProcess
) -> None:
    policy = {"engine": "keda", "minReplicas": 0, "maxReplicas": 3}
    apply(cluster, namespace, agent("kedaed", runtime={"autoscale": policy}))

    def autoscaled(reason: str) -> dict[str, Any] | None:
        found = condition(get(cluster, namespace, "agent", "kedaed"), "Autoscaled")
        return found if found and found["reason"] == reason else None

    missing = wait_for(lambda: autoscaled("KedaMissing"), DEADLINE, "KedaMissing")
    assert missing["status"] == "False"
    wait_ready(cluster, namespace, "agent", "kedaed")

    cluster.kubectl("apply", "--server-side", "-f", str(KEDA_CRD))
    try:
        # Polled, not kubectl wait: on a CRD the API server has not given conditions yet,
        # kubectl wait fails at once (".status.conditions accessor error") instead of waiting.
        wait_for(lambda: _established(cluster, "scaledobjects.keda.sh"), DEADLINE, "Established")
        wait_for(lambda: autoscaled("ScaledByKeda"), DEADLINE, "ScaledByKeda")
        scaled = json.loads(
            cluster.kubectl("get", "-n", namespace, "scaledobjects.keda.sh", "kedaed", "-o", "json")
        )
        assert scaled["metadata"]["ownerReferences"][0]["kind"] == "Agent"
        spec = scaled["spec"]
        assert spec["scaleTargetRef"]["name"] == "kedaed"
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (0, 3)
        trigger = spec["triggers"][0]
        assert trigger["type"] == "nats-jetstream"
        assert trigger["metadata"]["stream"] == naming.inbox_stream(namespace, "kedaed")
        assert trigger["metadata"]["consumer"] == naming.consumer_name("kedaed", 0)
        assert FIELD_MANAGER not in _replica_owners(_deployment(cluster, namespace, "kedaed"))

        # Back to the native engine: the ScaledObject goes.
        native = {"minReplicas": 1, "maxReplicas": 3}
        apply(cluster, namespace, agent("kedaed", runtime={"autoscale": native}))
        wait_for(
            lambda: (
                not cluster.kubectl(
                    "get", "-n", namespace, "scaledobjects.keda.sh", "-o", "name"
                ).strip()
            ),
            DEADLINE,
            "the ScaledObject deleted",
        )
    finally:
        cluster.kubectl("delete", "-f", str(KEDA_CRD), "--wait=true")
    assert apps_v1(api_client).read_namespaced_deployment("kedaed", namespace)


async def test_a_message_to_an_agent_at_zero_wakes_the_autoscaler_through_its_inbox(
    nats_url: str,
) -> None:
    """The core-NATS wake-up against a real nats-server: only an agent at zero is watched,
    a message on its inbox sets the event at once, and the watch goes once it is scaled."""
    pool = NatsPool()
    target = NatsTarget(nats_url)
    policy = AgentAutoscale.model_validate({"minReplicas": 0})
    resources: Any = None
    asleep = Autoscaled(target, resources, policy, 0, None)
    awake = Autoscaled(target, resources, policy, 1, None)
    operator: Any = SimpleNamespace(
        nats=pool, autoscaled={("ns", "asleep"): asleep, ("ns", "awake"): awake}
    )
    wakers = Wakers()
    publisher = await nats.connect(nats_url)
    try:
        await wakers.refresh(operator)
        assert set(wakers.watches) == {("ns", "asleep")}

        await publisher.publish(naming.inbox_subject("ns", "awake", 0), b"{}")
        await publisher.flush()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(wakers.woken.wait(), 0.5)

        await publisher.publish(naming.inbox_subject("ns", "asleep", 2), b"{}")
        await asyncio.wait_for(wakers.woken.wait(), 5)

        operator.autoscaled[("ns", "asleep")] = awake
        await wakers.refresh(operator)
        assert not wakers.watches
    finally:
        await wakers.close()
        await publisher.close()
        await pool.close()
