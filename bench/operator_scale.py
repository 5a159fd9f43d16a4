"""Time N Agents until Ready against N equivalent plain Deployments until Available.

Both land on kwok nodes (Ready at once, nothing runs), in the same run on one
cluster started here (or the one given by --kubeconfig and --nats-url). The
"equivalent" Deployments have the very pod template the operator builds. The
operator runs as a subprocess; its peak RSS is read from /proc (VmHWM).

    .venv/bin/python bench/operator_scale.py --agents 100
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from troupe_devcluster.__main__ import cluster
from troupe_devcluster.components import venv_bin
from troupe_devcluster.layout import free_port
from troupe_operator.api import AgentSpec
from troupe_operator.builders import workload
from troupe_operator.builders.pods import Owner

REPO = Path(__file__).resolve().parents[1]
KWOK_PLACEMENT = {
    "nodeSelector": {"type": "kwok"},
    "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}],
}
DEADLINE_SECONDS = 900.0


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        [str(venv_bin() / "kubectl"), f"--kubeconfig={kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def agent_manifest(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "troupe.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": name},
        "spec": {"role": "benchmark", "runtime": KWOK_PLACEMENT},
    }


def deployment_manifest(namespace: str, name: str) -> dict[str, Any]:
    """The Deployment the operator would build for ``agent_manifest(name)``, unowned."""
    spec = AgentSpec.model_validate(agent_manifest(name)["spec"])
    owner = Owner(namespace, name, uid="")
    config = workload.build_runtime_config(owner, spec, "nats://nats:4222")
    deployment = workload.build_deployment(owner, spec, config)
    del deployment["metadata"]["ownerReferences"]
    return deployment


def create_all(kubeconfig: Path, namespace: str, items: list[dict[str, Any]]) -> None:
    listing = {"apiVersion": "v1", "kind": "List", "items": items}
    kubectl(kubeconfig, "create", "-n", namespace, "-f", "-", stdin=json.dumps(listing))


def count(kubeconfig: Path, namespace: str, kind: str, done: Callable[[Any], bool]) -> int:
    items = json.loads(kubectl(kubeconfig, "get", kind, "-n", namespace, "-o", "json"))["items"]
    return sum(1 for item in items if done(item))


def agent_ready(item: Any) -> bool:
    conditions = (item.get("status") or {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def deployment_available(item: Any) -> bool:
    status = item.get("status") or {}
    return bool(status.get("availableReplicas", 0) >= item["spec"]["replicas"])


def time_until(
    kubeconfig: Path,
    namespace: str,
    kind: str,
    n: int,
    done: Callable[[Any], bool],
    create: Callable[[], None],
) -> float:
    started = time.monotonic()
    create()
    while count(kubeconfig, namespace, kind, done) < n:
        if time.monotonic() - started > DEADLINE_SECONDS:
            raise TimeoutError(f"{kind} not all ready within {DEADLINE_SECONDS:.0f}s")
        time.sleep(0.5)
    return time.monotonic() - started


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc status")


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextmanager
def operator(kubeconfig: Path, nats_url: str, namespace: str) -> Iterator[subprocess.Popen[bytes]]:
    """The operator, started and healthy before any timing begins."""
    health_port = free_port()
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "TROUPE_NATS_URL": nats_url,
        "TROUPE_METRICS_PORT": str(free_port()),
        "TROUPE_HEALTH_PORT": str(health_port),
    }
    with tempfile.NamedTemporaryFile(prefix="troupe-operator-", suffix=".log", delete=False) as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "troupe_operator", "--standalone", "--namespace", namespace],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    print(f"operator log: {log.name}", file=sys.stderr)
    try:
        while not healthy(f"http://127.0.0.1:{health_port}/healthz"):
            if process.poll() is not None:
                raise RuntimeError(f"the operator exited; see {log.name}")
            time.sleep(0.2)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=100, help="N")
    parser.add_argument("--kubeconfig", type=Path, help="use this cluster instead of starting one")
    parser.add_argument("--nats-url", help="the NATS of that cluster")
    args = parser.parse_args()
    n: int = args.agents
    with cluster(args.kubeconfig, args.nats_url) as (kubeconfig, nats_url):
        kubectl(kubeconfig, "apply", "-f", str(REPO / "crds"))
        kubectl(kubeconfig, "wait", "--for=condition=Established", "crd/agents.troupe.dev")
        agents_ns, deployments_ns = f"bench-agents-{n}", f"bench-deployments-{n}"
        for namespace in (agents_ns, deployments_ns):
            kubectl(kubeconfig, "create", "namespace", namespace)
            while not kubectl(kubeconfig, "get", "serviceaccounts", "-n", namespace, "-o", "name"):
                time.sleep(0.2)
        try:
            with operator(kubeconfig, nats_url, agents_ns) as process:
                agents = time_until(
                    kubeconfig,
                    agents_ns,
                    "agents",
                    n,
                    agent_ready,
                    lambda: create_all(
                        kubeconfig, agents_ns, [agent_manifest(f"a{i}") for i in range(n)]
                    ),
                )
                kubectl(kubeconfig, "delete", "agents", "--all", "-n", agents_ns, "--timeout=600s")
                rss = peak_rss_mib(process.pid)
            deployments = time_until(
                kubeconfig,
                deployments_ns,
                "deployments",
                n,
                deployment_available,
                lambda: create_all(
                    kubeconfig,
                    deployments_ns,
                    [deployment_manifest(deployments_ns, f"a{i}") for i in range(n)],
                ),
            )
        finally:
            for namespace in (agents_ns, deployments_ns):
                kubectl(kubeconfig, "delete", "namespace", namespace, "--wait=false")
    print(f"N={n}")
    print(f"agents ready:          {agents:7.1f}s")
    print(f"deployments available: {deployments:7.1f}s")
    print(f"ratio:                 {agents / deployments:7.2f}")
    print(f"operator peak RSS:     {rss:7.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
