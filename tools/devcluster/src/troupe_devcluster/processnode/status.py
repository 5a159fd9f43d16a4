"""Pure builders of what the node writes to the API: pod status, Node and Lease.

The runtime keeps a snapshot of each container (``ContainerView``) and this
module turns it into the status a kubelet would report, so phase, condition
and container-status rules are unit-tested without processes or a cluster.

Pod statuses are sent as strategic merge patches: lists merge by their keys
(conditions by type, containerStatuses by name), so every state key the node
does not mean is sent as null to remove what an earlier patch wrote.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from troupe_devcluster.processnode.sources import JSON

NODE_IP = "127.0.0.1"
KUBELET_VERSION = "v1.36.3-troupe-process"
NODE_LEASE_NAMESPACE = "kube-node-lease"
LEASE_DURATION_SECONDS = 40
NODE_CAPACITY = {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "100Gi"}
NODE_LABELS = {"type": "process", "troupe.dev/process-node": "true"}
NOT_READY_TAINT_KEYS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")


def timestamp(moment: datetime) -> str:
    """An API ``Time``: RFC 3339 in UTC, whole seconds."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_timestamp(moment: datetime) -> str:
    """An API ``MicroTime``, as a Lease's renewTime wants."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Waiting:
    reason: str
    message: str = ""


@dataclass(frozen=True)
class Running:
    pid: int
    started_at: datetime


@dataclass(frozen=True)
class Terminated:
    exit_code: int
    reason: str
    finished_at: datetime
    started_at: datetime | None = None
    pid: int | None = None
    signal: int | None = None
    message: str = ""


State = Waiting | Running | Terminated


@dataclass(frozen=True)
class ContainerView:
    """A container as the runtime sees it at one moment."""

    name: str
    image: str
    state: State
    last_terminated: Terminated | None = None
    restart_count: int = 0
    ready: bool = False
    started: bool = False


@dataclass(frozen=True)
class PodView:
    """A pod as the runtime sees it at one moment."""

    pod_ip: str
    start_time: datetime
    init_containers: Sequence[ContainerView]
    containers: Sequence[ContainerView]


def _container_id(pid: int | None) -> str | None:
    return None if pid is None else f"process://{pid}"


def _terminated(state: Terminated) -> JSON:
    return {
        "exitCode": state.exit_code,
        "signal": state.signal,
        "reason": state.reason,
        "message": state.message or None,
        "startedAt": timestamp(state.started_at) if state.started_at else None,
        "finishedAt": timestamp(state.finished_at),
        "containerID": _container_id(state.pid),
    }


def _state(state: State) -> JSON:
    if isinstance(state, Waiting):
        waiting = {"reason": state.reason, "message": state.message or None}
        return {"waiting": waiting, "running": None, "terminated": None}
    if isinstance(state, Running):
        running = {"startedAt": timestamp(state.started_at)}
        return {"waiting": None, "running": running, "terminated": None}
    return {"waiting": None, "running": None, "terminated": _terminated(state)}


def container_status(view: ContainerView) -> JSON:
    """One entry of ``containerStatuses``; ``containerID`` is ``process://<pid>``."""
    pid = None
    if isinstance(view.state, Running | Terminated):
        pid = view.state.pid
    last = _terminated(view.last_terminated) if view.last_terminated else None
    return {
        "name": view.name,
        "image": view.image,
        "imageID": view.image,
        "containerID": _container_id(pid),
        "state": _state(view.state),
        "lastState": {"terminated": last},
        "ready": view.ready,
        "started": view.started,
        "restartCount": view.restart_count,
    }


def _succeeded(view: ContainerView) -> bool:
    return isinstance(view.state, Terminated) and view.state.exit_code == 0


def initialized(init_containers: Sequence[ContainerView]) -> bool:
    """Whether every init container has run to a successful end."""
    return all(_succeeded(view) for view in init_containers)


def pod_phase(
    restart_policy: str,
    init_containers: Sequence[ContainerView],
    containers: Sequence[ContainerView],
) -> str:
    """The pod phase from its containers, following the kubelet's getPhase."""
    failed_init = any(
        isinstance(view.state, Terminated) and view.state.exit_code != 0 for view in init_containers
    )
    if failed_init and restart_policy == "Never":
        return "Failed"
    if not initialized(init_containers):
        return "Pending"
    running = stopped = succeeded = waiting = 0
    for view in containers:
        if isinstance(view.state, Running):
            running += 1
        elif isinstance(view.state, Terminated):
            stopped += 1
            succeeded += view.state.exit_code == 0
        elif view.last_terminated is not None:
            stopped += 1
        else:
            waiting += 1
    if waiting:
        return "Pending"
    if running:
        return "Running"
    if not stopped:
        return "Pending"
    if restart_policy == "Always":
        return "Running"
    if stopped == succeeded:
        return "Succeeded"
    if restart_policy == "Never":
        return "Failed"
    return "Running"


def _condition(
    kind: str,
    status: bool,
    previous: Mapping[str, JSON],
    now: datetime,
    reason: str | None = None,
    message: str | None = None,
) -> JSON:
    value = "True" if status else "False"
    before = previous.get(kind)
    if before and before.get("status") == value and before.get("lastTransitionTime"):
        since = before["lastTransitionTime"]
    else:
        since = timestamp(now)
    return {
        "type": kind,
        "status": value,
        "reason": reason,
        "message": message,
        "lastProbeTime": None,
        "lastTransitionTime": since,
    }


def _names(views: Sequence[ContainerView]) -> str:
    return "[" + " ".join(view.name for view in views) + "]"


def _gate_problem(pod: JSON) -> str | None:
    """Why the pod's readiness gates hold it back, or None when they all pass."""
    current = {
        condition["type"]: condition.get("status")
        for condition in (pod.get("status") or {}).get("conditions") or []
    }
    for gate in (pod.get("spec") or {}).get("readinessGates") or []:
        kind = gate["conditionType"]
        if kind not in current:
            return f'corresponding condition of pod readiness gate "{kind}" does not exist.'
        if current[kind] != "True":
            return f'the status of pod readiness gate "{kind}" is not "True", but {current[kind]}'
    return None


def pod_conditions(
    pod: JSON, view: PodView, phase: str, previous: Sequence[JSON], now: datetime
) -> list[JSON]:
    """PodScheduled, PodReadyToStartContainers, Initialized, ContainersReady and Ready.

    ``lastTransitionTime`` is kept from ``previous`` unless the status flips.
    """
    before = {condition["type"]: condition for condition in previous}
    pending_init = [v for v in view.init_containers if not _succeeded(v)]
    init_reason = init_message = None
    if pending_init:
        init_reason = "ContainersNotInitialized"
        init_message = f"containers with incomplete status: {_names(pending_init)}"
    unready = [v for v in view.containers if not v.ready]
    reason: str | None = None
    message: str | None = None
    if unready and phase == "Succeeded":
        reason = "PodCompleted"
    elif unready:
        reason = "ContainersNotReady"
        message = f"containers with unready status: {_names(unready)}"
    gate = _gate_problem(pod)
    ready_reason, ready_message = reason, message
    if gate and not unready:
        ready_reason, ready_message = "ReadinessGatesNotReady", gate
    return [
        _condition("PodScheduled", True, before, now),
        _condition("PodReadyToStartContainers", True, before, now),
        _condition("Initialized", not pending_init, before, now, init_reason, init_message),
        _condition("ContainersReady", not unready, before, now, reason, message),
        _condition("Ready", not unready and not gate, before, now, ready_reason, ready_message),
    ]


def build_pod_status(pod: JSON, view: PodView, previous: JSON | None, now: datetime) -> JSON:
    """The status the node reports for ``pod``.

    ``previous`` is the status last written (or read); conditions keep its
    transition times when their status has not changed, so building twice
    with nothing changed yields equal dicts and the caller can skip the write.
    """
    restart_policy = (pod.get("spec") or {}).get("restartPolicy", "Always")
    phase = pod_phase(restart_policy, view.init_containers, view.containers)
    earlier = (previous or {}).get("conditions") or []
    status: JSON = {
        "phase": phase,
        "conditions": pod_conditions(pod, view, phase, earlier, now),
        "hostIP": NODE_IP,
        "hostIPs": [{"ip": NODE_IP}],
        "podIP": view.pod_ip,
        "podIPs": [{"ip": view.pod_ip}],
        "startTime": timestamp(view.start_time),
        "containerStatuses": [container_status(v) for v in view.containers],
    }
    if view.init_containers:
        status["initContainerStatuses"] = [container_status(v) for v in view.init_containers]
    return status


@dataclass(frozen=True)
class NodeSystem:
    """Facts about the host for ``status.nodeInfo``."""

    machine_id: str
    boot_id: str
    kernel_version: str
    os_image: str
    architecture: str


def _node_condition(
    kind: str, status: str, reason: str, message: str, now: str, since: str
) -> JSON:
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastHeartbeatTime": now,
        "lastTransitionTime": since,
    }


def node_status(
    system: NodeSystem,
    now: datetime,
    ready_since: datetime,
    *,
    hostname: str = "",
    kubelet_port: int = 0,
) -> JSON:
    """The Node's status: Ready, no pressure, fixed capacity, loopback address.

    ``kubelet_port`` is where the API server reaches the node's kubelet
    endpoint (``kubectl logs``), at the InternalIP; ``hostname`` is advertised
    too, as a kubelet does, though nothing resolves it.
    """
    addresses = [{"type": "InternalIP", "address": NODE_IP}]
    if hostname:
        addresses.append({"type": "Hostname", "address": hostname})
    beat, since = timestamp(now), timestamp(ready_since)
    return {
        "conditions": [
            _node_condition(
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "process node has sufficient memory available",
                beat,
                since,
            ),
            _node_condition(
                "DiskPressure",
                "False",
                "KubeletHasNoDiskPressure",
                "process node has no disk pressure",
                beat,
                since,
            ),
            _node_condition(
                "PIDPressure",
                "False",
                "KubeletHasSufficientPID",
                "process node has sufficient PID available",
                beat,
                since,
            ),
            _node_condition(
                "Ready", "True", "KubeletReady", "process node is posting ready status", beat, since
            ),
        ],
        "addresses": addresses,
        "capacity": dict(NODE_CAPACITY),
        "allocatable": dict(NODE_CAPACITY),
        "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
        "nodeInfo": {
            "machineID": system.machine_id,
            "systemUUID": system.machine_id,
            "bootID": system.boot_id,
            "kernelVersion": system.kernel_version,
            "osImage": system.os_image,
            "containerRuntimeVersion": "process://" + KUBELET_VERSION,
            "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": system.architecture,
        },
    }


def node_labels(name: str, architecture: str) -> dict[str, str]:
    return {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": architecture,
        **NODE_LABELS,
    }


def build_node(
    name: str, system: NodeSystem, now: datetime, ready_since: datetime, kubelet_port: int = 0
) -> JSON:
    """The whole Node object to create; its status is also sent on every heartbeat."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": node_labels(name, system.architecture)},
        "spec": {},
        "status": node_status(system, now, ready_since, hostname=name, kubelet_port=kubelet_port),
    }


def cleared_taints(node: JSON) -> list[JSON] | None:
    """The Node's taints without the not-ready/unreachable ones, or None if it has none.

    Admission taints every new Node not-ready, and it is the node lifecycle
    controller that lifts the taint once the Node reports Ready. A dev cluster
    may run without that controller, so the node lifts it itself while healthy.
    """
    taints = (node.get("spec") or {}).get("taints") or []
    kept = [taint for taint in taints if taint.get("key") not in NOT_READY_TAINT_KEYS]
    return kept if len(kept) != len(taints) else None


def build_lease(node_name: str, node_uid: str, now: datetime) -> JSON:
    """The node's heartbeat Lease in ``kube-node-lease``, owned by its Node."""
    owner: JSON = {
        "apiVersion": "v1",
        "kind": "Node",
        "name": node_name,
        "uid": node_uid,
    }
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": node_name,
            "namespace": NODE_LEASE_NAMESPACE,
            "ownerReferences": [owner],
        },
        "spec": {
            "holderIdentity": node_name,
            "leaseDurationSeconds": LEASE_DURATION_SECONDS,
            "renewTime": micro_timestamp(now),
        },
    }
