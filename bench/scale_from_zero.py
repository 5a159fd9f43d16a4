"""Scale-from-zero: how long after a message is published to an Agent at zero replicas its
result is stored, against the same message to an always-running Agent in the same run.

One operator (a subprocess, ``--autoscale-seconds`` between lag reads) on a cluster started
here (or the one given by --kubeconfig and --nats-url) runs two Agents on the process node,
both with the tests' append-name handler: ``warm`` with one fixed replica, ``cold`` with
``autoscale: {minReplicas: 0, scaleToZeroAfter: <--idle>}``. Each round waits until ``cold``
is at zero with no pod left, publishes one message to each (warm first, then cold), and
times each until its output is in the output stream. The delay from zero is the autoscaler's
poll (at most --autoscale-seconds), one pass, the pod's start (process node: a process, not
an image pull) and the runtime's own start.

    .venv/bin/python bench/scale_from_zero.py --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
from kubernetes import client, config
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from troupe_devcluster.__main__ import cluster
from troupe_devcluster.components import venv_bin
from troupe_devcluster.layout import free_port
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.envelope import CloudEvent

REPO = Path(__file__).resolve().parents[1]
HANDLER = "tests.integration.workflow_handlers:append_name"
NAME_ENV = "TEST_APPEND_NAME"
DEADLINE_SECONDS = 120.0
POLL_SECONDS = 0.02


def poll(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {DEADLINE_SECONDS:.0f}s")
        time.sleep(POLL_SECONDS)


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        [str(venv_bin() / "kubectl"), f"--kubeconfig={kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def agent(name: str, output: str, runtime: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "troupe.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": name},
        "spec": {
            "role": "scale-from-zero benchmark",
            "contract": {"outputSubjects": [output]},
            "runtime": {
                "handler": {"type": "python", "entrypoint": HANDLER},
                "env": [
                    {"name": "PYTHONPATH", "value": str(REPO)},
                    {"name": NAME_ENV, "value": name},
                ],
                **runtime,
            },
        },
    }


class Nats:
    """One connection on a loop of its own, for synchronous calls from the rounds."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.connection = self.loop.run_until_complete(nats.connect(url))
        self.js: JetStreamContext = self.connection.jetstream()

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def publish(self, namespace: str, name: str) -> None:
        event = CloudEvent(id=uuid.uuid4().hex, source="/bench", type="bench.input", data=[])
        headers, payload = envelope.to_binary(event)
        subject = naming.inbox_subject(namespace, name, 0)
        self.run(self.js.publish(subject, payload, headers=headers))

    def stored(self, stream: str, subject: str) -> int:
        info = self.run(self.js.stream_info(stream, subjects_filter=subject))
        return int((info.state.subjects or {}).get(subject, 0))

    def close(self) -> None:
        self.run(self.connection.close())
        self.loop.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--autoscale-seconds", type=float, default=2.0)
    parser.add_argument("--idle", default="3s", help="scaleToZeroAfter of the cold agent")
    parser.add_argument("--kubeconfig", type=Path, help="use this cluster instead of starting one")
    parser.add_argument("--nats-url", help="the NATS of that cluster")
    args = parser.parse_args()
    namespace = f"bench-zero-{uuid.uuid4().hex[:6]}"
    stream = f"BENCH_{namespace.replace('-', '_')}"
    warm_out, cold_out = f"bench.{namespace}.warm", f"bench.{namespace}.cold"
    warm_times: list[float] = []
    cold_times: list[float] = []
    log = Path(tempfile.mkstemp(prefix="troupe-scale-from-zero-", suffix=".log")[1])
    with cluster(args.kubeconfig, args.nats_url) as (kubeconfig, nats_url):
        kubectl(kubeconfig, "apply", "-f", str(REPO / "crds"))
        kubectl(kubeconfig, "wait", "--for=condition=Established", "crd/agents.troupe.dev")
        kubectl(kubeconfig, "create", "namespace", namespace)
        core: Any = client.CoreV1Api(config.new_client_from_config(str(kubeconfig)))  # type: ignore[no-untyped-call]
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "TROUPE_NATS_URL": nats_url,
            "TROUPE_HEALTH_PORT": str(free_port()),
            "TROUPE_METRICS_PORT": str(free_port()),
            "TROUPE_AUTOSCALE_SECONDS": str(args.autoscale_seconds),
        }
        command = [sys.executable, "-m", "troupe_operator", "--standalone", "-n", namespace]
        with log.open("ab") as out:
            operator = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        bus = Nats(nats_url)
        try:
            bus.run(bus.js.add_stream(StreamConfig(name=stream, subjects=[warm_out, cold_out])))
            policy = {"minReplicas": 0, "maxReplicas": 1, "scaleToZeroAfter": args.idle}
            manifests = [
                agent("warm", warm_out, {"replicas": 1}),
                agent("cold", cold_out, {"autoscale": policy}),
            ]
            for manifest in manifests:
                kubectl(kubeconfig, "apply", "-n", namespace, "-f", "-", stdin=json.dumps(manifest))
            for name in ("warm", "cold"):
                kubectl(
                    kubeconfig, "wait", "-n", namespace, "--for=condition=Ready",
                    f"agent/{name}", "--timeout=120s",
                )  # fmt: skip

            def cold_pods() -> int:
                selector = "troupe.dev/agent=cold"
                return len(core.list_namespaced_pod(namespace, label_selector=selector).items)

            def replicas(name: str) -> int:
                body = json.loads(
                    kubectl(kubeconfig, "get", "deployment", name, "-n", namespace, "-o", "json")
                )
                return int(body["spec"].get("replicas", 1))

            def timed(name: str, output: str) -> float:
                before = bus.stored(stream, output)
                start = time.monotonic()
                bus.publish(namespace, name)
                poll(lambda: bus.stored(stream, output) > before, f"{name}'s output")
                return time.monotonic() - start

            for i in range(args.rounds):
                poll(lambda: replicas("cold") == 0 and cold_pods() == 0, "cold agent at zero")
                warm_times.append(timed("warm", warm_out))
                cold_times.append(timed("cold", cold_out))
                print(f"round {i}: warm {warm_times[-1]:.3f}s, from zero {cold_times[-1]:.3f}s")
            kubectl(kubeconfig, "delete", "agents", "--all", "-n", namespace, "--timeout=120s")
        finally:
            operator.terminate()
            operator.wait(20)
            bus.run(bus.js.delete_stream(stream))
            bus.close()
            kubectl(kubeconfig, "delete", "namespace", namespace, "--wait=false")
    print(f"operator log: {log}", file=sys.stderr)
    warm, cold = statistics.median(warm_times), statistics.median(cold_times)
    print(
        f"median of {args.rounds}: always running {warm:.3f}s, from zero {cold:.3f}s "
        f"(max {max(cold_times):.3f}s), ratio {cold / warm:.1f}x, autoscaler poll "
        f"{args.autoscale_seconds}s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
