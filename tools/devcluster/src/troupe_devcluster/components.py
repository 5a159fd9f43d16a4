"""Pure builders of each component's command line.

Kept apart from process handling so the exact flags a cluster runs with can
be read (and unit-tested) in one place.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from troupe_devcluster.layout import PROCESS_NODE_NAME, Layout

SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
KWOK_NODE_LABEL = "type=kwok"
# The node's Hostname is its name, which no resolver knows: dial its InternalIP.
KUBELET_ADDRESS_TYPES = "InternalIP,Hostname"
CONTROLLERS = (
    "garbage-collector-controller",
    "deployment-controller",
    # Agents' autoscaling tests: an HPA scaling a Deployment is what the operator must not fight.
    "horizontal-pod-autoscaler-controller",
    "replicaset-controller",
    "statefulset-controller",
    "job-controller",
    "namespace-controller",
    # Lifts the not-ready taint that admission puts on every new node once it is Ready.
    "node-lifecycle-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    # Fills the aggregated view/edit/admin roles, which charts bind to.
    "clusterrole-aggregation-controller",
    "endpointslice-controller",
)


@dataclass(frozen=True)
class Component:
    """One process of the cluster: its name, its argv and how to tell it is ready."""

    name: str
    argv: list[str]
    health_url: str


def venv_bin() -> Path:
    """The project venv's bin directory: kubectl and nats-server come from its wheels."""
    return Path(sys.executable).parent


def etcd(bin_dir: Path, layout: Layout) -> Component:
    ports = layout.ports
    client = f"http://127.0.0.1:{ports.etcd_client}"
    peer = f"http://127.0.0.1:{ports.etcd_peer}"
    return Component(
        "etcd",
        [
            str(bin_dir / "etcd"),
            f"--data-dir={layout.root / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            # A throw-away test cluster: durability is not worth the fsync latency.
            "--unsafe-no-fsync",
            "--log-level=warn",
        ],
        f"{client}/health",
    )


def kube_apiserver(bin_dir: Path, layout: Layout) -> Component:
    pki = layout.pki
    return Component(
        "kube-apiserver",
        [
            str(bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{layout.ports.etcd_client}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={layout.ports.apiserver}",
            f"--cert-dir={layout.root / 'apiserver-certs'}",
            f"--tls-cert-file={pki.serving_cert}",
            f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca_cert}",
            # How `kubectl logs` reaches the process node: as a kubelet client that
            # checks the node's serving certificate against the cluster's CA.
            f"--kubelet-client-certificate={pki.kubelet_client_cert}",
            f"--kubelet-client-key={pki.kubelet_client_key}",
            f"--kubelet-certificate-authority={pki.ca_cert}",
            f"--kubelet-preferred-address-types={KUBELET_ADDRESS_TYPES}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki.sa_public}",
            f"--service-account-signing-key-file={pki.sa_private}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction,PodSecurity",
            # Let Pod Security admission, not this global switch, reject privileged pods.
            "--allow-privileged=true",
            "--profiling=false",
        ],
        f"{layout.apiserver_url}/readyz",
    )


def _secure_component_flags(layout: Layout, port: int) -> list[str]:
    kubeconfig = str(layout.kubeconfig)
    return [
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        "--leader-elect=false",
    ]


def kube_controller_manager(bin_dir: Path, layout: Layout) -> Component:
    port = layout.ports.controller_manager
    return Component(
        "kube-controller-manager",
        [
            str(bin_dir / "kube-controller-manager"),
            *_secure_component_flags(layout, port),
            f"--controllers={','.join(CONTROLLERS)}",
            f"--service-account-private-key-file={layout.pki.sa_private}",
            f"--root-ca-file={layout.pki.ca_cert}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--concurrent-deployment-syncs=10",
            "--concurrent-replicaset-syncs=10",
        ],
        f"https://127.0.0.1:{port}/healthz",
    )


def kube_scheduler(bin_dir: Path, layout: Layout) -> Component:
    port = layout.ports.scheduler
    return Component(
        "kube-scheduler",
        [str(bin_dir / "kube-scheduler"), *_secure_component_flags(layout, port)],
        f"https://127.0.0.1:{port}/healthz",
    )


def kwok(bin_dir: Path, layout: Layout) -> Component:
    port = layout.ports.kwok
    return Component(
        "kwok",
        [
            str(bin_dir / "kwok"),
            f"--kubeconfig={layout.kubeconfig}",
            f"--config={bin_dir / 'kwok-stages.yaml'}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-label-selector={KWOK_NODE_LABEL}",
            f"--server-address=127.0.0.1:{port}",
            "--node-lease-duration-seconds=40",
        ],
        f"http://127.0.0.1:{port}/healthz",
    )


def nats_server(layout: Layout) -> Component:
    ports = layout.ports
    return Component(
        "nats-server",
        [
            str(venv_bin() / "nats-server"),
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            str(ports.nats),
            "-m",
            str(ports.nats_monitor),
            "-sd",
            str(layout.root / "jetstream"),
        ],
        f"http://127.0.0.1:{ports.nats_monitor}/healthz?js-enabled-only=true",
    )


NATS_CLUSTER_NAME = "troupe-dev"


def nats_cluster_server(layout: Layout, index: int) -> Component:
    """Server ``index`` of a JetStream cluster: a store of its own, routes to every other.

    Its health check waits for JetStream itself (a meta leader elected, its streams current),
    not only for JetStream being on, so a started cluster can place replicated streams."""
    node = layout.nats_nodes[index]
    routes = ",".join(other.route for other in layout.nats_nodes if other != node)
    return Component(
        f"nats-server-{index}",
        [
            str(venv_bin() / "nats-server"),
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            str(node.client),
            "-m",
            str(node.monitor),
            "-sd",
            str(layout.root / f"jetstream-{index}"),
            "--server_name",
            f"nats-{index}",
            "--cluster_name",
            NATS_CLUSTER_NAME,
            "--cluster",
            node.route,
            "--routes",
            routes,
        ],
        f"http://127.0.0.1:{node.monitor}/healthz",
    )


def nats_servers(layout: Layout) -> list[Component]:
    """The cluster's nats-servers: one lone server, or every server of a NATS cluster."""
    if not layout.nats_nodes:
        return [nats_server(layout)]
    return [nats_cluster_server(layout, index) for index in range(len(layout.nats_nodes))]


def process_node(layout: Layout) -> Component:
    return Component(
        "process-node",
        [
            sys.executable,
            "-m",
            "troupe_devcluster.processnode",
            f"--kubeconfig={layout.kubeconfig}",
            f"--node-name={PROCESS_NODE_NAME}",
            f"--workdir={layout.root / 'process-node'}",
            f"--kubelet-port={layout.ports.kubelet}",
            f"--tls-cert-file={layout.pki.kubelet_cert}",
            f"--tls-private-key-file={layout.pki.kubelet_key}",
            f"--client-ca-file={layout.pki.ca_cert}",
        ],
        "",
    )
