"""What the operator's integration tests share: the shipped CRDs, the operator as a real
subprocess (so it can be SIGKILLed), Agent manifests placed on kwok nodes or run for real
on the process node, and JetStream look-ups."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import nats
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from tests.chart_support import render_text
from tests.integration.manifests import KWOK_TOLERATION
from tests.integration.workflow_handlers import NAME_ENV
from troupe_devcluster import processes
from troupe_devcluster.fixtures import ClusterEndpoints, wait_for
from troupe_devcluster.layout import free_port
from troupe_runtime.contract.nats_servers import server_urls

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "crds"
API_VERSION = "troupe.dev/v1alpha1"
START_DEADLINE = 30.0
STOP_DEADLINE = 10.0
FINALIZE_DEADLINE = 45.0
RESYNC_SECONDS = 3
T = TypeVar("T")


def install_crds(cluster: ClusterEndpoints) -> None:
    """Apply the very CRDs that ship and the chart's approvals admission policy, and wait
    until the API server serves them and enforces it."""
    cluster.kubectl("apply", "-f", str(CRDS))
    cluster.kubectl(
        "wait",
        "--for=condition=Established",
        "crd/agents.troupe.dev",
        "crd/workflows.troupe.dev",
        "crd/modelproviders.troupe.dev",
        "crd/budgets.troupe.dev",
        "crd/triggers.troupe.dev",
        "crd/approvals.troupe.dev",
        "crd/chaosexperiments.troupe.dev",
        "--timeout=30s",
    )
    install_approval_policy(cluster)


POLICY_NAMESPACE = "troupe-tests"
"""The release namespace the policy is rendered for: its name differs from any release a
chart test installs, which would refuse to adopt an object it did not make."""
REFUSED_AT_CREATION = "an Approval is created without spec.decision"


def install_approval_policy(cluster: ClusterEndpoints) -> None:
    """The chart's ValidatingAdmissionPolicy and binding on approvals, rendered by helm from
    the chart (not a copy), applied, and waited for: an Approval created with a decision is
    refused once the API server enforces it."""
    rendered = render_text(None, POLICY_NAMESPACE, "--show-only", "templates/approval-policy.yaml")
    cluster.kubectl("apply", "-f", "-", stdin=rendered)
    probe = {
        "apiVersion": API_VERSION,
        "kind": "Approval",
        "metadata": {"name": "policy-probe", "namespace": "default"},
        "spec": {
            "requester": {"kind": "Workflow", "name": "probe", "runId": "probe"},
            "decision": {"verdict": "Approve", "decidedBy": "probe"},
        },
    }

    def enforced() -> bool:
        answer = cluster.kubectl(
            "create", "--dry-run=server", "-f", "-", stdin=json.dumps(probe), check=False
        )
        return REFUSED_AT_CREATION in answer

    wait_for(enforced, START_DEADLINE, "the approvals admission policy to be enforced")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class OperatorProcess:
    """``python -m troupe_operator --standalone --all-namespaces`` (or ``args``) against the
    test cluster."""

    def __init__(
        self,
        cluster: ClusterEndpoints,
        log: Path,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = ("--standalone", "--all-namespaces"),
    ) -> None:
        self._cluster = cluster
        self._log = log
        self._args = list(args)
        self._env = dict(env or {})
        self._process: subprocess.Popen[bytes] | None = None
        self.health_port = free_port()
        self.metrics_port = free_port()

    def start(self) -> None:
        self.launch()
        self.wait_started()

    def launch(self) -> None:
        """Start the process without waiting for it (to start several at once)."""
        env = {
            **os.environ,
            "KUBECONFIG": str(self._cluster.kubeconfig),
            "TROUPE_NATS_URL": self._cluster.nats_url,
            "TROUPE_RESYNC_SECONDS": str(RESYNC_SECONDS),
            "TROUPE_HEALTH_PORT": str(self.health_port),
            "TROUPE_METRICS_PORT": str(self.metrics_port),
            **self._env,
        }
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "troupe_operator", *self._args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_started(self) -> None:
        wait_for(
            lambda: self._alive_or_fail() and _healthy(self.health_url),
            START_DEADLINE,
            "the operator's liveness endpoint",
        )

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.health_port}/healthz"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def _alive_or_fail(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise AssertionError(f"the operator exited:\n{self.log_tail()}")
        return True

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup handlers, no goodbye, as a crashed or evicted pod."""
        assert self._process is not None
        self._process.send_signal(signal.SIGKILL)
        self._process.wait(STOP_DEADLINE)

    def exit_code(self) -> int | None:
        """The exit status once the process has ended (negative: killed by that signal)."""
        assert self._process is not None
        return self._process.poll()

    def signal(self, signum: signal.Signals) -> None:
        assert self._process is not None
        self._process.send_signal(signum)

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(STOP_DEADLINE)

    def log_tail(self, lines: int = 40) -> str:
        return processes.tail(self._log, lines)


@contextmanager
def running_operator(
    cluster: ClusterEndpoints, log: Path, env: dict[str, str] | None = None
) -> Iterator[OperatorProcess]:
    """The operator (``env`` added to its environment), with the shipped CRDs installed; on
    the way out it finalizes the Agents, Workflows, Budgets and Triggers of the namespaces the tests
    deleted before it stops."""
    install_crds(cluster)
    process = OperatorProcess(cluster, log, env)
    process.start()
    try:
        yield process
        wait_for(
            lambda: (
                not cluster.kubectl(
                    "get", "agents,workflows,budgets,triggers", "-A", "-o", "name"
                ).strip()
            ),
            FINALIZE_DEADLINE,
            "every Agent, Workflow, Budget and Trigger to be finalized",
        )
    finally:
        process.stop()


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def agent(name: str, **spec: Any) -> dict[str, Any]:
    """An Agent whose pods land on kwok nodes (Ready at once, nothing runs)."""
    base = {
        "role": f"test agent {name}",
        "runtime": {"nodeSelector": {"type": "kwok"}, "tolerations": [KWOK_TOLERATION]},
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "Agent",
        "metadata": {"name": name},
        "spec": _merge(base, spec),
    }


def running_agent(name: str, **spec: Any) -> dict[str, Any]:
    """An Agent whose pods run the real runtime on the process node, handling each message
    with ``workflow_handlers.append_name``."""
    base = {
        "role": f"test agent {name}",
        "runtime": {
            "handler": {
                "type": "python",
                "entrypoint": "tests.integration.workflow_handlers:append_name",
            },
            "env": [
                # The checkout's runtime, not whichever one the venv's editable install names.
                {"name": "PYTHONPATH", "value": f"{REPO / 'agent-runtime' / 'src'}:{REPO}"},
                {"name": NAME_ENV, "value": name},
            ],
        },
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "Agent",
        "metadata": {"name": name},
        "spec": _merge(base, spec),
    }


def workflow(name: str, steps: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    """A Workflow with a trigger subject of its own: JetStream refuses overlapping streams."""
    trigger = {"subject": f"troupe-test.{name}.{uuid.uuid4().hex[:8]}"}
    return {
        "apiVersion": API_VERSION,
        "kind": "Workflow",
        "metadata": {"name": name},
        "spec": {"trigger": trigger, "steps": steps, **spec},
    }


def pod_logs(cluster: ClusterEndpoints, namespace: str) -> str:
    """Every container log of the namespace's pods on the process node."""
    pods = cluster.kubeconfig.parent / "process-node" / "pods"
    return "\n".join(
        f"--- {log.parent.name}/{log.name}\n{log.read_text(errors='replace')[-4000:]}"
        for log in sorted(pods.glob(f"{namespace}_*/*.log"))
    )


def apply(cluster: ClusterEndpoints, namespace: str, manifest: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(manifest))


def get(cluster: ClusterEndpoints, namespace: str, kind: str, name: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(
        cluster.kubectl("get", "-n", namespace, kind, name, "-o", "json")
    )
    return body


def condition(body: dict[str, Any], kind: str = "Ready") -> dict[str, Any] | None:
    for found in (body.get("status") or {}).get("conditions", []):
        if found["type"] == kind:
            return dict(found)
    return None


def wait_ready(cluster: ClusterEndpoints, namespace: str, kind: str, name: str) -> None:
    cluster.kubectl(
        "wait", "-n", namespace, "--for=condition=Ready", f"{kind}/{name}", "--timeout=45s"
    )


def jetstream(nats_url: str, action: Callable[[JetStreamContext], Awaitable[T]]) -> T:
    """Run one JetStream look-up or change on a connection of its own."""

    async def run() -> T:
        connection = await nats.connect(server_urls(nats_url))
        try:
            return await action(connection.jetstream())
        finally:
            await connection.close()

    return asyncio.run(run())


def stream_names(nats_url: str) -> set[str]:
    async def names(js: JetStreamContext) -> set[str]:
        return {info.config.name for info in await js.streams_info() if info.config.name}

    return jetstream(nats_url, names)


def consumer_config(nats_url: str, stream: str, consumer: str) -> Any:
    """The consumer's config as the server holds it, or None when it does not exist."""

    async def read(js: JetStreamContext) -> Any:
        try:
            return (await js.consumer_info(stream, consumer)).config
        except NotFoundError:
            return None

    return jetstream(nats_url, read)


def stream_config(nats_url: str, stream: str) -> Any:
    async def read(js: JetStreamContext) -> Any:
        try:
            return (await js.stream_info(stream)).config
        except NotFoundError:
            return None

    return jetstream(nats_url, read)


@contextmanager
def explained(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> Iterator[None]:
    """On failure, print the pods' and the operator's logs (pytest shows them)."""
    try:
        yield
    except BaseException:
        print(pod_logs(cluster, namespace))
        print(f"--- operator\n{operator.log_tail(80)}")
        raise
