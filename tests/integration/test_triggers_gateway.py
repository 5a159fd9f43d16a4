"""Webhook and subject Triggers from the Trigger object to the Agent's inbox: the real
operator files the definitions, provisions the subject Trigger's stream and relay consumer
and copies the fire ledger into status; the gateway's app (served by uvicorn) reads the
definitions, checks the signature against the real Secret and fires. The Agent runs on a
kwok node (nothing consumes its inbox: the test reads it)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import nats
import pytest
from nats.aio.client import Client
from nats.js.errors import NotFoundError
from troupe_gateway.kube import Kube

from tests.integration.operator_support import (
    API_VERSION,
    OperatorProcess,
    agent,
    apply,
    explained,
    get,
)
from tests.integration.runtime_harness import eventually
from tests.integration.test_gateway_webhooks import SECRET, openssl_signature, secret, serving_app
from troupe_devcluster.fixtures import ClusterEndpoints
from troupe_devcluster.layout import free_port
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.envelope import CloudEvent

DEADLINE = 60.0


@pytest.fixture(scope="module")
def operator_env() -> dict[str, str]:
    """Status follows the ledger within a few seconds (the resync copies it)."""
    return {"TROUPE_RESYNC_SECONDS": "2"}


@pytest.fixture
def watched(cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess) -> Iterator[str]:
    with explained(cluster, namespace, operator):
        yield namespace


@pytest.fixture
async def kube(cluster: ClusterEndpoints) -> AsyncIterator[Kube]:
    client = Kube.from_environment({"KUBECONFIG": str(cluster.kubeconfig)})
    yield client
    await client.aclose()


@pytest.fixture
async def nc(cluster: ClusterEndpoints) -> AsyncIterator[Client]:
    client = await nats.connect(cluster.nats_url)
    yield client
    await client.close()


def trigger(name: str, source: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "Trigger",
        "metadata": {"name": name},
        "spec": {"target": {"kind": "Agent", "name": "echo"}, "source": source, **spec},
    }


async def inbox(nc: Client, namespace: str) -> list[CloudEvent]:
    js = nc.jetstream()
    stream = naming.inbox_stream(namespace, "echo")
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        return []
    events = []
    for seq in range(max(info.state.first_seq, 1), info.state.last_seq + 1):
        msg = await js.get_msg(stream, seq)
        events.append(envelope.parse(dict(msg.headers or {}), msg.data or b""))
    return events


def status(cluster: ClusterEndpoints, namespace: str, name: str) -> dict[str, Any]:
    return dict(get(cluster, namespace, "trigger", name).get("status") or {})


async def test_a_webhook_trigger_fires_through_the_gateway_and_counts_in_status(
    cluster: ClusterEndpoints, watched: str, kube: Kube, nc: Client
) -> None:
    secret(cluster, watched)
    apply(cluster, watched, agent("echo"))
    webhook = {"webhook": {"secretRef": {"name": "hook-secret"}, "replayWindow": "2m"}}
    apply(cluster, watched, trigger("hook", webhook, input="{ticket: id}", dedupeKey="id"))
    port = free_port()
    async with (
        serving_app(nc, nc.jetstream(), kube, port),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http,
    ):
        body = b'{"id": "T-1"}'
        timestamp = str(int(time.time()))
        headers = {
            "Troupe-Timestamp": timestamp,
            "Troupe-Signature": openssl_signature(timestamp, body),
        }
        answers: list[httpx.Response] = []

        async def fired() -> bool:
            # 404 until the operator filed the definition, 503 until the Agent's entry.
            answers[:] = [await http.post(f"/hooks/{watched}/hook", content=body, headers=headers)]
            return answers[0].status_code == 202

        await eventually(fired, "the webhook to fire", within=DEADLINE)
        task = answers[0].json()
        assert [(e.id, e.data) for e in await inbox(nc, watched)] == [
            (task["taskId"], {"ticket": "T-1"})
        ]
        replayed = await http.post(f"/hooks/{watched}/hook", content=body, headers=headers)
        assert replayed.status_code == 409
        forged = dict(headers, **{"Troupe-Signature": "sha256=" + "0" * 64})
        assert (
            await http.post(f"/hooks/{watched}/hook", content=body, headers=forged)
        ).status_code == 401
        assert len(await inbox(nc, watched)) == 1

    await eventually(
        lambda: status(cluster, watched, "hook").get("fires") == 1,
        "the fire counted in the Trigger's status",
        within=DEADLINE,
    )
    assert SECRET.decode() not in json.dumps(status(cluster, watched, "hook"))


async def test_a_subject_trigger_relays_matching_cloud_events_and_counts_the_rest(
    cluster: ClusterEndpoints, watched: str, kube: Kube, nc: Client
) -> None:
    apply(cluster, watched, agent("echo"))
    subject = f"shop.{watched}.orders"
    source = {"subject": {"subject": subject, "filter": {"type": "order.created"}}}
    apply(cluster, watched, trigger("orders", source, input="id"))
    js = nc.jetstream()
    stream = naming.trigger_stream(watched, "orders")

    async def provisioned() -> bool:
        try:
            await js.consumer_info(stream, naming.TRIGGER_RELAY_CONSUMER)
        except NotFoundError:
            return False
        return True

    await eventually(provisioned, "the operator to provision the relay", within=DEADLINE)
    for kind, order in (("order.created", "o-1"), ("order.deleted", "o-2")):
        event = CloudEvent(
            id=f"e-{order}",
            source="/shop",
            type=kind,
            datacontenttype=envelope.JSON_CONTENT_TYPE,
            data={"id": order},
        )
        headers, payload = envelope.to_binary(event)
        await js.publish(subject, payload, headers=headers)
    port = free_port()
    async with serving_app(nc, js, kube, port):

        async def relayed() -> bool:
            info = await js.consumer_info(stream, naming.TRIGGER_RELAY_CONSUMER)
            return bool(info.num_pending == 0 and info.num_ack_pending == 0)

        await eventually(relayed, "the relay to take both messages", within=DEADLINE)
    uid = get(cluster, watched, "trigger", "orders")["metadata"]["uid"]
    assert [(e.id, e.data) for e in await inbox(nc, watched)] == [(f"trg-{uid}-1", "o-1")]

    def counted() -> bool:
        found = status(cluster, watched, "orders")
        return found.get("fires") == 1 and found.get("failures") == 1

    await eventually(counted, "one fire and one failure in status", within=DEADLINE)
    assert "filter" in status(cluster, watched, "orders").get("lastFailure", "")
