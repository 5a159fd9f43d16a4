"""Pytest fixtures on top of the launcher: one real cluster per test session.

Set ``TROUPE_TEST_KUBECONFIG`` and ``TROUPE_TEST_NATS_URL`` to run the tests
against an existing cluster (kind, say) instead. A cluster that cannot start
fails the tests; nothing here ever skips. ``local_model`` is the real local
model (llama-cpp-python's server on SmolLM2), one per session. The suites name the fixtures they use
in their own conftest.py, so a reader sees where each comes from.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from troupe_devcluster import launcher
from troupe_devcluster.__main__ import cluster as running_cluster
from troupe_devcluster.components import venv_bin
from troupe_devcluster.kube import core_v1, new_api_client
from troupe_devcluster.layout import Layout
from troupe_devcluster.model_server import ModelServer, start_model_server, stop_model_server
from troupe_devcluster.processes import ComponentError
from troupe_devcluster.scripted_llm import ScriptedLlm

NAMESPACE_DEADLINE_SECONDS = 30.0


@dataclass(frozen=True)
class ClusterEndpoints:
    """How tests reach the cluster and NATS."""

    kubeconfig: Path
    nats_url: str

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        """Run kubectl against this cluster; return its stdout (and fail loudly on error)."""
        result = subprocess.run(
            [str(venv_bin() / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            # Above the longest --timeout the tests give kubectl itself.
            timeout=300,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result.stdout if result.returncode == 0 else result.stderr


@pytest.fixture(scope="session")
def cluster() -> Iterator[ClusterEndpoints]:
    """A running control plane and nats-server for the whole session."""
    kubeconfig = os.environ.get("TROUPE_TEST_KUBECONFIG")
    given = Path(kubeconfig) if kubeconfig else None
    with running_cluster(given, os.environ.get("TROUPE_TEST_NATS_URL")) as (path, nats_url):
        yield ClusterEndpoints(path, nats_url)


@pytest.fixture(scope="session")
def kubeconfig(cluster: ClusterEndpoints) -> Path:
    return cluster.kubeconfig


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """A JetStream nats-server of its own, so NATS-only tests need no control plane."""
    existing = os.environ.get("TROUPE_TEST_NATS_URL")
    if existing:
        yield existing
        return
    layout = launcher.up_nats()
    try:
        yield layout.nats_url
    finally:
        launcher.down(layout)


NATS_CLUSTER_NODES = 3


@pytest.fixture(scope="module")
def nats_cluster() -> Iterator[Layout]:
    """A three-server JetStream cluster of the module's own, which its tests may kill servers
    of (``launcher.kill_nats_node``, ``start_nats_node``); ``.nats_url`` lists every server.
    Module-scoped: few tests need one, and a dead node must not outlive them."""
    layout = launcher.up_nats(nats_nodes=NATS_CLUSTER_NODES)
    try:
        yield layout
    finally:
        launcher.down(layout)


@pytest.fixture(scope="session")
def api_client(cluster: ClusterEndpoints) -> Any:
    """A kubernetes ApiClient authenticated as the cluster admin."""
    return new_api_client(cluster.kubeconfig)


@pytest.fixture(scope="session")
def local_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    """The real local model behind an OpenAI-compatible API (``.base_url``, ``.model``);
    one that cannot start fails the tests that ask for it, with its log's tail."""
    log = tmp_path_factory.mktemp("model-server") / "server.log"
    try:
        server = start_model_server(log)
    except (ComponentError, FileNotFoundError) as error:
        pytest.fail(f"the local model did not start: {error}", pytrace=False)
    try:
        yield server
    finally:
        stop_model_server(server.process)


def wait_for(condition: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def create_namespace(api_client: Any, labels: dict[str, str] | None = None) -> str:
    """Create a uniquely named namespace and wait until pods may be created in it."""
    core = core_v1(api_client)
    name = f"t-{uuid.uuid4().hex[:10]}"
    core.create_namespace({"metadata": {"name": name, "labels": labels or {}}})
    # Pods are refused until the service-account controller made the default account.
    wait_for(
        lambda: core.list_namespaced_service_account(name).items,
        NAMESPACE_DEADLINE_SECONDS,
        f"the default ServiceAccount in {name}",
    )
    return name


@pytest.fixture
def namespace(api_client: Any) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards."""
    name = create_namespace(api_client)
    yield name
    core_v1(api_client).delete_namespace(name)


@pytest.fixture
def scripted_llm() -> Iterator[ScriptedLlm]:
    """A scripted OpenAI-compatible server for one test (``.base_url``, ``.script``)."""
    with ScriptedLlm() as server:
        yield server
