"""Operator high availability against the real API server: two operator processes, started
at once with the default election timings, elect one through a Lease. Only the holder
reconciles; a SIGKILLed holder is replaced within the failover bound; a SIGTERMed one hands
over at once; a holder that finds another in the Lease exits at once. A watch started before
the operators records every version of the Lease: the history shows who held it."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch

from tests.integration.operator_support import (
    STOP_DEADLINE,
    OperatorProcess,
    agent,
    apply,
    condition,
    get,
    install_crds,
)
from troupe_devcluster.fixtures import ClusterEndpoints, wait_for
from troupe_operator.__main__ import EXIT_LEASE_LOST
from troupe_operator.builders.lease import ElectionTimings, LeaseRecord, read_lease

LEASE = "troupe-operator"
TIMINGS = ElectionTimings()
STARTUP_ALLOWANCE = 8.0
"""A new holder's kopf start and first pass, on a loaded 2-core machine."""
FAILOVER_BOUND = TIMINGS.lease_duration + 2 * TIMINGS.retry_period + STARTUP_ALLOWANCE
"""After SIGKILL: a lease duration from the standby's last sight of a renewal (which it saw
up to a retry period late), its next try, then kopf's start and the Agent's first pass."""
HANDOVER_BOUND = 2 * TIMINGS.retry_period + STARTUP_ALLOWANCE
"""After SIGTERM: the holder releases, the standby takes it on its next try; no lease wait."""
RENEWAL_BOUND = 2 * TIMINGS.retry_period + 2.0
"""A holder notices another holder on its next renewal, one retry period away."""
READY_DEADLINE = 45.0
START_DEADLINE = 30.0


class LeaseHistory:
    """Every version of the Lease, from a watch that runs until ``close``."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        self._api = client.CoordinationV1Api(api_client)
        self._namespace = namespace
        self._stopped = threading.Event()
        self.records: list[LeaseRecord] = []
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        version: str | None = None
        while not self._stopped.is_set():
            stream = watch.Watch().stream(  # type: ignore[no-untyped-call]
                self._api.list_namespaced_lease,
                self._namespace,
                field_selector=f"metadata.name={LEASE}",
                timeout_seconds=2,
                **({"resource_version": version} if version else {}),
            )
            for event in stream:
                observed = read_lease(event["raw_object"])
                version = observed.resource_version
                if event["type"] in ("ADDED", "MODIFIED"):
                    self.records.append(observed.record)

    def holders(self) -> list[str]:
        """The holders in the order they held the Lease ("" for released), repeats folded."""
        folded: list[str] = []
        for record in self.records:
            if not folded or folded[-1] != record.holder:
                folded.append(record.holder)
        return folded

    def close(self) -> None:
        self._stopped.set()
        self.thread.join(10)


class Pair:
    """Two operator replicas with election on, watching (and electing in) one namespace."""

    def __init__(self, cluster: ClusterEndpoints, namespace: str, logs: Path) -> None:
        self.cluster = cluster
        self.namespace = namespace
        args = ("--namespace", namespace, "--lease-namespace", namespace)
        self.replicas = {
            name: OperatorProcess(
                cluster,
                logs / f"{name}.log",
                env={"POD_NAME": name, "TROUPE_LOG_FORMAT": "json"},
                args=args,
            )
            for name in ("op-a", "op-b")
        }

    def start(self) -> None:
        for replica in self.replicas.values():
            replica.launch()
        for replica in self.replicas.values():
            replica.wait_started()

    def lease(self) -> LeaseRecord | None:
        found = self.cluster.kubectl(
            "get", "lease", "-n", self.namespace, "--ignore-not-found", "-o", "json", LEASE
        )
        return read_lease(json.loads(found)).record if found.strip() else None

    def holder_name(self) -> str | None:
        """The replica (op-a or op-b) that holds the Lease, or None."""
        record = self.lease()
        if record is None:
            return None
        name = record.holder.rsplit("_", 1)[0]
        return name if name in self.replicas else None

    def wait_for_holder(
        self, other_than: str | None = None, deadline: float = START_DEADLINE
    ) -> str:
        found: str = wait_for(
            lambda: (name := self.holder_name()) is not None and name != other_than and name,
            deadline,
            f"a replica other than {other_than} to hold the Lease",
        )
        return found

    def steady_holder(self) -> str:
        """The holder, once it reconciled an Agent: the standby has long finished starting."""
        name = self.wait_for_holder()
        apply(self.cluster, self.namespace, agent("steady"))
        wait_for(lambda: _ready(self.cluster, self.namespace, "steady"), READY_DEADLINE, "Ready")
        assert self.holder_name() == name
        return name

    def other(self, name: str) -> str:
        (other,) = set(self.replicas) - {name}
        return other

    def stop(self) -> None:
        for replica in self.replicas.values():
            replica.stop()


def _metric(replica: OperatorProcess, name: str) -> float:
    """The sum of a metric's samples (0 when it has none yet)."""
    with urllib.request.urlopen(replica.metrics_url, timeout=5) as response:
        text = response.read().decode()
    pattern = re.compile(rf"^{name}(?:{{[^}}]*}})? (\S+)$", re.MULTILINE)
    return sum(float(value) for value in pattern.findall(text))


def _reconciles(replica: OperatorProcess) -> float:
    return _metric(replica, "troupe_operator_reconciles_total")


def _role(replica: OperatorProcess) -> str:
    with urllib.request.urlopen(replica.health_url, timeout=5) as response:
        role: str = json.loads(response.read())["role"]
    return role


def _ready(cluster: ClusterEndpoints, namespace: str, name: str) -> bool:
    found = condition(get(cluster, namespace, "agent", name))
    return found is not None and found["status"] == "True"


@pytest.fixture
def history(api_client: Any, namespace: str) -> Iterator[LeaseHistory]:
    recorder = LeaseHistory(api_client, namespace)
    yield recorder
    recorder.close()


@pytest.fixture
def pair(
    cluster: ClusterEndpoints, namespace: str, history: LeaseHistory, tmp_path: Path
) -> Iterator[Pair]:
    """Both replicas, started at once; on the way out the Agents are finalized by whichever
    replica holds the Lease by then, and both stop."""
    install_crds(cluster)
    replicas = Pair(cluster, namespace, tmp_path)
    replicas.start()
    try:
        yield replicas
        cluster.kubectl("delete", "agents", "--all", "-n", namespace, "--timeout=60s")
    finally:
        replicas.stop()


def test_only_the_holder_reconciles_and_resyncs(cluster: ClusterEndpoints, pair: Pair) -> None:
    leader_name = pair.wait_for_holder()
    leader, standby = pair.replicas[leader_name], pair.replicas[pair.other(leader_name)]
    assert (_role(leader), _role(standby)) == ("leader", "standby")

    apply(cluster, pair.namespace, agent("while-both-run"))
    wait_for(lambda: _ready(cluster, pair.namespace, "while-both-run"), READY_DEADLINE, "Ready")
    passes = _reconciles(leader)
    # Two more passes on the holder: the resync has run (every 3 s here) while both ran.
    wait_for(lambda: _reconciles(leader) >= passes + 2, READY_DEADLINE, "the holder's resync")

    assert _reconciles(standby) == 0
    assert _metric(standby, "troupe_operator_leader") == 0
    assert _metric(leader, "troupe_operator_leader") == 1
    assert "Handler 'reconcile'" not in standby.log_tail(400)
    assert pair.holder_name() == leader_name


def test_replicas_started_at_once_never_hold_the_lease_both(
    pair: Pair, history: LeaseHistory
) -> None:
    leader_name = pair.wait_for_holder()
    standby = pair.replicas[pair.other(leader_name)]
    # A few renewals later the history still names one holder, who took it once.
    wait_for(lambda: len(history.records) >= 3, START_DEADLINE, "three versions of the Lease")

    assert [holder.rsplit("_", 1)[0] for holder in history.holders()] == [leader_name]
    assert {record.transitions for record in history.records} == {0}
    assert "acquired" not in standby.log_tail(400)
    assert _role(standby) == "standby"


def test_a_killed_holder_is_replaced_within_the_failover_bound(
    cluster: ClusterEndpoints, pair: Pair, history: LeaseHistory
) -> None:
    leader_name = pair.steady_holder()
    successor = pair.replicas[pair.other(leader_name)]

    pair.replicas[leader_name].kill()
    killed_at = time.monotonic()
    apply(cluster, pair.namespace, agent("after-the-kill"))
    wait_for(
        lambda: _ready(cluster, pair.namespace, "after-the-kill"),
        FAILOVER_BOUND - (time.monotonic() - killed_at),
        f"the successor to reconcile a new Agent within {FAILOVER_BOUND:.0f}s of the kill",
    )

    assert pair.holder_name() == pair.other(leader_name)
    assert _reconciles(successor) > 0
    record = pair.lease()
    assert record is not None
    assert record.transitions == 1
    names = [holder.rsplit("_", 1)[0] for holder in history.holders()]
    assert names == [leader_name, pair.other(leader_name)], "taken over, never released"


def test_a_terminated_holder_releases_the_lease_and_hands_over_at_once(
    cluster: ClusterEndpoints, pair: Pair, history: LeaseHistory
) -> None:
    leader_name = pair.steady_holder()
    leader = pair.replicas[leader_name]

    leader.signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    successor_name = pair.wait_for_holder(other_than=leader_name, deadline=HANDOVER_BOUND)
    apply(cluster, pair.namespace, agent("after-the-handover"))
    wait_for(
        lambda: _ready(cluster, pair.namespace, "after-the-handover"),
        HANDOVER_BOUND - (time.monotonic() - stopped_at),
        f"the successor to reconcile a new Agent within {HANDOVER_BOUND:.0f}s of SIGTERM",
    )

    assert successor_name == pair.other(leader_name)
    wait_for(lambda: leader.exit_code() is not None, STOP_DEADLINE, "the old holder to exit")
    assert leader.exit_code() == 0
    names = [holder.rsplit("_", 1)[0] for holder in history.holders()]
    assert names == [leader_name, "", successor_name], "released, then taken"


def test_a_holder_that_finds_another_in_the_lease_exits_at_once(
    cluster: ClusterEndpoints, pair: Pair
) -> None:
    leader = pair.replicas[pair.wait_for_holder()]

    cluster.kubectl(
        "patch", "lease", LEASE, "-n", pair.namespace, "--type=merge",
        "-p", json.dumps({"spec": {"holderIdentity": "intruder"}}),
    )  # fmt: skip

    wait_for(
        lambda: leader.exit_code() is not None,
        RENEWAL_BOUND,
        "the holder to exit on its next renewal",
    )
    assert leader.exit_code() == EXIT_LEASE_LOST
    assert "held by intruder now: exiting" in leader.log_tail()
