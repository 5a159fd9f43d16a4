"""Losing one of three NATS servers loses nothing (issue 16, item 4).

The module runs its operator against a three-server JetStream cluster of its own
(``nats_cluster``), with ``TROUPE_NATS_REPLICAS=3``: every stream and bucket made for an
Agent has a copy on each server. A steady load of messages, each with its own id, goes to a
real runtime on the process node; mid-load the server leading the agent's inbox stream is
SIGKILLed and stays down. Every message is then answered exactly once (the outputs carry
ids derived from the inputs, and the output stream drops a repeated id), none is
dead-lettered, and the Agent is Ready at every look the test takes during the outage.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from typing import Any

import nats
import pytest
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from tests.integration.operator_support import (
    OperatorProcess,
    agent,
    apply,
    condition,
    explained,
    get,
    running_agent,
    wait_ready,
)
from troupe_devcluster import launcher
from troupe_devcluster.fixtures import ClusterEndpoints, wait_for
from troupe_devcluster.layout import Layout
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.agent_resources import DUPLICATE_WINDOW_SECONDS
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.nats_servers import server_urls
from troupe_runtime.nats.replicas import connect_without_retry

MESSAGES = 240
RATE_PER_SECOND = 20
KILL_AFTER = MESSAGES // 3
PUBLISH_ATTEMPT_SECONDS = 2.0
DRAIN_DEADLINE = 90.0
AGENT = "steady"


@pytest.fixture(scope="module")
def operator_env(nats_cluster: Layout) -> dict[str, str]:
    return {"TROUPE_NATS_URL": nats_cluster.nats_url, "TROUPE_NATS_REPLICAS": "3"}


class ReadyWatch:
    """Reads the Agent's Ready condition over and over in a thread, keeping every look."""

    def __init__(self, cluster: ClusterEndpoints, namespace: str) -> None:
        self._cluster, self._namespace = cluster, namespace
        self.looks: list[tuple[float, str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            found = condition(get(self._cluster, self._namespace, "agent", AGENT)) or {}
            self.looks.append(
                (time.monotonic(), found.get("status", "absent"), found.get("message", ""))
            )
            self._stop.wait(0.5)

    def __enter__(self) -> ReadyWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)


def _event(namespace: str, index: int) -> tuple[str, dict[str, str], bytes]:
    event = CloudEvent(
        id=f"load-{index}", source="/tests/nats-cluster", type="test.load", data=[index]
    )
    headers, payload = envelope.to_binary(event)
    # The id makes a retried publish (its ack lost with the server) a duplicate JetStream drops.
    headers["Nats-Msg-Id"] = event.id
    return naming.inbox_subject(namespace, AGENT, 0), headers, payload


async def _publish_until_stored(
    js: JetStreamContext, subject: str, headers: dict[str, str], payload: bytes
) -> None:
    """Publish until JetStream acknowledges: the same id every time, as a client should."""
    deadline = time.monotonic() + DRAIN_DEADLINE
    while True:
        try:
            await js.publish(subject, payload, headers=headers, timeout=PUBLISH_ATTEMPT_SECONDS)
            return
        except (nats.errors.Error, TimeoutError, OSError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _leader_index(js: JetStreamContext, stream: str) -> int:
    info = await js.stream_info(stream)
    assert info.cluster is not None, info
    assert info.cluster.leader, info
    return int(info.cluster.leader.removeprefix("nats-"))


async def _outputs(js: JetStreamContext, stream: str) -> list[Any]:
    """The data of every output the agent stored, oldest first."""
    state = (await js.stream_info(stream)).state
    found = []
    for sequence in range(state.first_seq or 1, (state.last_seq or 0) + 1):
        try:
            message = await js.get_msg(stream, sequence)
        except NotFoundError:
            continue
        found.append(envelope.parse(message.headers, message.data or b"").data)
    return found


async def _run_load(url: str, nats_cluster: Layout, namespace: str) -> tuple[list[Any], int, int]:
    """Publish the load, kill the inbox leader a third of the way in, wait for the answers;
    return the outputs, the killed server's index, and the dead-letter count."""
    nc = await nats.connect(server_urls(url), max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    js = nc.jetstream()
    output_stream = f"OUT_{namespace}"
    try:
        killed = -1
        for index in range(MESSAGES):
            if index == KILL_AFTER:
                killed = await _leader_index(js, naming.inbox_stream(namespace, AGENT))
                await asyncio.to_thread(launcher.kill_nats_node, nats_cluster, killed)
            await _publish_until_stored(js, *_event(namespace, index))
            await asyncio.sleep(1 / RATE_PER_SECOND)
        deadline = time.monotonic() + DRAIN_DEADLINE
        outputs: list[Any] = []
        while time.monotonic() < deadline:
            try:
                outputs = await _outputs(js, output_stream)
            except (nats.errors.Error, TimeoutError):
                await asyncio.sleep(0.5)
                continue
            if len(outputs) >= MESSAGES:
                break
            await asyncio.sleep(0.5)
        dead = (await js.stream_info(naming.dead_letter_stream(namespace, AGENT))).state
        return outputs, killed, dead.messages or 0
    finally:
        await nc.close()


@pytest.fixture
def load_namespace(nats_cluster: Layout, namespace: str) -> str:
    """The namespace, with the stream that stores the agent's outputs (three copies too)."""

    async def create() -> None:
        nc = await nats.connect(server_urls(nats_cluster.nats_url))
        try:
            await nc.jetstream().add_stream(
                StreamConfig(
                    name=f"OUT_{namespace}",
                    subjects=[f"out.{namespace}.>"],
                    duplicate_window=DUPLICATE_WINDOW_SECONDS,
                    num_replicas=3,
                )
            )
        finally:
            await nc.close()

    asyncio.run(create())
    return namespace


def _inbox_replicas(url: str, stream: str) -> int | None:
    async def read() -> int | None:
        nc = await nats.connect(server_urls(url))
        try:
            return (await nc.jetstream().stream_info(stream)).config.num_replicas or 1
        except NotFoundError:
            return None
        finally:
            await nc.close()

    return asyncio.run(read())


def _observed(cluster: ClusterEndpoints, namespace: str, name: str) -> bool:
    """A pass (provisioning included) has run for the Agent's current generation."""
    body = get(cluster, namespace, "agent", name)
    return bool(
        (body.get("status") or {}).get("observedGeneration") == body["metadata"]["generation"]
    )


def test_an_agents_own_replicas_win_and_raising_them_raises_its_streams_never_lowering(
    cluster: ClusterEndpoints, operator: OperatorProcess, nats_cluster: Layout, namespace: str
) -> None:
    """Runs first, while all three servers are up: three replicas need three servers."""
    ns, url = namespace, nats_cluster.nats_url
    inbox = naming.inbox_stream(ns, "single")
    with explained(cluster, ns, operator):
        apply(cluster, ns, agent("single", nats={"replicas": 1}))
        wait_for(lambda: _inbox_replicas(url, inbox) == 1, 30, f"{inbox} with one replica")
        apply(cluster, ns, agent("single", nats={"replicas": 3}))
        wait_for(lambda: _inbox_replicas(url, inbox) == 3, 30, f"{inbox} raised to three")
        # Lowering is left to a person: the pass for the new generation keeps three.
        apply(cluster, ns, agent("single", nats={"replicas": 2}))
        wait_for(lambda: _observed(cluster, ns, "single"), 30, "a pass over replicas 2")
        assert _inbox_replicas(url, inbox) == 3


def test_a_client_that_never_reconnects_connects_while_its_first_server_is_down(
    nats_cluster: Layout,
) -> None:
    """The operator and the CLI connect once per use: the first server of the list being
    down must not fail them (nats-py alone gives up after it)."""
    launcher.kill_nats_node(nats_cluster, 0)
    try:

        async def connect() -> str:
            client = await connect_without_retry(nats_cluster.nats_url, connect_timeout=2)
            try:
                return str(client.connected_url.port if client.connected_url else "")
            finally:
                await client.close()

        port = asyncio.run(connect())
        assert port in {str(node.client) for node in nats_cluster.nats_nodes[1:]}
    finally:
        launcher.start_nats_node(nats_cluster, 0)


def test_losing_one_of_three_nats_servers_loses_nothing_and_the_agent_stays_ready(
    cluster: ClusterEndpoints,
    operator: OperatorProcess,
    nats_cluster: Layout,
    load_namespace: str,
) -> None:
    ns, url = load_namespace, nats_cluster.nats_url
    with explained(cluster, ns, operator):
        apply(
            cluster,
            ns,
            running_agent(
                AGENT,
                contract={"outputSubjects": [f"out.{ns}.result"]},
                messaging={"ackWait": "30s"},
                timeout="5s",
            ),
        )
        wait_ready(cluster, ns, "agent", AGENT)
        # TROUPE_NATS_REPLICAS reaches the streams of an Agent that names no replicas.
        assert _inbox_replicas(url, naming.inbox_stream(ns, AGENT)) == 3
        with ReadyWatch(cluster, ns) as watch:
            outputs, killed, dead_letters = asyncio.run(_run_load(url, nats_cluster, ns))
        answered = Counter(data[0] for data in outputs)

    assert killed >= 0
    assert sorted(answered) == list(range(MESSAGES)), (
        f"lost: {set(range(MESSAGES)) - set(answered)}"
    )
    assert max(answered.values()) == 1, {i: n for i, n in answered.items() if n > 1}
    assert dead_letters == 0
    not_ready = [look for look in watch.looks if look[1] != "True"]
    assert len(watch.looks) > 10
    assert not_ready == [], not_ready
