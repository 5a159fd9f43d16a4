"""Trigger fires through the gateway, served by uvicorn on a real nats-server: signed
webhooks with the HMAC key read from a real Secret by the real API server (valid, invalid,
replayed, stale, deduplicated, refused), and the subject relay pulling from a Trigger's
stream and consumer made by hand as the operator makes them. The Agent is an inbox stream
the test reads; the Trigger definitions are written to the directory bucket by hand, as the
operator writes them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import uvicorn
import yaml
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StreamConfig
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from troupe_gateway.app import build_app
from troupe_gateway.auth import Caller
from troupe_gateway.calls import Calls
from troupe_gateway.directory import Directory
from troupe_gateway.firing import RateLimiter
from troupe_gateway.kube import Connection, Kube, kubeconfig_connection
from troupe_gateway.relay import Relay
from troupe_gateway.services import Services
from troupe_gateway.settings import Settings

from tests.integration.runtime_harness import eventually
from tests.integration.test_examples import load
from tests.integration.workflow_harness import agents, engine, engine_config, result
from troupe_devcluster.fixtures import ClusterEndpoints
from troupe_devcluster.layout import free_port
from troupe_operator.builders.trigger import consumer_config, stream_config
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.gateway import DirectoryEntry
from troupe_runtime.contract.triggers import FireLedger, TriggerDefinition, sign

REPO = Path(__file__).resolve().parents[2]
AGENT = "orders"
HOOK = "shop-hook"
SECRET = b"a-shared-webhook-secret-0123456789"


class Everyone:
    async def authenticate(self, headers: Mapping[str, str], namespace: str) -> Caller:
        return Caller(user="smoke")

    async def authorize(self, caller: Caller, namespace: str, resource: Any, name: str) -> None:
        return None


@dataclass
class Gateway:
    namespace: str
    nc: Client
    js: JetStreamContext
    directory: KeyValue
    http: httpx.AsyncClient
    triggers: dict[str, TriggerDefinition]

    async def define(self, name: str, spec: dict[str, Any]) -> TriggerDefinition:
        """Write a Trigger's definition as the operator does (a uid kept across updates)."""
        uid = self.triggers[name].uid if name in self.triggers else str(uuid.uuid4())
        trigger = TriggerDefinition.model_validate(
            {"namespace": self.namespace, "name": name, "uid": uid, "spec": spec}
        )
        await self.directory.put(
            f"triggers.{name}", trigger.model_dump_json(by_alias=True).encode()
        )
        self.triggers[name] = trigger
        return trigger

    async def inbox(self) -> list[CloudEvent]:
        stream = naming.inbox_stream(self.namespace, AGENT)
        info = await self.js.stream_info(stream)
        events = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            if info.state.messages == 0:
                break
            msg = await self.js.get_msg(stream, seq)
            events.append(envelope.parse(dict(msg.headers or {}), msg.data or b""))
        return events

    async def ledger(self, name: str) -> FireLedger:
        try:
            kv = await self.js.key_value(naming.trigger_fires_bucket(self.namespace))
            return FireLedger.model_validate_json((await kv.get(name)).value or b"")
        except (BucketNotFoundError, NotFoundError):
            return FireLedger()

    async def hook(self, name: str, body: bytes, headers: Mapping[str, str]) -> httpx.Response:
        return await self.http.post(
            f"/hooks/{self.namespace}/{name}", content=body, headers=headers
        )


@asynccontextmanager
async def running_gateway(
    nats_url: str,
    namespace: str,
    kube: Kube | None,
    triggers: Mapping[str, dict[str, Any]],
    before: Any = None,
    entries: tuple[DirectoryEntry, ...] = (),
) -> AsyncIterator[Gateway]:
    """The Agent's inbox, the namespace's directory with the Agent and ``triggers``, then
    the gateway's app on uvicorn (``before(js)`` runs first: the relay's streams)."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(
            name=naming.inbox_stream(namespace, AGENT),
            subjects=[naming.inbox_wildcard(namespace, AGENT)],
        )
    )
    directory = await js.create_key_value(KeyValueConfig(bucket=naming.directory_bucket(namespace)))
    entry = DirectoryEntry(
        kind="Agent",
        namespace=namespace,
        name=AGENT,
        subject=naming.inbox_subject(namespace, AGENT, 0),
        ready=True,
    )
    for listed in (entry, *entries):
        await directory.put(
            naming.directory_key(listed.kind, listed.name),
            listed.model_dump_json(by_alias=True).encode(),
        )
    port = free_port()
    http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30)
    gateway = Gateway(namespace, nc, js, directory, http, {})
    for name, spec in triggers.items():
        await gateway.define(name, spec)
    if before is not None:
        await before(js)
    try:
        async with serving_app(nc, js, kube, port):
            yield gateway
    finally:
        await http.aclose()
        await nc.close()


@asynccontextmanager
async def serving_app(
    nc: Client, js: JetStreamContext, kube: Kube | None, port: int
) -> AsyncIterator[None]:
    """The gateway's app on uvicorn at 127.0.0.1:``port`` (auth lets everyone in: webhooks
    need none), its relay running."""
    services = Services(
        nc=nc,
        js=js,
        calls=Calls(nc, js, 3600),
        directory=Directory(js),
        authorizer=Everyone(),
        kube=kube,  # type: ignore[arg-type]  # the relay's tests need no Kubernetes
        settings=Settings(),
    )
    server = uvicorn.Server(
        uvicorn.Config(build_app(services), host="127.0.0.1", port=port, log_level="warning")
    )
    serving = asyncio.create_task(server.serve())
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while not server.started:
            assert asyncio.get_running_loop().time() < deadline, "uvicorn did not start"
            assert not serving.done(), "uvicorn stopped"
            await asyncio.sleep(0.05)
        yield
    finally:
        server.should_exit = True
        await serving
        await services.directory.aclose()


@pytest.fixture
async def kube(cluster: ClusterEndpoints) -> AsyncIterator[Kube]:
    client = Kube.from_environment({"KUBECONFIG": str(cluster.kubeconfig)})
    yield client
    await client.aclose()


def secret(cluster: ClusterEndpoints, namespace: str, name: str = "hook-secret") -> None:
    cluster.kubectl(
        "-n",
        namespace,
        "create",
        "secret",
        "generic",
        name,
        f"--from-literal=secret={SECRET.decode()}",
    )


def webhook(secret_name: str = "hook-secret", **more: Any) -> dict[str, Any]:
    return {
        "target": {"kind": "Agent", "name": AGENT},
        "source": {"webhook": {"secretRef": {"name": secret_name}, "replayWindow": "1m"}},
        **more,
    }


def signed(body: bytes, key: bytes = SECRET, at: float | None = None) -> dict[str, str]:
    timestamp = str(int(time.time() if at is None else at))
    return {
        "Troupe-Timestamp": timestamp,
        "Troupe-Signature": sign(key, timestamp, body),
        "Content-Type": "application/json",
    }


async def test_a_signed_webhook_fires_once_and_a_replay_or_a_bad_signature_fires_nothing(
    cluster: ClusterEndpoints, namespace: str, kube: Kube
) -> None:
    secret(cluster, namespace)
    spec = webhook(input="{order: order.id, total: order.total}")
    async with running_gateway(cluster.nats_url, namespace, kube, {HOOK: spec}) as gateway:
        body = json.dumps({"order": {"id": "o-1", "total": 12}}).encode()
        headers = signed(body)
        answer = await gateway.hook(HOOK, body, headers)
        assert answer.status_code == 202, answer.text
        task = answer.json()
        assert task["target"] == {"kind": "Agent", "name": AGENT}
        assert task["taskId"].startswith("trg-")
        events = await gateway.inbox()
        assert [(e.id, e.data) for e in events] == [(task["taskId"], {"order": "o-1", "total": 12})]

        forged = await gateway.hook(HOOK, body, signed(body, key=b"not-the-secret-at-all"))
        assert forged.status_code == 401
        assert forged.json()["reason"] == "the signature does not match"
        unsigned = await gateway.hook(HOOK, body, {"Content-Type": "application/json"})
        assert unsigned.status_code == 401

        replayed = await gateway.hook(HOOK, body, headers)
        assert replayed.status_code == 409, replayed.text
        shouted = dict(headers, **{"Troupe-Signature": headers["Troupe-Signature"].upper()})
        assert (await gateway.hook(HOOK, body, shouted)).status_code == 409

        stale = await gateway.hook(HOOK, body, signed(body, at=time.time() - 3600))
        assert stale.status_code == 401
        assert stale.json()["reason"] == "Troupe-Timestamp is outside the replay window"

        assert len(await gateway.inbox()) == 1
        ledger = await gateway.ledger(HOOK)
        assert (ledger.fires, ledger.failures, ledger.last_task_id) == (1, 0, task["taskId"])

        metrics = (await gateway.http.get("/metrics")).text
        assert (
            'troupe_gateway_trigger_deliveries_total{outcome="fired",source="webhook"}' in metrics
        )
        assert 'troupe_gateway_trigger_deliveries_total{outcome="409",source="webhook"}' in metrics

        again = json.dumps({"order": {"id": "o-2", "total": 3}}).encode()
        assert (await gateway.hook(HOOK, again, signed(again))).status_code == 202
        assert len(await gateway.inbox()) == 2
        assert (await gateway.ledger(HOOK)).fires == 2


async def test_a_dedupe_key_fires_once_for_deliveries_with_the_same_value(
    cluster: ClusterEndpoints, namespace: str, kube: Kube
) -> None:
    secret(cluster, namespace)
    spec = webhook(dedupeKey="delivery")
    async with running_gateway(cluster.nats_url, namespace, kube, {HOOK: spec}) as gateway:
        first = json.dumps({"delivery": "d-1", "n": 1}).encode()
        second = json.dumps({"delivery": "d-1", "n": 2}).encode()
        fired = await gateway.hook(HOOK, first, signed(first))
        assert fired.status_code == 202, fired.text
        duplicate = await gateway.hook(HOOK, second, signed(second, at=time.time() - 1))
        assert duplicate.status_code == 200, duplicate.text
        assert duplicate.json()["duplicate"] is True
        assert duplicate.json()["taskId"] == fired.json()["taskId"]
        events = await gateway.inbox()
        assert [e.data for e in events] == [{"delivery": "d-1", "n": 1}]
        assert (await gateway.ledger(HOOK)).fires == 1


async def test_webhooks_that_cannot_fire_say_why(
    cluster: ClusterEndpoints, namespace: str, kube: Kube
) -> None:
    secret(cluster, namespace)
    triggers = {
        HOOK: webhook(),
        "asleep": webhook(suspend=True),
        "no-secret": webhook(secret_name="absent"),
        "limited": webhook(rateLimit={"perMinute": 1, "burst": 1}),
        "mapped": webhook(input="length(items)"),
        "elsewhere": webhook() | {"target": {"kind": "Agent", "name": "nobody"}},
        "cron": {
            "target": {"kind": "Agent", "name": AGENT},
            "source": {"cron": {"schedule": "0 * * * *"}},
        },
    }
    async with running_gateway(cluster.nats_url, namespace, kube, triggers) as gateway:
        body = b'{"items": 3}'
        assert (await gateway.hook("cron", body, signed(body))).status_code == 404
        assert (await gateway.hook("unknown", body, signed(body))).status_code == 404
        missing = await gateway.hook("no-secret", body, signed(body))
        assert missing.status_code == 503
        assert "absent" in missing.json()["reason"]
        assert SECRET.decode() not in missing.text
        later = signed(body)
        asleep = await gateway.hook("asleep", body, later)
        assert asleep.status_code == 423
        assert "suspended" in asleep.json()["reason"]
        scalar = b'{"items": 6}'
        unmappable = signed(scalar)
        mapped = await gateway.hook("mapped", scalar, unmappable)
        assert mapped.status_code == 422
        assert "input mapping failed" in mapped.json()["reason"]
        elsewhere = await gateway.hook("elsewhere", body, signed(body))
        assert elsewhere.status_code == 503
        assert "nobody" in elsewhere.json()["reason"]
        huge = b"[" + b"1," * (1 << 20) + b"1]"
        assert (await gateway.hook(HOOK, huge, signed(huge))).status_code == 413

        first = b'{"items": 4}'
        accepted = signed(first)
        assert (await gateway.hook("limited", first, accepted)).status_code == 202
        # A signature is accepted once in the namespace: a delivery to one Trigger cannot be
        # replayed to another that shares its Secret.
        assert (await gateway.hook(HOOK, first, accepted)).status_code == 409
        other = b'{"items": 5}'
        limited = await gateway.hook("limited", other, signed(other))
        assert limited.status_code == 429
        assert int(limited.headers["Retry-After"]) >= 1
        assert len(await gateway.inbox()) == 1

        # A delivery that can never fire stays accepted: its replay counts nothing more.
        assert (await gateway.hook("mapped", scalar, unmappable)).status_code == 409
        assert (await gateway.ledger("mapped")).failures == 1
        assert (await gateway.ledger("elsewhere")).failures == 1
        assert (await gateway.ledger("limited")).fires == 1
        assert (await gateway.ledger("asleep")) == FireLedger()

        # Resumed, the delivery refused while suspended fires (its signature is unused).
        await gateway.define("asleep", webhook(suspend=False))

        async def resumed() -> bool:
            return (await gateway.hook("asleep", body, later)).status_code == 202

        await eventually(resumed, "the resumed Trigger fired the same delivery")
        assert len(await gateway.inbox()) == 2


async def test_the_relay_fires_matching_cloud_events_once_and_terminates_the_rest(
    nats_url: str,
) -> None:
    namespace = f"relay-{uuid.uuid4().hex[:6]}"
    subject = f"shop.{namespace}.orders"
    name = "order-events"
    stream = naming.trigger_stream(namespace, name)
    spec = {
        "target": {"kind": "Agent", "name": AGENT},
        "source": {"subject": {"subject": subject, "filter": {"type": "order.created"}}},
        "input": "{order: id}",
    }

    async def provision(js: JetStreamContext) -> None:
        # As the operator provisions them.
        await js.add_stream(stream_config(namespace, name, subject))
        await js.add_consumer(stream, consumer_config())

    async with running_gateway(nats_url, namespace, None, {name: spec}, provision) as gateway:
        for kind, order in (("order.created", "o-1"), ("order.deleted", "o-2")):
            event = CloudEvent(
                id=f"e-{order}",
                source="/shop",
                type=kind,
                datacontenttype=envelope.JSON_CONTENT_TYPE,
                data={"id": order},
            )
            headers, payload = envelope.to_binary(event)
            await gateway.js.publish(subject, payload, headers=headers)
        structured = {"specversion": "1.0", "id": "e-3", "source": "/shop", "type": "order.created"}
        await gateway.js.publish(
            subject,
            json.dumps(structured | {"data": {"id": "o-3"}}).encode(),
            headers={"content-type": envelope.STRUCTURED_CONTENT_TYPE},
        )
        await gateway.js.publish(subject, b"not a cloud event")

        async def settled() -> bool:
            info = await gateway.js.consumer_info(stream, naming.TRIGGER_RELAY_CONSUMER)
            return bool(info.num_pending == 0 and info.num_ack_pending == 0)

        await eventually(settled, "the relay took every message", within=60)
        events = await gateway.inbox()
        trigger = gateway.triggers[name]
        assert sorted((e.id, json.dumps(e.data)) for e in events) == [
            (f"trg-{trigger.uid}-1", '{"order": "o-1"}'),
            (f"trg-{trigger.uid}-3", '{"order": "o-3"}'),
        ]
        ledger = await gateway.ledger(name)
        assert (ledger.fires, ledger.failures) == (2, 2)
        assert "does not match the Trigger's filter" in ledger.last_failure


async def test_the_directory_keeps_trigger_definitions_and_skips_junk(nats_url: str) -> None:
    namespace = f"dir-{uuid.uuid4().hex[:6]}"
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        kv = await js.create_key_value(KeyValueConfig(bucket=naming.directory_bucket(namespace)))
        good = TriggerDefinition.model_validate(
            {"namespace": namespace, "name": "good", "uid": "u-1", "spec": webhook()}
        )
        await kv.put("triggers.good", good.model_dump_json(by_alias=True).encode())
        await kv.put("triggers.junk", b"{not json")
        await kv.put("triggers.renamed", good.model_dump_json(by_alias=True).encode())
        foreign = good.model_copy(update={"namespace": "elsewhere", "name": "foreign"})
        await kv.put("triggers.foreign", foreign.model_dump_json(by_alias=True).encode())
        directory = Directory(js)
        try:
            assert [t.name for t in await directory.triggers(namespace)] == ["good"]
            assert await directory.trigger(namespace, "good") == good
            assert await directory.exists(namespace)
            assert not await directory.exists(f"none-{namespace}")
            await kv.put(
                "triggers.junk",
                good.model_copy(update={"name": "junk"}).model_dump_json(by_alias=True).encode(),
            )
            await eventually(
                lambda: directory.trigger(namespace, "junk"), "a mended key to be read"
            )
            await kv.delete("triggers.good")

            async def gone() -> bool:
                return await directory.trigger(namespace, "good") is None

            await eventually(gone, "a deleted Trigger to leave the directory")
            assert await directory.entries(namespace) == []
        finally:
            await directory.aclose()
    finally:
        await nc.close()


def openssl_signature(timestamp: str, body: bytes) -> str:
    """The signature as docs/gateway.md's openssl one-liner makes it."""
    signed_text = timestamp.encode() + b"." + body
    out = subprocess.run(
        ["openssl", "dgst", "-sha256", "-hmac", SECRET.decode(), "-hex"],
        input=signed_text,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return "sha256=" + out.strip().rsplit(" ", 1)[-1]


async def test_the_documented_signing_fires_and_the_example_trigger_is_valid(
    cluster: ClusterEndpoints, namespace: str, kube: Kube
) -> None:
    crds = str(REPO / "crds")
    cluster.kubectl("apply", "-f", crds)
    cluster.kubectl("wait", "--for=condition=Established", "-f", crds)
    example = REPO / "examples" / "support-triage" / "webhook-trigger.yaml"
    cluster.kubectl("apply", "--dry-run=server", "-f", str(example), "-n", namespace)
    secret(cluster, namespace)
    async with running_gateway(cluster.nats_url, namespace, kube, {HOOK: webhook()}) as gateway:
        body = b'{"ticket": {"id": "T-1", "body": "The dashboard is down"}}'
        timestamp = str(int(time.time()))
        headers = {
            "Troupe-Timestamp": timestamp,
            "Troupe-Signature": openssl_signature(timestamp, body),
            "Content-Type": "application/json",
        }
        answer = await gateway.hook(HOOK, body, headers)
        assert answer.status_code == 202, answer.text
        assert [e.data for e in await gateway.inbox()] == [json.loads(body)]


async def test_the_rate_limit_is_shared_by_replicas(nats_url: str) -> None:
    namespace = f"limit-{uuid.uuid4().hex[:6]}"
    trigger = TriggerDefinition.model_validate(
        {
            "namespace": namespace,
            "name": "limited",
            "uid": "u-1",
            "spec": webhook(rateLimit={"perMinute": 1, "burst": 2}),
        }
    )
    first, second = await nats.connect(nats_url), await nats.connect(nats_url)
    try:
        one, other = RateLimiter(first.jetstream()), RateLimiter(second.jetstream())
        assert await one.take(trigger) == 0
        assert await other.take(trigger) == 0
        assert await one.take(trigger) > 50
        assert await other.take(trigger) > 50
        await other.give_back(trigger)
        assert await one.take(trigger) == 0
    finally:
        await first.close()
        await second.close()


async def test_a_signed_webhook_starts_a_support_triage_run(
    cluster: ClusterEndpoints, namespace: str, kube: Kube
) -> None:
    """The example's Trigger, its helpdesk payload signed as documented, and the example's
    own Workflow and Agents (in process, on the real engine): the run succeeds."""
    example = yaml.safe_load(
        (REPO / "examples" / "support-triage" / "webhook-trigger.yaml").read_text()
    )
    secret(cluster, namespace, example["spec"]["source"]["webhook"]["secretRef"]["name"])
    support = load(REPO / "examples" / "support-triage" / "handlers" / "support.py")
    steps: list[dict[str, Any]] = [
        {"name": "classify", "agent": "classifier"},
        {"name": "respond", "agent": "responder", "dependsOn": ["classify"]},
    ]
    config = engine_config(cluster.nats_url, namespace, steps, workflow="triage")
    workflow = DirectoryEntry(
        kind="Workflow",
        namespace=namespace,
        name="triage",
        subject=naming.workflow_subject(namespace, "triage", "start"),
        ready=True,
    )
    handlers = {"classifier": support.classify, "responder": support.respond}
    async with (
        agents(cluster.nats_url, namespace, handlers),
        engine(config),
        running_gateway(
            cluster.nats_url,
            namespace,
            kube,
            {"helpdesk": example["spec"]},
            entries=(workflow,),
        ) as gateway,
    ):
        body = b'{"ticket": {"id": "T-1", "body": "The site is down since noon"}}'
        timestamp = str(int(time.time()))
        headers = {
            "Troupe-Timestamp": timestamp,
            "Troupe-Signature": openssl_signature(timestamp, body),
            "Content-Type": "application/json",
        }
        answer = await gateway.hook("helpdesk", body, headers)
        assert answer.status_code == 202, answer.text
        assert answer.json()["target"] == {"kind": "Workflow", "name": "triage"}
        run = await result(gateway.js, config, answer.json()["taskId"])
        assert run["status"] == "Succeeded", run
        assert run["output"]["category"] == "outage"
        assert (await gateway.hook("helpdesk", body, headers)).status_code == 409


async def test_the_seen_bucket_keeps_a_signature_twice_the_longest_replay_window(
    cluster: ClusterEndpoints, namespace: str, kube: Kube
) -> None:
    secret(cluster, namespace)
    long = webhook()
    long["source"]["webhook"]["replayWindow"] = "1h"
    triggers = {"short": webhook(), "long": long}
    async with running_gateway(cluster.nats_url, namespace, kube, triggers) as gateway:
        stream = naming.kv_stream(naming.webhook_seen_bucket(namespace))
        body = b'{"n": 1}'
        assert (await gateway.hook("short", body, signed(body))).status_code == 202
        assert (await gateway.js.stream_info(stream)).config.max_age == 600
        other = b'{"n": 2}'
        # An hour-old timestamp is fresh for a one-hour window.
        old = signed(other, at=time.time() - 3500)
        assert (await gateway.hook("long", other, old)).status_code == 202
        assert (await gateway.js.stream_info(stream)).config.max_age == 7200
        assert (await gateway.hook("long", other, old)).status_code == 409


async def test_a_message_redelivered_after_its_fire_fires_once(nats_url: str) -> None:
    """A replica that fired and died before its ack: the message comes back, and the fire
    (its task filed under trg-<uid>-<sequence>) is not sent again."""
    namespace = f"redo-{uuid.uuid4().hex[:6]}"
    subject = f"shop.{namespace}.orders"
    name = "orders"
    stream = naming.trigger_stream(namespace, name)
    spec = {
        "target": {"kind": "Agent", "name": AGENT},
        "source": {"subject": {"subject": subject}},
    }
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await js.add_stream(
            StreamConfig(
                name=naming.inbox_stream(namespace, AGENT),
                subjects=[naming.inbox_wildcard(namespace, AGENT)],
            )
        )
        await js.add_stream(stream_config(namespace, name, subject))
        await js.add_consumer(stream, consumer_config())
        kv = await js.create_key_value(KeyValueConfig(bucket=naming.directory_bucket(namespace)))
        entry = DirectoryEntry(
            kind="Agent",
            namespace=namespace,
            name=AGENT,
            subject=naming.inbox_subject(namespace, AGENT, 0),
        )
        await kv.put(f"agents.{AGENT}", entry.model_dump_json(by_alias=True).encode())
        trigger = TriggerDefinition.model_validate(
            {"namespace": namespace, "name": name, "uid": "u-9", "spec": spec}
        )
        await kv.put(f"triggers.{name}", trigger.model_dump_json(by_alias=True).encode())
        services = Services(
            nc=nc,
            js=js,
            calls=Calls(nc, js, 3600),
            directory=Directory(js),
            authorizer=Everyone(),
            kube=None,  # type: ignore[arg-type]
            settings=Settings(),
        )
        relay = Relay(services, services.firing)
        await js.publish(subject, b'{"id": "o-1"}')
        pull = await js.pull_subscribe_bind(durable=naming.TRIGGER_RELAY_CONSUMER, stream=stream)
        first = (await pull.fetch(1, timeout=10))[0]

        async def died() -> None:
            await first.nak()  # the server redelivers it, as after a lost replica's ack wait

        first.ack = died  # type: ignore[method-assign]
        await relay.handle(trigger, first)
        again = (await pull.fetch(1, timeout=10))[0]
        assert again.metadata.num_delivered == 2
        await relay.handle(trigger, again)

        async def settled() -> bool:
            # An ack is published without waiting for the server, so poll for it.
            info = await js.consumer_info(stream, naming.TRIGGER_RELAY_CONSUMER)
            return (info.num_pending, info.num_ack_pending) == (0, 0)

        await eventually(settled, "the redelivered message acked, nothing pending")
        events = [
            envelope.parse(dict(m.headers or {}), m.data or b"")
            for m in [await js.get_msg(naming.inbox_stream(namespace, AGENT), 1)]
        ]
        assert [(e.id, e.data) for e in events] == [("trg-u-9-1", {"id": "o-1"})]
        assert (await js.stream_info(naming.inbox_stream(namespace, AGENT))).state.messages == 1
        ledger = FireLedger.model_validate_json(
            (await (await js.key_value(naming.trigger_fires_bucket(namespace))).get(name)).value
            or b""
        )
        assert ledger.fires == 1
        await services.directory.aclose()
    finally:
        await nc.close()


async def test_a_secret_the_gateway_may_not_read_is_a_503_that_says_so(
    cluster: ClusterEndpoints, namespace: str
) -> None:
    """The gateway's role has no ``get`` on Secrets here (a ``watchNamespaces`` install
    binds it only where the operator watches): the answer names the cause, not a timeout."""
    secret(cluster, namespace)
    cluster.kubectl("-n", namespace, "create", "serviceaccount", "gateway")
    token = cluster.kubectl("-n", namespace, "create", "token", "gateway").strip()
    admin = kubeconfig_connection([cluster.kubeconfig])
    kube = Kube(Connection(server=admin.server, ca_pem=admin.ca_pem, token=token))
    try:
        async with running_gateway(cluster.nats_url, namespace, kube, {HOOK: webhook()}) as gateway:
            body = b"{}"
            answer = await gateway.hook(HOOK, body, signed(body))
            assert answer.status_code == 503
            assert "may not read the Trigger's Secret hook-secret" in answer.json()["reason"]
            assert len(await gateway.inbox()) == 0
    finally:
        await kube.aclose()
