"""The gateway as the chart installs it by default, on the dev cluster: ``helm install
--wait`` waits for its pods to be Ready (NATS connected), and a caller bound to the
release's ``troupe-invoker`` reaches a running Agent through a gateway pod with ``troupe
call``: in-cluster credentials (the gateway's own ServiceAccount token, its TokenReview and
SubjectAccessReview grants) and the operator's directory, as shipped."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.chart_support import CHART, GATEWAY, RELEASE, run_helm
from tests.integration.gateway_support import bind_invoker, handled_agent, service_account_token
from tests.integration.operator_support import apply, get, install_crds, wait_ready
from troupe_devcluster.fixtures import ClusterEndpoints, create_namespace, wait_for
from troupe_devcluster.kube import core_v1

DEADLINE = 60.0


@pytest.fixture
def release(cluster: ClusterEndpoints, api_client: Any) -> Iterator[str]:
    """The chart with its default values but one replica of each (two cores), installed
    in a namespace of its own; uninstalled afterwards."""
    namespace = create_namespace(api_client)
    install_crds(cluster)
    kubeconfig = str(cluster.kubeconfig)
    try:
        run_helm(
            "upgrade", "--install", RELEASE, str(CHART), "--namespace", namespace,
            "--kubeconfig", kubeconfig, "--set", f"nats.url={cluster.nats_url}",
            "--set", "operator.replicas=1", "--set", "operator.leaderElection.enabled=false",
            "--set", "gateway.replicas=1", "--wait", "--timeout", "3m",
        )  # fmt: skip
        yield namespace
    finally:
        run_helm(
            "uninstall", RELEASE, "--namespace", namespace, "--kubeconfig", kubeconfig,
            "--wait", "--ignore-not-found",
        )  # fmt: skip
        core_v1(api_client).delete_namespace(namespace)


def test_the_charts_gateway_serves_a_call_with_a_token_rbac_allows(
    cluster: ClusterEndpoints, api_client: Any, release: str
) -> None:
    deployment = get(cluster, release, "deployment", GATEWAY)
    assert deployment["status"].get("readyReplicas") == 1, deployment["status"]
    namespace = create_namespace(api_client)
    try:
        apply(cluster, namespace, handled_agent("echo", "echo"))
        wait_ready(cluster, namespace, "agent", "echo")
        token = service_account_token(cluster, namespace, "caller")
        bind_invoker(cluster, namespace, "caller")
        selector = "app.kubernetes.io/name=troupe-gateway"
        listed = cluster.kubectl("get", "pods", "-n", release, "-l", selector, "-o", "json")
        pods = json.loads(listed)["items"]
        (pod,) = pods
        url = f"http://{pod['status']['podIP']}:8080"

        def called() -> subprocess.CompletedProcess[str] | None:
            done = subprocess.run(
                [sys.executable, "-m", "troupe_cli", "call", "agent", "echo",
                 "-n", namespace, "--gateway", url, "--token", token,
                 "--data", json.dumps({"text": "chart"}), "-o", "json"],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            # 2: refused, until the operator's directory entry and the binding are seen.
            return done if done.returncode != 2 else None

        answer = wait_for(called, DEADLINE, "a call through the chart's gateway")
        assert answer.returncode == 0, answer.stdout + answer.stderr
        assert json.loads(answer.stdout)["output"] == {"echo": "chart", "by": "echo"}
    finally:
        cluster.kubectl("delete", "agent", "echo", "-n", namespace, "--timeout=60s")
        core_v1(api_client).delete_namespace(namespace)
