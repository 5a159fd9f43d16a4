"""End to end, for each install path (Helm chart, plain bundle, GitOps folder):
install → agents Ready → a workflow run succeeds through real agent pods →
upgrade without losing messages in flight → uninstall leaves nothing behind.

The operator runs from its own pods and the agents and the engine run as real
processes on the process node; the example namespace enforces the restricted
Pod Security profile, so every pod Troupe makes is admitted under it.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import install_support as e2e
from troupe_devcluster.fixtures import ClusterEndpoints, wait_for

PATHS = ["chart", "bundle", "gitops"]
IN_FLIGHT_RUNS = 10
"""Runs in flight through the upgrade; each asks the real local model twice (analyst and
writer), one answer at a time on 2 cores, so 10 keep the upgrade overlapping runs."""


def install_path(name: str, cluster: ClusterEndpoints, work: Path) -> e2e.InstallPath:
    if name == "chart":
        return e2e.chart_path(cluster)
    if name == "bundle":
        return e2e.bundle_path(cluster, work)
    return e2e.gitops_path(cluster, work)


@contextlib.contextmanager
def cleaned_up_on_failure(
    cluster: ClusterEndpoints, path: e2e.InstallPath
) -> Iterator[list[e2e.Example]]:
    """A failed path removes its example while its operator still runs (so the objects'
    finalizers are served), then uninstalls: the next path and every later test list
    Troupe's objects cluster-wide, and a left-over team fails them all."""
    deployed: list[e2e.Example] = []
    try:
        yield deployed
    except BaseException:
        for example in deployed:
            with contextlib.suppress(Exception):
                e2e.remove_example(cluster, example)
        with contextlib.suppress(Exception):
            path.uninstall()
        raise


@pytest.mark.parametrize("path_name", PATHS)
def test_install_run_upgrade_uninstall(
    path_name: str, cluster: ClusterEndpoints, api_client: Any, tmp_path: Path
) -> None:
    path = install_path(path_name, cluster, tmp_path)
    path.install()
    with cleaned_up_on_failure(cluster, path) as deployed:
        exercise(path, cluster, api_client, tmp_path, deployed)


def exercise(
    path: e2e.InstallPath,
    cluster: ClusterEndpoints,
    api_client: Any,
    tmp_path: Path,
    deployed: list[e2e.Example],
) -> None:
    operator_pods = cluster.kubectl("get", "pods", "-n", e2e.OPERATOR_NAMESPACE, "-o", "json")
    assert {p["spec"]["nodeName"] for p in json.loads(operator_pods)["items"]} == {"process-node"}

    example = e2e.deploy_example(cluster, api_client, tmp_path)
    deployed.append(example)
    namespace = example.namespace
    [first] = e2e.start_runs(cluster.nats_url, namespace, ["jetstream"])
    outcome = e2e.wait_results(cluster.nats_url, namespace, [first])[first]
    assert outcome["status"] == "Succeeded", outcome
    # The writer is the real local model: what it writes is its own, but it writes a report.
    report = outcome["output"]["report"]
    assert isinstance(report, str)
    assert report.strip()

    # Upgrade while runs are in flight: the operator itself, and an agent's spec,
    # whose new config hash rolls its pods. No run may be lost or fail.
    before = e2e.pods_of(cluster, namespace, "retriever")
    runs = e2e.start_runs(cluster.nats_url, namespace, ["kubernetes"] * IN_FLIGHT_RUNS)
    path.upgrade()
    cluster.kubectl(
        "patch", "agent/retriever", "-n", namespace, "--type=merge",
        "-p", json.dumps({"spec": {"runtime": {"env": [{"name": "EDITION", "value": "2"}]}}}),
    )  # fmt: skip
    wait_for(
        lambda: (now := e2e.pods_of(cluster, namespace, "retriever")) and not now & before,
        e2e.DEADLINE,
        "the retriever's pods to be replaced",
    )
    outcomes = e2e.wait_results(cluster.nats_url, namespace, runs)
    assert Counter(o["status"] for o in outcomes.values()) == {"Succeeded": IN_FLIGHT_RUNS}
    assert e2e.dead_letters(cluster.nats_url, namespace) == 0

    # Uninstall: the example first (its NATS resources go with it), then Troupe.
    assert e2e.namespace_streams(cluster.nats_url, namespace)
    e2e.remove_example(cluster, example)
    wait_for(lambda: e2e.nothing_left(cluster, namespace), e2e.DEADLINE, "the example's objects")
    wait_for(
        lambda: not e2e.namespace_streams(cluster.nats_url, namespace),
        e2e.DEADLINE,
        "the example's streams and buckets to be deleted",
    )
    path.uninstall()
    leftovers = cluster.kubectl("get", "crd,clusterrole,clusterrolebinding,namespace", "-o", "name")
    assert "troupe" not in leftovers, leftovers
    cluster.kubectl("delete", "namespace", namespace)
