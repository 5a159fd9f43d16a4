"""Smoke tests that prove the local cluster is real: controllers reconcile,
the scheduler binds, kwok and the process node report honest pod status,
admission enforces policy and JetStream checks revisions."""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from typing import Any

import nats
import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from nats.js.api import StreamConfig
from nats.js.errors import KeyWrongLastSequenceError

from tests.integration import manifests
from troupe_devcluster.fixtures import ClusterEndpoints, create_namespace, wait_for
from troupe_devcluster.kube import apps_v1, core_v1
from troupe_devcluster.layout import PROCESS_NODE_NAME
from troupe_devcluster.processes import alive

DEADLINE = 60.0


def _apply(cluster: ClusterEndpoints, namespace: str, manifest: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(manifest))


def _available(apps: Any, namespace: str, name: str, replicas: int) -> bool:
    status = apps.read_namespaced_deployment(name, namespace).status
    return (status.available_replicas or 0) == replicas


def _pods(core: Any, namespace: str, app: str) -> list[Any]:
    return list(core.list_namespaced_pod(namespace, label_selector=f"app={app}").items)


def _ready(pod: Any) -> bool:
    conditions = pod.status.conditions or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def _pid(pod: Any) -> int:
    container_id: str = pod.status.container_statuses[0].container_id
    return int(container_id.removeprefix("process://"))


def _http_get(ip: str, port: int) -> int:
    with urllib.request.urlopen(f"http://{ip}:{port}/", timeout=5) as response:
        return int(response.status)


def test_api_server_reports_the_stamped_kubernetes_version(api_client: Any) -> None:
    version = client.VersionApi(api_client).get_code()
    assert version.git_version.startswith("v1.36.")
    assert (version.major, version.minor) == ("1", "36")


def test_deployment_on_kwok_nodes_becomes_available(
    cluster: ClusterEndpoints, api_client: Any, namespace: str
) -> None:
    apps, core = apps_v1(api_client), core_v1(api_client)
    _apply(cluster, namespace, manifests.kwok_deployment("fake", replicas=3))

    wait_for(lambda: _available(apps, namespace, "fake", 3), DEADLINE, "3 available replicas")

    replica_sets = apps.list_namespaced_replica_set(namespace).items
    assert [rs.metadata.owner_references[0].name for rs in replica_sets] == ["fake"]
    pods = _pods(core, namespace, "fake")
    assert len(pods) == 3
    assert all(pod.spec.node_name.startswith("kwok-node-") for pod in pods)
    assert all(_ready(pod) for pod in pods)


def test_deployment_on_process_node_runs_a_real_server_behind_its_readiness_probe(
    cluster: ClusterEndpoints, api_client: Any, namespace: str
) -> None:
    apps, core = apps_v1(api_client), core_v1(api_client)
    _apply(cluster, namespace, manifests.http_server_deployment("web", replicas=2))

    wait_for(lambda: _available(apps, namespace, "web", 2), DEADLINE, "2 available replicas")

    pods = _pods(core, namespace, "web")
    assert {pod.spec.node_name for pod in pods} == {PROCESS_NODE_NAME}
    assert len({pod.status.pod_ip for pod in pods}) == 2
    for pod in pods:
        assert pod.status.phase == "Running"
        assert alive(_pid(pod))
        assert _http_get(pod.status.pod_ip, 8080) == 200


def test_deleting_a_process_node_pod_stops_its_process_and_a_replacement_starts(
    cluster: ClusterEndpoints, api_client: Any, namespace: str
) -> None:
    apps, core = apps_v1(api_client), core_v1(api_client)
    _apply(cluster, namespace, manifests.http_server_deployment("web"))
    wait_for(lambda: _available(apps, namespace, "web", 1), DEADLINE, "an available replica")
    (old,) = _pods(core, namespace, "web")
    old_pid = _pid(old)

    core.delete_namespaced_pod(old.metadata.name, namespace)

    wait_for(lambda: not alive(old_pid), DEADLINE, f"process {old_pid} to stop")
    replacement = wait_for(
        lambda: [
            pod
            for pod in _pods(core, namespace, "web")
            if pod.metadata.uid != old.metadata.uid and _ready(pod)
        ],
        DEADLINE,
        "a ready replacement pod",
    )[0]
    assert _pid(replacement) != old_pid
    assert _http_get(replacement.status.pod_ip, 8080) == 200


def test_deleting_a_deployment_garbage_collects_its_replica_sets_and_pods(
    cluster: ClusterEndpoints, api_client: Any, namespace: str
) -> None:
    apps, core = apps_v1(api_client), core_v1(api_client)
    _apply(cluster, namespace, manifests.kwok_deployment("fake", replicas=2))
    wait_for(lambda: _available(apps, namespace, "fake", 2), DEADLINE, "2 available replicas")

    apps.delete_namespaced_deployment("fake", namespace, propagation_policy="Background")

    wait_for(
        lambda: (
            not apps.list_namespaced_replica_set(namespace).items
            and not _pods(core, namespace, "fake")
        ),
        DEADLINE,
        "the ReplicaSet and pods to be garbage-collected",
    )


def test_deleting_a_namespace_removes_its_pods(cluster: ClusterEndpoints, api_client: Any) -> None:
    apps, core = apps_v1(api_client), core_v1(api_client)
    namespace = create_namespace(api_client)
    _apply(cluster, namespace, manifests.kwok_deployment("fake", replicas=2))
    _apply(cluster, namespace, manifests.http_server_deployment("web"))
    wait_for(lambda: _available(apps, namespace, "fake", 2), DEADLINE, "kwok replicas")
    wait_for(lambda: _available(apps, namespace, "web", 1), DEADLINE, "a process-node replica")
    web_pid = _pid(_pods(core, namespace, "web")[0])

    core.delete_namespace(namespace)

    def namespace_gone() -> bool:
        try:
            core.read_namespace(namespace)
        except ApiException as error:
            return bool(error.status == 404)
        return False

    # The namespace controller only removes the namespace once its pods are gone.
    wait_for(namespace_gone, DEADLINE * 2, f"namespace {namespace} to be removed")
    assert not core.list_namespaced_pod(namespace).items
    assert not alive(web_pid)


def test_cel_validation_rule_rejects_a_bad_object_with_its_message(
    cluster: ClusterEndpoints, api_client: Any, namespace: str
) -> None:
    group = f"g{uuid.uuid4().hex[:8]}.troupe.dev"
    cluster.kubectl("apply", "-f", "-", stdin=json.dumps(manifests.range_crd(group)))
    cluster.kubectl("wait", "--for=condition=Established", f"crd/ranges.{group}", "--timeout=60s")

    def range_object(name: str, low: int, high: int) -> str:
        return json.dumps(
            {
                "apiVersion": f"{group}/v1",
                "kind": "Range",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"min": low, "max": high},
            }
        )

    try:
        cluster.kubectl("apply", "-f", "-", stdin=range_object("good", 1, 2))
        refusal = cluster.kubectl("apply", "-f", "-", stdin=range_object("bad", 3, 2), check=False)
        assert "spec.min must not exceed spec.max" in refusal
        assert "bad" not in cluster.kubectl("get", f"ranges.{group}", "-n", namespace, "-o", "name")
    finally:
        cluster.kubectl("delete", f"crd/ranges.{group}", "--wait=false")


def test_restricted_namespace_refuses_a_privileged_pod(api_client: Any) -> None:
    core = core_v1(api_client)
    namespace = create_namespace(
        api_client, labels={"pod-security.kubernetes.io/enforce": "restricted"}
    )
    try:
        with pytest.raises(ApiException) as refused:
            core.create_namespaced_pod(namespace, manifests.privileged_pod("root"))
        assert refused.value.status == 403
        message = json.loads(str(refused.value.body))["message"]
        assert 'violates PodSecurity "restricted:latest"' in message
        assert "privileged" in message
    finally:
        core.delete_namespace(namespace)


async def test_jetstream_refuses_a_kv_update_with_a_stale_revision(
    cluster: ClusterEndpoints,
) -> None:
    connection = await nats.connect(cluster.nats_url)
    try:
        js = connection.jetstream()
        bucket = f"smoke_{uuid.uuid4().hex[:8]}"
        kv = await js.create_key_value(bucket=bucket)
        first = await kv.put("counter", b"1")
        second = await kv.update("counter", b"2", last=first)
        assert second > first

        with pytest.raises(KeyWrongLastSequenceError):
            await kv.update("counter", b"stale", last=first)

        entry = await kv.get("counter")
        assert (entry.value, entry.revision) == (b"2", second)
        await js.delete_key_value(bucket)
    finally:
        await connection.close()


async def test_jetstream_expires_a_message_by_its_per_message_ttl(
    cluster: ClusterEndpoints,
) -> None:
    connection = await nats.connect(cluster.nats_url)
    try:
        js = connection.jetstream()
        stream = f"ttl_{uuid.uuid4().hex[:8]}"
        await js.add_stream(StreamConfig(name=stream, subjects=[f"{stream}.>"], allow_msg_ttl=True))
        await js.publish(f"{stream}.short", b"gone soon", msg_ttl=1)
        await js.publish(f"{stream}.kept", b"stays")

        async def remaining() -> int:
            return int((await js.stream_info(stream)).state.messages)

        assert await remaining() == 2
        deadline = asyncio.get_running_loop().time() + 10
        while await remaining() != 1:
            assert asyncio.get_running_loop().time() < deadline, "the TTL message never expired"
            await asyncio.sleep(0.1)
        kept = await js.get_last_msg(stream, f"{stream}.kept")
        assert kept.data == b"stays"
        await js.delete_stream(stream)
    finally:
        await connection.close()
