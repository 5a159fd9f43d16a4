"""Chaos soak: a steady load through a real agent while its pods, its operator and one of
three NATS servers are killed; prints what was lost, duplicated and dead-lettered, and how
long the system took to recover once the faults stopped.

It starts a local cluster with a three-server JetStream cluster (``launcher.up(...,
nats_nodes=3)``), the operator (``TROUPE_NATS_REPLICAS=3``: every stream and bucket on all
three servers) and an Agent of ``--pods`` replicas on the process node, running the tests'
``append_name`` handler (its output names the input). Then it publishes ``--messages`` events
at ``--rate`` per second, each with its own id (``Nats-Msg-Id``: a publish retried after a
lost ack is dropped as a duplicate), and meanwhile:

- every ``--pod-kill-every`` seconds deletes one of the agent's pods at once (grace period 0:
  the process node SIGKILLs it; the Deployment makes another);
- every ``--operator-kill-every`` seconds SIGKILLs the operator and starts it again;
- once, when half the load is out, SIGKILLs the NATS server leading the agent's inbox stream,
  and starts it again ``--nats-down`` seconds later.

The faults stop with the last publish; the soak then waits until every input is answered
(or ``--drain`` seconds pass). Outputs are read from their stream by sequence, so an input
answered twice (two stored outputs) counts as duplicated, whatever JetStream's duplicate
window dropped. "Time to recover" is from the last fault to the last missing answer.

    make chaos            # or: PYTHONPATH=. .venv/bin/python bench/chaos_soak.py
    make chaos ARGS="--messages 2000 --rate 100"

Not part of ``make test``: it runs for minutes and loads the machine on purpose.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from kubernetes import client, config
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from tests.integration.workflow_handlers import NAME_ENV
from troupe_devcluster import launcher
from troupe_devcluster.__main__ import build_binaries
from troupe_devcluster.components import venv_bin
from troupe_devcluster.layout import Layout, free_port
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.agent_resources import DUPLICATE_WINDOW_SECONDS
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.nats_servers import server_urls

REPO = Path(__file__).resolve().parents[1]
AGENT = "soaked"
READY_DEADLINE_SECONDS = 120.0
PUBLISH_ATTEMPT_SECONDS = 2.0


@dataclass
class Faults:
    """What the chaos thread did, and when it last did anything."""

    pod_kills: int = 0
    operator_kills: int = 0
    nats_kills: int = 0
    last: float = 0.0
    log: list[str] = field(default_factory=list)

    def note(self, started: float, what: str) -> None:
        self.last = time.monotonic()
        self.log.append(f"{self.last - started:7.1f}s {what}")


class Operator:
    """The operator as a subprocess, restartable after a SIGKILL."""

    def __init__(self, layout: Layout, namespace: str, log: Path) -> None:
        self.env = {
            **os.environ,
            "KUBECONFIG": str(layout.kubeconfig),
            "TROUPE_NATS_URL": layout.nats_url,
            "TROUPE_NATS_REPLICAS": str(layout.nats_replicas),
            "TROUPE_RESYNC_SECONDS": "3",
            "TROUPE_HEALTH_PORT": str(free_port()),
            "TROUPE_METRICS_PORT": "0",
        }
        self.args = [sys.executable, "-m", "troupe_operator", "--standalone", "--namespace",
                     namespace]  # fmt: skip
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.args, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(20)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def kubectl(layout: Layout, *args: str) -> str:
    result = subprocess.run(
        [str(venv_bin() / "kubectl"), f"--kubeconfig={layout.kubeconfig}", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def agent_manifest(namespace: str, pods: int) -> dict[str, Any]:
    return {
        "apiVersion": "troupe.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": AGENT},
        "spec": {
            "role": "chaos soak",
            "runtime": {
                "replicas": pods,
                "handler": {
                    "type": "python",
                    "entrypoint": "tests.integration.workflow_handlers:append_name",
                },
                "env": [
                    {"name": "PYTHONPATH", "value": f"{REPO / 'agent-runtime' / 'src'}:{REPO}"},
                    {"name": NAME_ENV, "value": AGENT},
                ],
            },
            "contract": {"outputSubjects": [f"out.{namespace}.result"]},
            "messaging": {"ackWait": "30s", "maxInFlight": 16},
            "timeout": "5s",
        },
    }


def wait(condition: Any, what: str, within: float = READY_DEADLINE_SECONDS) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {within:.0f}s")
        time.sleep(0.5)


def agent_ready(custom: Any, namespace: str) -> bool:
    body = custom.get_namespaced_custom_object("troupe.dev", "v1alpha1", namespace, "agents", AGENT)
    conditions = (body.get("status") or {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def running_pods(core: Any, namespace: str) -> list[str]:
    pods = core.list_namespaced_pod(namespace, label_selector=f"troupe.dev/agent={AGENT}").items
    return [p.metadata.name for p in pods if p.status.phase == "Running"]


def chaos(
    args: argparse.Namespace,
    layout: Layout,
    operator: Operator,
    core: Any,
    namespace: str,
    faults: Faults,
    stop: threading.Event,
    started: float,
) -> None:
    """Kill pods and the operator on their periods until ``stop`` is set."""
    next_pod = next_operator = time.monotonic()
    next_pod += args.pod_kill_every
    next_operator += args.operator_kill_every
    while not stop.wait(0.2):
        now = time.monotonic()
        if now >= next_pod:
            next_pod = now + args.pod_kill_every
            pods = running_pods(core, namespace)
            if pods:
                victim = random.choice(pods)
                try:
                    core.delete_namespaced_pod(victim, namespace, grace_period_seconds=0)
                except client.ApiException as error:
                    if error.status != 404:
                        raise
                faults.pod_kills += 1
                faults.note(started, f"killed pod {victim}")
        if now >= next_operator:
            next_operator = now + args.operator_kill_every
            operator.kill()
            operator.start()
            faults.operator_kills += 1
            faults.note(started, "killed and restarted the operator")


def event(namespace: str, index: int) -> tuple[str, bytes, dict[str, str]]:
    cloud_event = CloudEvent(id=f"soak-{index}", source="/bench/chaos", type="soak", data=[index])
    headers, payload = envelope.to_binary(cloud_event)
    headers["Nats-Msg-Id"] = cloud_event.id
    return naming.inbox_subject(namespace, AGENT, 0), payload, headers


async def publish_until_stored(
    js: JetStreamContext, subject: str, payload: bytes, headers: dict[str, str]
) -> None:
    while True:
        try:
            await js.publish(subject, payload, headers=headers, timeout=PUBLISH_ATTEMPT_SECONDS)
            return
        except (nats.errors.Error, TimeoutError, OSError):
            await asyncio.sleep(0.2)


class Answers:
    """Every output the agent stored, by stream sequence, from an ordered consumer."""

    def __init__(self, expected: int) -> None:
        self.by_sequence: dict[int, int] = {}
        self.answered: set[int] = set()
        self.expected = expected
        self.complete = asyncio.Event()
        self.last_new = 0.0

    async def on_output(self, msg: Msg) -> None:
        data = envelope.parse(msg.headers, msg.data).data
        sequence = msg.metadata.sequence.stream
        if sequence not in self.by_sequence:
            self.by_sequence[sequence] = int(data[0])
            if int(data[0]) not in self.answered:
                self.answered.add(int(data[0]))
                self.last_new = time.monotonic()
            if len(self.answered) >= self.expected:
                self.complete.set()

    def counts(self) -> Counter[int]:
        return Counter(self.by_sequence.values())


async def soak(args: argparse.Namespace, layout: Layout, namespace: str, operator: Operator,
               core: Any) -> None:  # fmt: skip
    url = layout.nats_url
    nc = await nats.connect(server_urls(url), max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    js = nc.jetstream()
    answers = Answers(args.messages)
    await js.subscribe(f"out.{namespace}.>", cb=answers.on_output, ordered_consumer=True)
    faults = Faults()
    stop = threading.Event()
    started = time.monotonic()
    thread = threading.Thread(
        target=chaos,
        args=(args, layout, operator, core, namespace, faults, stop, started),
        daemon=True,
    )
    thread.start()
    killed_nats: int | None = None
    nats_back_at = 0.0
    try:
        for index in range(args.messages):
            if index == args.messages // 2:
                leader = (await js.stream_info(naming.inbox_stream(namespace, AGENT))).cluster
                assert leader is not None, "the inbox is not on a cluster"
                assert leader.leader, "the inbox has no leader"
                killed_nats = int(leader.leader.removeprefix("nats-"))
                await asyncio.to_thread(launcher.kill_nats_node, layout, killed_nats)
                faults.nats_kills += 1
                faults.note(started, f"killed nats-server-{killed_nats} (the inbox leader)")
                nats_back_at = time.monotonic() + args.nats_down
            if killed_nats is not None and nats_back_at and time.monotonic() >= nats_back_at:
                await asyncio.to_thread(launcher.start_nats_node, layout, killed_nats)
                faults.note(started, f"restarted nats-server-{killed_nats}")
                nats_back_at = 0.0
            await publish_until_stored(js, *event(namespace, index))
            # Paced by the clock, not by a pause per message: a slow ack costs no rate.
            await asyncio.sleep(max(0.0, started + (index + 1) / args.rate - time.monotonic()))
        published_at = time.monotonic()
    finally:
        stop.set()
        thread.join(30)
    if killed_nats is not None and nats_back_at:
        await asyncio.to_thread(launcher.start_nats_node, layout, killed_nats)
        faults.note(started, f"restarted nats-server-{killed_nats}")
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(answers.complete.wait(), args.drain)
    counts = answers.counts()
    dead = await js.stream_info(naming.dead_letter_stream(namespace, AGENT))
    await nc.close()

    lost = args.messages - len(counts)
    duplicated = sum(1 for n in counts.values() if n > 1)
    recovered = (
        f"{max(answers.last_new - faults.last, 0.0):.1f} s" if lost == 0 else "not recovered"
    )
    print("\n".join(faults.log))
    print(
        f"\nmessages {args.messages} at {args.rate}/s over {published_at - started:.1f} s; "
        f"faults: {faults.pod_kills} pod kills (every {args.pod_kill_every:g} s), "
        f"{faults.operator_kills} operator kills (every {args.operator_kill_every:g} s), "
        f"{faults.nats_kills} of 3 NATS servers killed for {args.nats_down:g} s\n"
        f"lost {lost}, duplicated {duplicated}, dead-lettered {dead.state.messages or 0}, "
        f"time to recover (last fault to last answer) {recovered}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=100.0, help="messages per second")
    parser.add_argument("--pods", type=int, default=3, help="the agent's replicas")
    parser.add_argument("--pod-kill-every", type=float, default=2.0)
    parser.add_argument("--operator-kill-every", type=float, default=20.0)
    parser.add_argument("--nats-down", type=float, default=20.0)
    parser.add_argument("--drain", type=float, default=180.0, help="seconds to wait for answers")
    args = parser.parse_args()

    layout = launcher.up(build_binaries(), nats_nodes=3)
    operator: Operator | None = None
    try:
        kubectl(layout, "apply", "--server-side", "-f", str(REPO / "crds"))
        kubectl(layout, "wait", "--for=condition=Established", "crd/agents.troupe.dev")
        namespace = f"soak-{uuid.uuid4().hex[:6]}"
        kubectl(layout, "create", "namespace", namespace)
        api = config.new_client_from_config(str(layout.kubeconfig))  # type: ignore[no-untyped-call]
        core: Any = client.CoreV1Api(api)
        custom: Any = client.CustomObjectsApi(api)
        wait(lambda: core.list_namespaced_service_account(namespace).items, "service account")
        log = Path(tempfile.mkstemp(prefix="troupe-chaos-operator-", suffix=".log")[1])
        operator = Operator(layout, namespace, log)
        operator.start()

        async def output_stream() -> None:
            nc = await nats.connect(server_urls(layout.nats_url))
            await nc.jetstream().add_stream(
                StreamConfig(
                    name=f"OUT_{namespace}",
                    subjects=[f"out.{namespace}.>"],
                    duplicate_window=DUPLICATE_WINDOW_SECONDS,
                    num_replicas=3,
                )
            )
            await nc.close()

        asyncio.run(output_stream())
        custom.create_namespaced_custom_object(
            "troupe.dev", "v1alpha1", namespace, "agents", agent_manifest(namespace, args.pods)
        )
        wait(lambda: agent_ready(custom, namespace), "Ready agent")
        print(f"operator log: {log}", file=sys.stderr)
        asyncio.run(soak(args, layout, namespace, operator, core))
    finally:
        if operator is not None:
            operator.stop()
        launcher.down(layout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
