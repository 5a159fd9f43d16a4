"""``python -m troupe_devcluster.processnode``: run the process node until SIGTERM/SIGINT.

On either signal it stops every pod process (SIGTERM, SIGKILL after
``--shutdown-grace``) and exits 0; the Node and the pods stay in the API, as
they would when a kubelet stops.

With ``--kubelet-port`` and the TLS files it also serves the kubelet's
container-logs endpoint (``kubelet``) on the node's address, which the Node
advertises so the API server can proxy ``kubectl logs`` to it.

Pod IPs are handed out in order from a random point of ``--ip-range``: two
clusters on one machine (parallel test runs) share the loopback, and starting
both at 127.1.0.1 would make their pods fight over the same address and port.
"""

from __future__ import annotations

import argparse
import logging
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType

from troupe_devcluster.processnode import mountexec
from troupe_devcluster.processnode.ipam import IPPool
from troupe_devcluster.processnode.kube import Kube
from troupe_devcluster.processnode.kubelet import Authorizer, KubeletServer
from troupe_devcluster.processnode.node import NodeAgent, host_system
from troupe_devcluster.processnode.pods import PodManager
from troupe_devcluster.processnode.runtime import NodeContext
from troupe_devcluster.processnode.status import NODE_IP

log = logging.getLogger("troupe_devcluster.processnode")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m troupe_devcluster.processnode",
        description="Register a Node and run its pods' containers as local processes.",
    )
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--node-name", required=True)
    parser.add_argument("--workdir", type=Path, required=True, help="pod dirs go under here")
    parser.add_argument(
        "--ip-range", default="127.1.0.0/16", help="loopback range pod IPs come from"
    )
    parser.add_argument(
        "--ip-start",
        type=int,
        default=None,
        help="offset into --ip-range of the first pod IP (default: random; 0 is 127.1.0.1)",
    )
    parser.add_argument(
        "--kubelet-port",
        type=int,
        default=0,
        help="port of the kubelet endpoint on 127.0.0.1 (0: serve none)",
    )
    parser.add_argument("--tls-cert-file", type=Path, help="the endpoint's serving certificate")
    parser.add_argument("--tls-private-key-file", type=Path, help="its key")
    parser.add_argument(
        "--client-ca-file", type=Path, help="the CA client certificates must be signed by"
    )
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=5.0,
        help="seconds pod processes get between SIGTERM and SIGKILL when the node stops",
    )
    args = parser.parse_args(argv)
    tls = (args.tls_cert_file, args.tls_private_key_file, args.client_ca_file)
    if args.kubelet_port and not all(tls):
        parser.error("--kubelet-port needs the three TLS files: cert, key and client CA")
    return args


def mount_namespaces_work() -> bool:
    """Whether containers can get mount namespaces here (the node runs as root)."""
    try:
        result = subprocess.run(
            mountexec.probe_argv(sys.executable), capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        log.warning("no mount namespaces (%s); volumes only under TROUPE_MOUNT_ROOT", error)
        return False
    if result.returncode != 0:
        reason = result.stderr.strip() or f"exit code {result.returncode}"
        log.warning("no mount namespaces (%s); volumes only under TROUPE_MOUNT_ROOT", reason)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    # The API client's own retries would log every attempt while the API server is down.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    stop = threading.Event()

    def on_signal(number: int, _frame: FrameType | None) -> None:
        log.info("received %s; stopping", signal.Signals(number).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    (args.workdir / "pods").mkdir(parents=True, exist_ok=True)
    kube = Kube.from_kubeconfig(args.kubeconfig)
    start = random.randrange(1 << 16) if args.ip_start is None else args.ip_start
    real_mounts = mount_namespaces_work()
    context = NodeContext(
        kube,
        args.node_name,
        args.workdir,
        IPPool(args.ip_range, start),
        api_server=kube.server,
        real_mounts=real_mounts,
    )
    pods = PodManager(context)
    server: KubeletServer | None = None
    if args.kubelet_port:
        server = KubeletServer(
            (NODE_IP, args.kubelet_port),
            args.tls_cert_file,
            args.tls_private_key_file,
            args.client_ca_file,
            pods,
            Authorizer(kube, args.node_name).allowed,
        )
        server.start()
    agent = NodeAgent(kube, args.node_name, host_system(), args.kubelet_port)
    threading.Thread(target=agent.run, args=(stop,), name="heartbeat", daemon=True).start()
    threading.Thread(target=pods.run, args=(stop,), name="pod-watch", daemon=True).start()
    log.info(
        "process node %s running; pods under %s; volumes %s",
        args.node_name,
        args.workdir,
        "mounted at their mountPaths" if real_mounts else "only under TROUPE_MOUNT_ROOT",
    )
    while not stop.wait(1.0):
        pass
    if server is not None:
        server.stop()
    pods.shutdown(args.shutdown_grace)
    log.info("process node %s stopped", args.node_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
