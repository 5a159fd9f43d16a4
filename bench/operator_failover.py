"""Operator failover: how long after the Lease holder dies (SIGKILL) or stops (SIGTERM) the
standby holds the Lease and has reconciled an Agent created at that moment, against the
lease duration (the theoretical bound of a crash failover) in the same run.

Two operator processes run with election on, in a namespace of their own, on a cluster
started here (or the one given by --kubeconfig and --nats-url). Each round waits until the
standby is ready (/readyz: it has loaded what the handlers need and reaches the API
server), stops the holder, creates an Agent (placed on kwok nodes: Ready at once, nothing
runs), and times the Lease's new holder, the Agent's first status (the new holder's pass)
and its Ready condition; then it restarts the stopped replica as the next standby.

    .venv/bin/python bench/operator_failover.py --kills 5 --terms 3
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client, config

from troupe_devcluster.__main__ import cluster
from troupe_devcluster.components import venv_bin
from troupe_devcluster.layout import free_port
from troupe_operator.builders.lease import ElectionTimings

REPO = Path(__file__).resolve().parents[1]
LEASE = "troupe-operator"
KWOK_PLACEMENT = {
    "nodeSelector": {"type": "kwok"},
    "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}],
}
DEADLINE_SECONDS = 120.0
POLL_SECONDS = 0.05


def poll(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {DEADLINE_SECONDS:.0f}s")
        time.sleep(POLL_SECONDS)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


class Replica:
    """One operator process with election on; restarted under a new identity each time."""

    def __init__(
        self, name: str, kubeconfig: Path, nats_url: str, namespace: str, timings: ElectionTimings
    ) -> None:
        self.name = name
        self.health_port = free_port()
        self.env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "TROUPE_NATS_URL": nats_url,
            "TROUPE_HEALTH_PORT": str(self.health_port),
            "TROUPE_METRICS_PORT": str(free_port()),
            "TROUPE_LOG_FORMAT": "json",
            "POD_NAME": name,
        }
        self.args = [
            sys.executable, "-m", "troupe_operator", "--namespace", namespace,
            "--lease-namespace", namespace,
            "--lease-duration", str(timings.lease_duration),
            "--renew-deadline", str(timings.renew_deadline),
            "--retry-period", str(timings.retry_period),
        ]  # fmt: skip
        self.log = Path(tempfile.mkstemp(prefix=f"troupe-failover-{name}-", suffix=".log")[1])
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    def ready(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited; see {self.log}")
        return answers(f"http://127.0.0.1:{self.health_port}/readyz")

    def stop(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def reap(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Cluster:
    def __init__(self, kubeconfig: Path, namespace: str) -> None:
        api_client = config.new_client_from_config(str(kubeconfig))  # type: ignore[no-untyped-call]
        self.leases: Any = client.CoordinationV1Api(api_client)
        self.custom: Any = client.CustomObjectsApi(api_client)
        self.core: Any = client.CoreV1Api(api_client)
        self.namespace = namespace

    def holder(self) -> str:
        """The holding replica's name (the identity without its random part), or ""."""
        try:
            lease = self.leases.read_namespaced_lease(LEASE, self.namespace)
        except client.ApiException as error:
            if error.status == 404:
                return ""
            raise
        holder: str = lease.spec.holder_identity or ""
        return holder.rsplit("_", 1)[0]

    def create_agent(self, name: str) -> None:
        body = {
            "apiVersion": "troupe.dev/v1alpha1",
            "kind": "Agent",
            "metadata": {"name": name},
            "spec": {"role": "failover benchmark", "runtime": KWOK_PLACEMENT},
        }
        self.custom.create_namespaced_custom_object(
            "troupe.dev", "v1alpha1", self.namespace, "agents", body
        )

    def _agent(self, name: str) -> Any:
        return self.custom.get_namespaced_custom_object(
            "troupe.dev", "v1alpha1", self.namespace, "agents", name
        )

    def reconciled(self, name: str) -> bool:
        """A pass has written the Agent's status for its current generation."""
        body = self._agent(name)
        observed = (body.get("status") or {}).get("observedGeneration")
        return bool(observed == body["metadata"]["generation"])

    def ready(self, name: str) -> bool:
        conditions = (self._agent(name).get("status") or {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def kubectl(kubeconfig: Path, *args: str) -> str:
    result = subprocess.run(
        [str(venv_bin() / "kubectl"), f"--kubeconfig={kubeconfig}", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def one_round(
    kube: Cluster, replicas: dict[str, Replica], signum: signal.Signals, agent: str
) -> tuple[float, float, float]:
    """Stop the holder with ``signum``; the seconds until the standby holds the Lease, until
    it has reconciled the Agent created right after the stop, and until that is Ready."""
    poll(lambda: kube.holder() in replicas, "holder")
    holder = kube.holder()
    (standby,) = set(replicas) - {holder}
    poll(replicas[standby].ready, f"ready standby {standby}")
    poll(replicas[holder].ready, f"ready holder {holder}")
    stopped_at = time.monotonic()
    replicas[holder].stop(signum)
    kube.create_agent(agent)
    poll(lambda: kube.holder() == standby, f"{standby} holding the Lease")
    held = time.monotonic() - stopped_at
    poll(lambda: kube.reconciled(agent), f"Agent {agent} reconciled")
    reconciled = time.monotonic() - stopped_at
    poll(lambda: kube.ready(agent), f"Agent {agent} Ready")
    ready = time.monotonic() - stopped_at
    replicas[holder].reap()
    replicas[holder].start()
    return held, reconciled, ready


def summary(label: str, figures: list[float], bound: float) -> str:
    low, median, high = min(figures), statistics.median(figures), max(figures)
    return (
        f"{label:<32} min {low:6.2f}s  median {median:6.2f}s  max {high:6.2f}s"
        f"   median/lease {median / bound:5.2f}  max/lease {high / bound:5.2f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=5, help="SIGKILL rounds")
    parser.add_argument("--terms", type=int, default=3, help="SIGTERM rounds")
    defaults = ElectionTimings()
    parser.add_argument("--lease-duration", type=int, default=defaults.lease_duration)
    parser.add_argument("--renew-deadline", type=float, default=defaults.renew_deadline)
    parser.add_argument("--retry-period", type=float, default=defaults.retry_period)
    parser.add_argument("--kubeconfig", type=Path, help="use this cluster instead of starting one")
    parser.add_argument("--nats-url", help="the NATS of that cluster")
    args = parser.parse_args()
    timings = ElectionTimings(args.lease_duration, args.renew_deadline, args.retry_period)
    namespace = f"bench-failover-{uuid.uuid4().hex[:6]}"
    kills: list[tuple[float, float, float]] = []
    terms: list[tuple[float, float, float]] = []
    with cluster(args.kubeconfig, args.nats_url) as (kubeconfig, nats_url):
        kubectl(kubeconfig, "apply", "-f", str(REPO / "crds"))
        kubectl(kubeconfig, "wait", "--for=condition=Established", "crd/agents.troupe.dev")
        kubectl(kubeconfig, "create", "namespace", namespace)
        kube = Cluster(kubeconfig, namespace)
        replicas = {
            name: Replica(name, kubeconfig, nats_url, namespace, timings)
            for name in ("op-a", "op-b")
        }
        try:
            for replica in replicas.values():
                replica.start()
            for i in range(args.kills):
                kills.append(one_round(kube, replicas, signal.SIGKILL, f"kill-{i}"))
                print(
                    "SIGKILL {}: lease {:.2f}s, reconciled {:.2f}s, Ready {:.2f}s".format(
                        i, *kills[-1]
                    )
                )
            for i in range(args.terms):
                terms.append(one_round(kube, replicas, signal.SIGTERM, f"term-{i}"))
                print(
                    "SIGTERM {}: lease {:.2f}s, reconciled {:.2f}s, Ready {:.2f}s".format(
                        i, *terms[-1]
                    )
                )
            kubectl(kubeconfig, "delete", "agents", "--all", "-n", namespace, "--timeout=120s")
        finally:
            for replica in replicas.values():
                replica.reap()
            kubectl(kubeconfig, "delete", "namespace", namespace, "--wait=false")
        logs = ", ".join(str(replica.log) for replica in replicas.values())
    print(f"operator logs: {logs}", file=sys.stderr)
    bound = float(timings.lease_duration)
    print(
        f"lease duration {timings.lease_duration}s (the bound), renew deadline"
        f" {timings.renew_deadline}s, retry period {timings.retry_period}s"
    )
    for label, rounds in ((f"SIGKILL ({len(kills)})", kills), (f"SIGTERM ({len(terms)})", terms)):
        for column, what in enumerate(("Lease held", "Agent reconciled", "Agent Ready")):
            if rounds:
                print(summary(f"{label}: {what}", [r[column] for r in rounds], bound))
    print(json.dumps({"kills": kills, "terms": terms, "timings": timings.__dict__}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
