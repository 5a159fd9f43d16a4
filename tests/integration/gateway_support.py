"""The gateway as a real process (``python -m troupe_gateway``) against the test cluster's
API server and nats-server, so it can be SIGKILLed and restarted on the same port; and
callers with real credentials: ServiceAccounts, their tokens (``kubectl create token``) and
RBAC bindings to the chart's own ``troupe-invoker`` ClusterRole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from tests.chart_support import one, render
from tests.integration.gateway_handlers import GATE_ENV, NAME_ENV
from tests.integration.operator_support import API_VERSION, REPO
from troupe_devcluster import processes
from troupe_devcluster.fixtures import ClusterEndpoints, wait_for
from troupe_devcluster.layout import free_port

SCHEMA = {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}
MAX_IN_FLIGHT = 10
"""Messages a test Agent handles at once: gated calls wait in the handler, all in flight."""
START_DEADLINE = 30.0
STOP_DEADLINE = 10.0
INVOKER_ROLE = "troupe-invoker"


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class GatewayProcess:
    """``python -m troupe_gateway`` on 127.0.0.1 and a port of its own, kept across
    restarts (callers keep their URL)."""

    def __init__(
        self, cluster: ClusterEndpoints, log: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self._cluster = cluster
        self._log = log
        self._env = dict(env or {})
        self._process: subprocess.Popen[bytes] | None = None
        self.port = free_port()
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("POD_IP", "NATS_URL") and not key.startswith("TROUPE_GATEWAY_")
        }
        env.update(
            {
                "KUBECONFIG": str(self._cluster.kubeconfig),
                "TROUPE_NATS_URL": self._cluster.nats_url,
                "TROUPE_GATEWAY_HOST": "127.0.0.1",
                "TROUPE_GATEWAY_PORT": str(self.port),
                **self._env,
            }
        )
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "troupe_gateway"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1
        wait_for(
            lambda: self._alive_or_fail() and _ready(self.url + "/readyz"),
            START_DEADLINE,
            f"the gateway's /readyz on port {self.port}",
        )

    def _alive_or_fail(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise AssertionError(f"the gateway exited:\n{self.log_tail()}")
        return True

    def kill(self) -> None:
        """SIGKILL: no shutdown, no request finished, as a crashed or evicted pod."""
        assert self._process is not None
        self._process.send_signal(signal.SIGKILL)
        self._process.wait(STOP_DEADLINE)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(STOP_DEADLINE)

    def log_tail(self, lines: int = 60) -> str:
        return processes.tail(self._log, lines)


@contextmanager
def running_gateway(
    cluster: ClusterEndpoints, log: Path, env: Mapping[str, str] | None = None
) -> Iterator[GatewayProcess]:
    """A started gateway (one that cannot start fails the test), stopped on the way out."""
    gateway = GatewayProcess(cluster, log, env)
    try:
        gateway.start()
        yield gateway
    finally:
        gateway.stop()


def invoker_role() -> dict[str, Any]:
    """The chart's ``troupe-invoker`` ClusterRole, as ``helm template`` renders it."""
    return one(render({"gateway": {"enabled": True}}), "ClusterRole", INVOKER_ROLE)


@contextmanager
def invoker_role_installed(cluster: ClusterEndpoints) -> Iterator[None]:
    """The chart's ``troupe-invoker``, unless a release installed it already; removed again
    when made here (a later ``helm install`` in the session would refuse one it does not
    own)."""
    present = cluster.kubectl(
        "get", "clusterrole", INVOKER_ROLE, "--ignore-not-found", "-o", "name"
    )
    if not present.strip():
        cluster.kubectl("create", "-f", "-", stdin=yaml.safe_dump(invoker_role()))
    try:
        yield
    finally:
        if not present.strip():
            cluster.kubectl("delete", "clusterrole", INVOKER_ROLE, "--ignore-not-found")


def _create(cluster: ClusterEndpoints, namespace: str, *objects: dict[str, Any]) -> None:
    cluster.kubectl("-n", namespace, "apply", "-f", "-", stdin=yaml.safe_dump_all(objects))


def service_account_token(cluster: ClusterEndpoints, namespace: str, name: str) -> str:
    """A new ServiceAccount's token, as ``kubectl create token`` hands it out."""
    cluster.kubectl("-n", namespace, "create", "serviceaccount", name)
    return cluster.kubectl("-n", namespace, "create", "token", name, "--duration=1h").strip()


def bind_invoker(cluster: ClusterEndpoints, namespace: str, account: str) -> None:
    """A RoleBinding of ``troupe-invoker`` in ``namespace``: the account may invoke every
    Agent and Workflow there."""
    _create(
        cluster,
        namespace,
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": f"{INVOKER_ROLE}-{account}"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": INVOKER_ROLE,
            },
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
        },
    )


def create_api_key(
    cluster: ClusterEndpoints, namespace: str, name: str, key: str, account: str
) -> None:
    """An API key Secret (label ``troupe.dev/api-key``) acting as ``account``."""
    _create(
        cluster,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": name,
                "labels": {"troupe.dev/api-key": "true"},
                "annotations": {"troupe.dev/service-account": account},
            },
            "stringData": {"key": key},
        },
    )


def grant_invoke_on(
    cluster: ClusterEndpoints, namespace: str, account: str, resource: str, name: str
) -> None:
    """A Role allowing ``invoke`` on one object only, bound to the account."""
    binding = f"invoke-{resource}-{name}-{account}"
    _create(
        cluster,
        namespace,
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": binding},
            "rules": [
                {
                    "apiGroups": ["troupe.dev"],
                    "resources": [resource],
                    "resourceNames": [name],
                    "verbs": ["invoke"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": binding},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": binding},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
        },
    )


def handled_agent(name: str, handler: str, gate: Path | None = None) -> dict[str, Any]:
    """A running Agent (the real runtime on the process node) whose handler is
    ``gateway_handlers.<handler>``, with the input contract ``SCHEMA``."""
    env = [{"name": "PYTHONPATH", "value": str(REPO)}, {"name": NAME_ENV, "value": name}]
    if gate is not None:
        env.append({"name": GATE_ENV, "value": str(gate)})
    return {
        "apiVersion": API_VERSION,
        "kind": "Agent",
        "metadata": {"name": name},
        "spec": {
            "role": f"Echoes the text it is given ({name})",
            "contract": {"inputSchema": SCHEMA},
            # Gated calls wait in the handler: every call in flight at once.
            "messaging": {"maxInFlight": MAX_IN_FLIGHT},
            "runtime": {
                "handler": {
                    "type": "python",
                    "entrypoint": f"tests.integration.gateway_handlers:{handler}",
                },
                "env": env,
            },
        },
    }
