"""Where a local cluster keeps its files and which loopback ports it listens on.

The layout is plain data, decided once at start-up and saved to the cluster's
state file, so that ``down`` and ``env`` need nothing but that file.
"""

from __future__ import annotations

import json
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path

from troupe_devcluster.pki import PKIPaths

KWOK_NODE_COUNT = 2
PROCESS_NODE_NAME = "process-node"


def free_port() -> int:
    """Ask the kernel for a loopback port that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Ports:
    """Every loopback port one cluster uses."""

    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int
    kwok: int
    nats: int
    nats_monitor: int
    # The process node's kubelet endpoint (container logs), on the node's address.
    kubelet: int

    @classmethod
    def allocate(cls) -> Ports:
        """Pick a distinct free port for each component."""
        chosen: set[int] = set()
        values: dict[str, int] = {}
        for name in cls.__dataclass_fields__:
            port = free_port()
            while port in chosen:
                port = free_port()
            chosen.add(port)
            values[name] = port
        return cls(**values)


@dataclass(frozen=True)
class NatsNode:
    """One nats-server of a JetStream cluster: its client, monitoring and route ports."""

    client: int
    monitor: int
    cluster: int

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client}"

    @property
    def route(self) -> str:
        return f"nats://127.0.0.1:{self.cluster}"


def allocate_nats_nodes(count: int, ports: Ports) -> list[NatsNode]:
    """``count`` servers' ports: the first uses ``ports``' NATS pair, the rest fresh ones.

    None for a single server, which runs with no cluster (and no route port)."""
    if count <= 1:
        return []
    taken = set(vars(ports).values())

    def fresh() -> int:
        port = free_port()
        while port in taken:
            port = free_port()
        taken.add(port)
        return port

    first = NatsNode(ports.nats, ports.nats_monitor, fresh())
    return [first, *(NatsNode(fresh(), fresh(), fresh()) for _ in range(count - 1))]


@dataclass(frozen=True)
class Layout:
    """The directory and ports of one local cluster.

    ``nats_nodes`` lists the servers of a NATS cluster; empty, one lone server runs on
    ``ports.nats`` (the default: a single server is all most tests need)."""

    root: Path
    ports: Ports
    pids: dict[str, int] = field(default_factory=dict)
    nats_nodes: list[NatsNode] = field(default_factory=list)

    @property
    def pki(self) -> PKIPaths:
        return PKIPaths.under(self.root / "pki")

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def apiserver_url(self) -> str:
        return f"https://127.0.0.1:{self.ports.apiserver}"

    @property
    def nats_url(self) -> str:
        """Every server's URL, comma-separated: clients are given all of them."""
        if self.nats_nodes:
            return ",".join(node.url for node in self.nats_nodes)
        return f"nats://127.0.0.1:{self.ports.nats}"

    @property
    def nats_replicas(self) -> int:
        """The replicas streams should have here: one per server, up to 3."""
        return min(len(self.nats_nodes), 3) or 1

    def log_of(self, component: str) -> Path:
        return self.logs / f"{component}.log"

    def to_json(self) -> str:
        data = asdict(self)
        data["root"] = str(self.root)
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Layout:
        data = json.loads(text)
        # A cluster started before the kubelet endpoint existed has none: 0 says so, and
        # `down` still finds its processes.
        ports = Ports(**{"kubelet": 0, **data["ports"]})
        nodes = [NatsNode(**node) for node in data.get("nats_nodes", [])]
        return cls(root=Path(data["root"]), ports=ports, pids=data["pids"], nats_nodes=nodes)
