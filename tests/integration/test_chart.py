"""The chart and the plain bundle against the real API server: every object they render is
accepted by a server-side dry-run (schemas, admission, RBAC escalation checks), and the pods
they would run are admitted by a namespace that enforces the restricted Pod Security profile.

The CRDs that ship are applied for real first, so the
custom objects validate against them. prometheus-operator's CRDs are not part of Troupe: a
minimal stand-in (its group, kinds and scope, any spec) is installed so the API server can
place the ServiceMonitor and PodMonitor; their fields are checked by the unit tests.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.chart_support import (
    ALL_OPTIONS,
    CHART,
    DEPLOY,
    GATEWAY,
    OPERATOR,
    documents,
    of_kind,
    render_text,
)
from troupe_devcluster.fixtures import ClusterEndpoints, create_namespace
from troupe_devcluster.kube import core_v1
from troupe_operator.gen import bundle

RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/warn": "restricted",
}
NAMESPACE_GONE_SECONDS = 45
MONITORING_KINDS = {"ServiceMonitor": "servicemonitors", "PodMonitor": "podmonitors"}


def monitoring_crd(kind: str, plural: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "listKind": f"{kind}List"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                        }
                    },
                }
            ],
        },
    }


def dump(objects: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False)


@pytest.fixture(scope="module")
def crds(cluster: ClusterEndpoints) -> Iterator[None]:
    """The chart's CRDs and the monitoring stand-ins, applied for real and Established."""
    monitoring = dump([monitoring_crd(k, p) for k, p in MONITORING_KINDS.items()])
    cluster.kubectl("apply", "-f", str(CHART / "crds"))
    cluster.kubectl("apply", "-f", "-", stdin=monitoring)
    names = [
        f"crd/{crd['metadata']['name']}"
        for path in sorted((CHART / "crds").glob("*.yaml"))
        for crd in documents(path.read_text())
    ] + [f"crd/{plural}.monitoring.coreos.com" for plural in MONITORING_KINDS.values()]
    cluster.kubectl("wait", "--for=condition=Established", *names, "--timeout=30s")
    yield
    cluster.kubectl("delete", "-f", "-", "--ignore-not-found", stdin=monitoring)


def server_dry_run(cluster: ClusterEndpoints, manifests: str) -> str:
    """``kubectl apply --dry-run=server``: the API server validates and admits, stores nothing."""
    return cluster.kubectl("apply", "--dry-run=server", "-f", "-", stdin=manifests)


def pods_of(workloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Pods the workloads' controllers would create from their templates; a
    volumeClaimTemplate becomes the claim the StatefulSet controller would name."""
    pods = []
    for workload in workloads:
        template = copy.deepcopy(workload["spec"]["template"])
        name = workload["metadata"]["name"]
        claims = workload["spec"].get("volumeClaimTemplates", [])
        template["spec"].setdefault("volumes", []).extend(
            {
                "name": claim["metadata"]["name"],
                "persistentVolumeClaim": {"claimName": f"{claim['metadata']['name']}-{name}-0"},
            }
            for claim in claims
        )
        pods.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    **template["metadata"],
                    "name": f"{name}-0",
                    "namespace": workload["metadata"]["namespace"],
                },
                "spec": template["spec"],
            }
        )
    return pods


@pytest.mark.usefixtures("crds")
def test_default_rendering_is_accepted_by_the_api_server(
    cluster: ClusterEndpoints, namespace: str
) -> None:
    output = server_dry_run(cluster, render_text(None, namespace))
    assert f"deployment.apps/{OPERATOR} created (server dry run)" in output
    assert f"deployment.apps/{GATEWAY} created (server dry run)" in output
    assert "clusterrole.rbac.authorization.k8s.io/troupe-invoker created (server dry run)" in output
    assert f"role.rbac.authorization.k8s.io/{OPERATOR}-election created (server dry run)" in output


@pytest.mark.usefixtures("crds")
def test_every_option_is_accepted_by_the_api_server(
    cluster: ClusterEndpoints, namespace: str, api_client: Any
) -> None:
    watched = [create_namespace(api_client), create_namespace(api_client)]
    try:
        values = {
            **ALL_OPTIONS,
            "watchNamespaces": watched,
            "gateway": {
                "enabled": True,
                "tls": {"secretName": "gateway-tls"},
                "publicUrl": "https://a.example",
            },
        }
        rendered = render_text(values, namespace)
        output = server_dry_run(cluster, rendered)
    finally:
        for name in watched:
            core_v1(api_client).delete_namespace(name)
    for kind in (
        "statefulset.apps",
        "servicemonitor.monitoring.coreos.com",
        "podmonitor.monitoring.coreos.com",
    ):
        assert f"{kind}/" in output, output
    assert f"deployment.apps/{GATEWAY} created (server dry run)" in output
    assert f"service/{GATEWAY} created (server dry run)" in output
    assert "clusterrole.rbac.authorization.k8s.io/troupe-invoker created (server dry run)" in output
    created = [line.split("/")[0] for line in output.splitlines()]
    # The operator's and the gateway's RoleBinding per watched namespace, and the Lease's in
    # the release namespace.
    assert created.count("rolebinding.rbac.authorization.k8s.io") == 2 * len(watched) + 1


@pytest.mark.usefixtures("crds")
def test_pods_are_admitted_under_the_restricted_pod_security_profile(
    cluster: ClusterEndpoints, api_client: Any
) -> None:
    namespace = create_namespace(api_client, labels=RESTRICTED)
    try:
        objects = documents(render_text(ALL_OPTIONS, namespace))
        workloads = of_kind(objects, "Deployment") + of_kind(objects, "StatefulSet")
        assert len(workloads) == 3, "the operator, the gateway and the quick-start NATS"
        # Workload objects are only warned about (on stderr, which makes kubectl fail
        # here); Pods are where enforcement happens.
        warnings = cluster.kubectl(
            "--warnings-as-errors", "apply", "--dry-run=server", "-f", "-", stdin=dump(workloads)
        )
        assert "PodSecurity" not in warnings, warnings
        # The ServiceAccount admission plugin wants the operator's and gateway's accounts.
        cluster.kubectl("apply", "-f", "-", stdin=dump(of_kind(objects, "ServiceAccount")))
        output = cluster.kubectl(
            "create", "--dry-run=server", "-f", "-", stdin=dump(pods_of(workloads))
        )
    finally:
        core_v1(api_client).delete_namespace(namespace)
    assert output.count("created (server dry run)") == 3, output


@pytest.mark.usefixtures("crds")
def test_plain_bundle_applies_like_the_chart(cluster: ClusterEndpoints) -> None:
    """``kubectl apply -f deploy/crds.yaml`` then ``kubectl apply -k deploy/``, dry-run (with
    the bundle's namespace created for real: a dry-run creates nothing to put objects in)."""
    namespace = f"namespace/{bundle.NAMESPACE}"
    cluster.kubectl("wait", "--for=delete", namespace, f"--timeout={NAMESPACE_GONE_SECONDS}s")
    cluster.kubectl("apply", "-f", str(DEPLOY / "crds.yaml"))
    cluster.kubectl("apply", "-f", "-", stdin=bundle.namespace_manifest())
    try:
        output = cluster.kubectl("apply", "--dry-run=server", "-k", str(DEPLOY))
    finally:
        cluster.kubectl("delete", namespace, f"--timeout={NAMESPACE_GONE_SECONDS}s")
    assert f"deployment.apps/{OPERATOR}" in output
    assert f"rolebinding.rbac.authorization.k8s.io/{OPERATOR}-election" in output
    assert f"deployment.apps/{GATEWAY}" in output
