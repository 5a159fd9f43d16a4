"""Registers the Node and keeps it alive: status and Lease renewed every 10 seconds.

Each heartbeat also lifts the not-ready taint admission put on the new Node,
in case no node lifecycle controller runs to do it (see ``cleared_taints``).

If the Node is deleted under it, the next heartbeat finds out (404) and
registers it again. Every failure is logged and retried; the thread never ends
before it is told to.
"""

from __future__ import annotations

import logging
import platform
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path

from troupe_devcluster.processnode.kube import (
    EXPECTED_ERRORS,
    MERGE,
    STRATEGIC_MERGE,
    ApiError,
    Kube,
)
from troupe_devcluster.processnode.status import (
    LEASE_DURATION_SECONDS,
    NODE_LEASE_NAMESPACE,
    NodeSystem,
    build_lease,
    build_node,
    cleared_taints,
    micro_timestamp,
    node_labels,
    node_status,
)

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 10.0
REGISTER_RETRY_SECONDS = 1.0
_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def _os_image() -> str:
    for line in (_read("/etc/os-release") or "").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return platform.platform()


def host_system() -> NodeSystem:
    """The host's facts for ``nodeInfo``."""
    machine = platform.machine()
    return NodeSystem(
        machine_id=_read("/etc/machine-id") or uuid.uuid5(uuid.NAMESPACE_DNS, platform.node()).hex,
        boot_id=_read("/proc/sys/kernel/random/boot_id") or "",
        kernel_version=platform.release(),
        os_image=_os_image(),
        architecture=_ARCHITECTURES.get(machine, machine),
    )


class NodeAgent:
    """The node's registration and heartbeat."""

    def __init__(self, kube: Kube, name: str, system: NodeSystem, kubelet_port: int = 0) -> None:
        self._kube = kube
        self._name = name
        self._system = system
        self._kubelet_port = kubelet_port
        self._ready_since = datetime.now(UTC)

    def run(self, stop: threading.Event) -> None:
        uid: str | None = None
        while not stop.is_set():
            try:
                if uid is None:
                    uid = self._register()
                    log.info("node %s registered", self._name)
                self._post_status()
                self._renew_lease(uid)
            except ApiError as error:
                log.warning("node heartbeat failed: %s", error)
                if error.status == 404:
                    uid = None
            except Exception as error:
                trace = not isinstance(error, EXPECTED_ERRORS)
                log.warning("node heartbeat failed: %s", error, exc_info=trace)
            stop.wait(HEARTBEAT_SECONDS if uid is not None else REGISTER_RETRY_SECONDS)

    def _register(self) -> str:
        """Create the Node, or adopt an existing one of the same name; return its uid."""
        body = build_node(
            self._name, self._system, datetime.now(UTC), self._ready_since, self._kubelet_port
        )
        try:
            created = self._kube.request("POST", "/api/v1/nodes", body=body)
            return str(created["metadata"]["uid"])
        except ApiError as error:
            if error.status != 409:
                raise
        labels = node_labels(self._name, self._system.architecture)
        updated = self._kube.request(
            "PATCH",
            f"/api/v1/nodes/{self._name}",
            body={"metadata": {"labels": labels}},
            content_type=MERGE,
        )
        return str(updated["metadata"]["uid"])

    def _post_status(self) -> None:
        status = node_status(
            self._system,
            datetime.now(UTC),
            self._ready_since,
            hostname=self._name,
            kubelet_port=self._kubelet_port,
        )
        node = self._kube.request(
            "PATCH",
            f"/api/v1/nodes/{self._name}/status",
            body={"status": status},
            content_type=STRATEGIC_MERGE,
        )
        taints = cleared_taints(node)
        if taints is not None:
            # The resourceVersion makes this fail rather than undo someone else's taint change.
            version = node["metadata"]["resourceVersion"]
            self._kube.request(
                "PATCH",
                f"/api/v1/nodes/{self._name}",
                body={"metadata": {"resourceVersion": version}, "spec": {"taints": taints}},
                content_type=MERGE,
            )
            log.info("node %s: lifted the not-ready taint", self._name)

    def _renew_lease(self, node_uid: str) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{NODE_LEASE_NAMESPACE}/leases"
        now = datetime.now(UTC)
        spec = {
            "holderIdentity": self._name,
            "leaseDurationSeconds": LEASE_DURATION_SECONDS,
            "renewTime": micro_timestamp(now),
        }
        try:
            self._kube.request(
                "PATCH", f"{path}/{self._name}", body={"spec": spec}, content_type=MERGE
            )
        except ApiError as error:
            if error.status != 404:
                raise
            try:
                self._kube.request("POST", path, body=build_lease(self._name, node_uid, now))
            except ApiError as create_error:
                # The lease namespace may not exist yet; that must not look like a lost Node.
                raise RuntimeError(f"cannot create the node lease: {create_error}") from None
