"""Bring a local cluster up and down: etcd, the Kubernetes control plane, kwok
fake nodes, the process node and a JetStream-enabled nats-server (or, with
``nats_nodes=3``, a three-server JetStream cluster: a name, routes between the servers,
a port pair and a store directory each).

Every wait has a deadline; a failure names the component and shows the tail
of its log, and stops everything started so far, so nothing is left behind.
"""

from __future__ import annotations

import base64
import shutil
import signal
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from troupe_devcluster import components, processes
from troupe_devcluster.components import Component
from troupe_devcluster.kube import core_v1, new_api_client
from troupe_devcluster.layout import (
    KWOK_NODE_COUNT,
    PROCESS_NODE_NAME,
    Layout,
    Ports,
    allocate_nats_nodes,
)
from troupe_devcluster.pki import ADMIN_USER, write_pki
from troupe_devcluster.processnode.process import signal_group

START_DEADLINE_SECONDS = 60.0
NOT_READY_TAINT = "node.kubernetes.io/not-ready"
KWOK_TAINT = {"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}


def build_kubeconfig(layout: Layout) -> dict[str, Any]:
    """A kubeconfig with the certificates inlined, usable by kubectl, kopf and the client."""
    pki = layout.pki

    def inline(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "troupe-dev",
                "cluster": {
                    "server": layout.apiserver_url,
                    "certificate-authority-data": inline(pki.ca_cert),
                },
            }
        ],
        "users": [
            {
                "name": ADMIN_USER,
                "user": {
                    "client-certificate-data": inline(pki.admin_cert),
                    "client-key-data": inline(pki.admin_key),
                },
            }
        ],
        "contexts": [
            {"name": "troupe-dev", "context": {"cluster": "troupe-dev", "user": ADMIN_USER}}
        ],
        "current-context": "troupe-dev",
    }


def build_kwok_node(index: int) -> dict[str, Any]:
    """A fake node kwok manages; its taint keeps ordinary pods on the process node."""
    name = f"kwok-node-{index}"
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"type": "kwok", "kubernetes.io/hostname": name},
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"taints": [KWOK_TAINT]},
        # Fake nodes run nothing: room for scale benchmarks of thousands of pods.
        "status": {
            "allocatable": {"cpu": "1000", "memory": "4Ti", "pods": "5000"},
            "capacity": {"cpu": "1000", "memory": "4Ti", "pods": "5000"},
        },
    }


def env_lines(layout: Layout) -> str:
    """Shell lines that point kubectl, the tests and the operator at this cluster (every
    NATS server, and on a NATS cluster the replicas the operator should give streams)."""
    lines = f"export KUBECONFIG={layout.kubeconfig}\nexport NATS_URL={layout.nats_url}\n"
    if layout.nats_nodes:
        lines += f"export TROUPE_NATS_REPLICAS={layout.nats_replicas}\n"
    return lines


def _http_ok(url: str, context: ssl.SSLContext | None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return bool(200 <= response.status < 300)
    except (urllib.error.URLError, OSError):
        return False


def _insecure() -> ssl.SSLContext:
    # Controller-manager and scheduler serve /healthz with self-signed certificates.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _wait(
    layout: Layout,
    name: str,
    ready: Callable[[], bool],
    deadline: float,
) -> None:
    pid = layout.pids[name]
    while True:
        if ready():
            return
        if not processes.alive(pid):
            raise processes.ComponentError(name, "exited during start-up", layout.log_of(name))
        if time.monotonic() > deadline:
            raise processes.ComponentError(
                name, f"was not ready within {START_DEADLINE_SECONDS:.0f}s", layout.log_of(name)
            )
        time.sleep(0.1)


def _start(layout: Layout, component: Component) -> None:
    layout.pids[component.name] = processes.start(component.argv, layout.log_of(component.name))


def _wait_healthy(layout: Layout, component: Component, deadline: float) -> None:
    context = _insecure() if component.health_url.startswith("https") else None
    _wait(layout, component.name, lambda: _http_ok(component.health_url, context), deadline)


def _schedulable_nodes(api: Any) -> set[str]:
    """Nodes that are Ready and rid of the not-ready taint admission gives new nodes."""
    names = set()
    for node in api.list_node().items:
        ready = any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
        tainted = any(t.key == NOT_READY_TAINT for t in node.spec.taints or [])
        if ready and not tainted:
            names.add(node.metadata.name)
    return names


def _layout(root: Path, nats_nodes: int) -> Layout:
    ports = Ports.allocate()
    return Layout(root=root, ports=ports, nats_nodes=allocate_nats_nodes(nats_nodes, ports))


def up(bin_dir: Path, root: Path | None = None, nats_nodes: int = 1) -> Layout:
    """Start a whole cluster in ``root`` (a new temporary directory by default), with one
    nats-server or a JetStream cluster of ``nats_nodes``."""
    root = root or Path(tempfile.mkdtemp(prefix="troupe-cluster-"))
    layout = _layout(root, nats_nodes)
    try:
        _up(bin_dir, layout)
    except BaseException:
        down(layout)
        raise
    return layout


def up_nats(root: Path | None = None, nats_nodes: int = 1) -> Layout:
    """Start only JetStream (one nats-server, or a cluster of ``nats_nodes``), for tests that
    need no Kubernetes or a NATS of their own."""
    root = root or Path(tempfile.mkdtemp(prefix="troupe-nats-"))
    layout = _layout(root, nats_nodes)
    try:
        _start_nats(layout, time.monotonic() + START_DEADLINE_SECONDS)
    except BaseException:
        down(layout)
        raise
    return layout


def restart_nats(layout: Layout) -> None:
    """SIGKILL the layout's nats-server, as a crashed node would (no flush, no goodbye), and
    start it again on the same port and storage directory, healthy: what it had stored
    survives, as JetStream's file store promises."""
    nats = components.nats_server(layout)
    pid = layout.pids[nats.name]
    signal_group(pid, signal.SIGKILL)
    processes.stop([pid], grace_seconds=START_DEADLINE_SECONDS)  # reaps it
    _start(layout, nats)
    _wait_healthy(layout, nats, time.monotonic() + START_DEADLINE_SECONDS)


def _start_nats(layout: Layout, deadline: float) -> None:
    servers = components.nats_servers(layout)
    for server in servers:
        _start(layout, server)
    for server in servers:
        _wait_healthy(layout, server, deadline)


def kill_nats_node(layout: Layout, index: int) -> None:
    """SIGKILL server ``index`` of the layout's NATS cluster, as a crashed node (no flush, no
    goodbye); the others go on, as a JetStream cluster with a majority left does."""
    pid = layout.pids[components.nats_cluster_server(layout, index).name]
    signal_group(pid, signal.SIGKILL)
    processes.stop([pid], grace_seconds=START_DEADLINE_SECONDS)  # reaps it


def start_nats_node(layout: Layout, index: int) -> None:
    """Start server ``index`` again on its ports and store, and wait until it is healthy
    (caught up with the cluster's JetStream)."""
    server = components.nats_cluster_server(layout, index)
    _start(layout, server)
    _wait_healthy(layout, server, time.monotonic() + START_DEADLINE_SECONDS)


def _up(bin_dir: Path, layout: Layout) -> None:
    deadline = time.monotonic() + START_DEADLINE_SECONDS
    write_pki(layout.pki.ca_cert.parent, kubelet_names=(PROCESS_NODE_NAME,))

    nats = components.nats_servers(layout)
    etcd = components.etcd(bin_dir, layout)
    for component in (*nats, etcd):
        _start(layout, component)
    _wait_healthy(layout, etcd, deadline)

    apiserver = components.kube_apiserver(bin_dir, layout)
    _start(layout, apiserver)
    layout.kubeconfig.write_text(yaml.safe_dump(build_kubeconfig(layout)))
    verified = ssl.create_default_context(cafile=str(layout.pki.ca_cert))
    verified.load_cert_chain(str(layout.pki.admin_cert), str(layout.pki.admin_key))
    _wait(layout, apiserver.name, lambda: _http_ok(apiserver.health_url, verified), deadline)

    rest = [
        components.kube_controller_manager(bin_dir, layout),
        components.kube_scheduler(bin_dir, layout),
        components.kwok(bin_dir, layout),
    ]
    for component in rest:
        _start(layout, component)
    _start(layout, components.process_node(layout))

    api = core_v1(new_api_client(layout.kubeconfig))
    for index in range(KWOK_NODE_COUNT):
        api.create_node(build_kwok_node(index))
    for component in (*rest, *nats):
        _wait_healthy(layout, component, deadline)

    wanted = {f"kwok-node-{i}" for i in range(KWOK_NODE_COUNT)} | {PROCESS_NODE_NAME}
    _wait(layout, "process-node", lambda: wanted <= _schedulable_nodes(api), deadline)
    _wait(
        layout,
        "kube-controller-manager",
        lambda: bool(api.list_namespaced_service_account("default").items),
        deadline,
    )


# Clients before servers: the process node first so it can stop its pods, and
# etcd last, since an API server without etcd hangs instead of shutting down.
SHUTDOWN_ORDER = (
    ("process-node",),
    ("kube-controller-manager", "kube-scheduler", "kwok"),
    ("kube-apiserver",),
    ("etcd", "nats-server"),
)


def down(layout: Layout) -> None:
    """Stop every process of the cluster in dependency order and remove its files."""
    named = {name for group in SHUTDOWN_ORDER for name in group}
    # The servers of a NATS cluster (nats-server-N) stop with the last group.
    rest = tuple(name for name in layout.pids if name not in named)
    for group in (*SHUTDOWN_ORDER[:-1], SHUTDOWN_ORDER[-1] + rest):
        processes.stop(
            [layout.pids[name] for name in group if name in layout.pids], grace_seconds=20
        )
    shutil.rmtree(layout.root, ignore_errors=True)
