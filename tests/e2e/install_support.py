"""The install paths the end-to-end tests exercise, and what every path must show.

Each path installs the operator (which then runs from its own pods on the
process node), deploys the research-team example into a namespace that
enforces the restricted Pod Security profile, and is judged by the same
checks: agents Ready, a run succeeds through real agent pods, an upgrade rolls
pods without losing a message in flight, and uninstalling leaves nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import yaml
from nats.js.errors import NotFoundError

from tests.chart_support import run_helm
from tests.integration.operator_support import stream_names
from troupe_devcluster.fixtures import ClusterEndpoints, create_namespace, wait_for
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.envelope import CloudEvent

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "research-team"
DEPLOY = REPO / "deploy"
OPERATOR_NAMESPACE = "troupe-system"
WORKFLOW = "research"
DEADLINE = 180.0
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}


@dataclass
class InstallPath:
    """How one install path installs, upgrades (the operator) and uninstalls Troupe."""

    install: Callable[[], None]
    upgrade: Callable[[], None]
    uninstall: Callable[[], None]


def kubectl_until_ok(cluster: ClusterEndpoints, *args: str) -> None:
    """Apply until it succeeds, as a GitOps controller retries a sync (CRDs come first)."""
    last = ""

    def applied() -> bool:
        nonlocal last
        try:
            cluster.kubectl(*args)
        except AssertionError as error:
            last = str(error)
            return False
        return True

    try:
        wait_for(applied, DEADLINE, f"kubectl {' '.join(args)} to succeed", interval=1.0)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{last}") from error


# --- the three paths -------------------------------------------------------------------


def chart_path(cluster: ClusterEndpoints) -> InstallPath:
    def helm_apply(*extra: str) -> None:
        run_helm(
            "upgrade", "--install", "troupe", str(REPO / "charts" / "troupe"),
            "--namespace", OPERATOR_NAMESPACE, "--create-namespace",
            "--kubeconfig", str(cluster.kubeconfig),
            "--set", f"nats.url={cluster.nats_url}",
            "--wait", "--timeout", "3m", *extra,
        )  # fmt: skip

    def uninstall() -> None:
        run_helm(
            "uninstall", "troupe", "--namespace", OPERATOR_NAMESPACE,
            "--kubeconfig", str(cluster.kubeconfig), "--wait",
        )  # fmt: skip
        # Helm keeps a chart's CRDs on purpose; removing them is the user's explicit step.
        cluster.kubectl("delete", "-f", str(REPO / "charts" / "troupe" / "crds"))
        cluster.kubectl("delete", "namespace", OPERATOR_NAMESPACE)

    return InstallPath(
        install=helm_apply,
        upgrade=lambda: helm_apply("--set", "operator.resyncSeconds=20"),
        uninstall=uninstall,
    )


def _overlay(directory: Path, nats_url: str, extra_env: dict[str, str]) -> Path:
    """A kustomize overlay of deploy/ that points the operator and the gateway at our NATS."""
    directory.mkdir(parents=True, exist_ok=True)
    env = [{"name": "TROUPE_NATS_URL", "value": nats_url}]
    env += [{"name": k, "value": v} for k, v in extra_env.items()]
    gateway_env = [{"name": "TROUPE_NATS_URL", "value": nats_url}]
    bundled = {
        doc["metadata"]["name"]
        for doc in yaml.safe_load_all((DEPLOY / "troupe.yaml").read_text())
        if doc and doc["kind"] == "Deployment"
    }
    patched = [("troupe-operator", "operator", env), ("troupe-gateway", "gateway", gateway_env)]
    patches = []
    for deployment, container, variables in patched:
        if deployment not in bundled:
            continue
        patch = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": deployment, "namespace": OPERATOR_NAMESPACE},
            "spec": {"template": {"spec": {"containers": [{"name": container, "env": variables}]}}},
        }
        (directory / f"{container}-env.yaml").write_text(yaml.safe_dump(patch))
        patches.append({"path": f"{container}-env.yaml"})
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(DEPLOY, directory)],
        "patches": patches,
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return directory


def bundle_path(cluster: ClusterEndpoints, work: Path) -> InstallPath:
    def apply(extra_env: dict[str, str]) -> None:
        overlay = _overlay(work / "overlay", cluster.nats_url, extra_env)
        cluster.kubectl("apply", "-f", str(DEPLOY / "crds.yaml"))
        cluster.kubectl(
            "wait", "--for=condition=Established", "-f", str(DEPLOY / "crds.yaml"), "--timeout=60s"
        )
        cluster.kubectl("apply", "-k", str(overlay))
        cluster.kubectl(
            "rollout", "status", "-n", OPERATOR_NAMESPACE, "deployment/troupe-operator",
            "--timeout=180s",
        )  # fmt: skip

    def uninstall() -> None:
        # The CRDs may go before the objects of their kinds: those are then gone already.
        cluster.kubectl(
            "delete", "-k", str(work / "overlay"), "--ignore-not-found", "--timeout=180s"
        )  # fmt: skip

    return InstallPath(
        install=lambda: apply({}),
        upgrade=lambda: apply({"TROUPE_RESYNC_SECONDS": "20"}),
        uninstall=uninstall,
    )


def gitops_path(cluster: ClusterEndpoints, work: Path) -> InstallPath:
    """A GitOps repository: a folder of plain manifests, synced with ``kubectl apply -R``."""
    repo = work / "gitops"

    def write(resync: str) -> None:
        repo.mkdir(parents=True, exist_ok=True)
        shutil.copy(DEPLOY / "crds.yaml", repo / "00-crds.yaml")
        operator = (DEPLOY / "troupe.yaml").read_text()
        documents = [doc for doc in yaml.safe_load_all(operator) if doc]
        for doc in documents:
            if doc["kind"] == "Deployment":
                container = doc["spec"]["template"]["spec"]["containers"][0]
                for variable in container["env"]:
                    if variable["name"] == "TROUPE_NATS_URL":
                        variable["value"] = cluster.nats_url
                    if variable["name"] == "TROUPE_RESYNC_SECONDS":
                        variable["value"] = resync
        (repo / "10-troupe.yaml").write_text(yaml.safe_dump_all(documents))

    def sync() -> None:
        kubectl_until_ok(cluster, "apply", "-R", "-f", str(repo))
        cluster.kubectl(
            "rollout", "status", "-n", OPERATOR_NAMESPACE, "deployment/troupe-operator",
            "--timeout=180s",
        )  # fmt: skip

    def install() -> None:
        write("30")
        sync()

    def upgrade() -> None:
        write("20")
        sync()

    def uninstall() -> None:
        cluster.kubectl("delete", "-R", "-f", str(repo), "--ignore-not-found", "--timeout=180s")

    return InstallPath(install=install, upgrade=upgrade, uninstall=uninstall)


# --- what every path must show ---------------------------------------------------------


SERVERS = {("Deployment", "model-server"), ("Deployment", "research-library")}
"""The example's servers: hostNetwork pods (the process node has no Service networking),
which the restricted Pod Security profile refuses. They run in a namespace of their own,
so the restricted one still proves that every pod Troupe makes is admitted under it."""
SERVERS_CONFIG = ("ConfigMap", "research-servers")


@dataclass(frozen=True)
class Example:
    """The deployed research team: its namespace, its servers' and what was applied."""

    namespace: str
    servers_namespace: str
    manifests: Path
    """What went into ``namespace``, for ``kubectl delete -f``."""


def deploy_example(cluster: ClusterEndpoints, api_client: Any, work: Path) -> Example:
    """The example from its kustomization, servers apart, once everything in it is Ready."""
    documents = list(yaml.safe_load_all(cluster.kubectl("kustomize", str(EXAMPLE))))
    servers: list[dict[str, Any]] = []
    team: list[dict[str, Any]] = []
    for document in documents:
        key = (document["kind"], document["metadata"]["name"])
        (servers if key in SERVERS or key == SERVERS_CONFIG else team).append(document)
    assert {(d["kind"], d["metadata"]["name"]) for d in servers} == {*SERVERS, SERVERS_CONFIG}
    example = Example(
        namespace=create_namespace(api_client, labels=RESTRICTED),
        servers_namespace=create_namespace(api_client),
        manifests=work / "research-team.yaml",
    )
    servers_file = work / "research-servers.yaml"
    servers_file.write_text(yaml.safe_dump_all(servers))
    example.manifests.write_text(yaml.safe_dump_all(team))
    cluster.kubectl("apply", "-f", str(servers_file), "-n", example.servers_namespace)
    cluster.kubectl("apply", "-f", str(example.manifests), "-n", example.namespace)
    waits = [
        (example.servers_namespace, "deployments", "Available"),
        (example.namespace, "modelproviders", "Ready"),
        (example.namespace, "agents", "Ready"),
        (example.namespace, f"workflow/{WORKFLOW}", "Ready"),
    ]
    for namespace, target, condition in waits:
        args = ["wait", f"--for=condition={condition}", "-n", namespace, target, "--timeout=300s"]
        if "/" not in target:
            args.append("--all")
        cluster.kubectl(*args)
    return example


def remove_example(cluster: ClusterEndpoints, example: Example) -> None:
    """The team first (its NATS resources go with it), then its servers, waiting for both."""
    cluster.kubectl(
        "delete", "-f", str(example.manifests), "-n", example.namespace, "--timeout=180s"
    )
    # The servers hold fixed loopback ports: the next deployment needs them free.
    cluster.kubectl("delete", "namespace", example.servers_namespace, "--timeout=180s")


def start_runs(nats_url: str, namespace: str, topics: list[str]) -> list[str]:
    runs = [uuid.uuid4().hex for _ in topics]

    async def publish() -> None:
        connection = await nats.connect(nats_url)
        js = connection.jetstream()
        for run_id, topic in zip(runs, topics, strict=True):
            event = CloudEvent(id=run_id, source="/tests/e2e", type="e2e", data={"topic": topic})
            headers, payload = envelope.to_binary(event)
            subject = naming.workflow_subject(namespace, WORKFLOW, "start", run_id)
            await js.publish(subject, payload, headers=headers)
        await connection.close()

    asyncio.run(publish())
    return runs


def results(nats_url: str, namespace: str, runs: list[str]) -> dict[str, dict[str, Any]]:
    """The results published so far, by run id."""
    stream = naming.workflow_stream(namespace, WORKFLOW)

    async def read() -> dict[str, dict[str, Any]]:
        connection = await nats.connect(nats_url)
        js = connection.jetstream()
        found = {}
        for run_id in runs:
            subject = naming.workflow_subject(namespace, WORKFLOW, "results", run_id)
            try:
                msg = await js.get_last_msg(stream, subject)
            except NotFoundError:
                continue
            found[run_id] = json.loads(msg.data or b"{}")
        await connection.close()
        return found

    return asyncio.run(read())


def wait_results(nats_url: str, namespace: str, runs: list[str]) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}

    def all_done() -> bool:
        done.update(results(nats_url, namespace, [r for r in runs if r not in done]))
        return len(done) == len(runs)

    wait_for(all_done, DEADLINE, f"{len(runs)} run results", interval=0.5)
    return done


def dead_letters(nats_url: str, namespace: str) -> int:
    async def count() -> int:
        connection = await nats.connect(nats_url)
        js = connection.jetstream()
        total = 0
        for agent in ("retriever", "analyst", "writer"):
            info = await js.stream_info(naming.dead_letter_stream(namespace, agent))
            total += info.state.messages
        await connection.close()
        return total

    return asyncio.run(count())


def pods_of(cluster: ClusterEndpoints, namespace: str, agent: str) -> set[str]:
    names = cluster.kubectl(
        "get", "pods", "-n", namespace, "-l", f"troupe.dev/agent={agent}", "-o", "name"
    )
    return set(names.split())


def namespace_streams(nats_url: str, namespace: str) -> set[str]:
    token = f"_{namespace}_"
    return {name for name in stream_names(nats_url) if token in f"{name}_"}


def nothing_left(cluster: ClusterEndpoints, namespace: str) -> bool:
    leftovers = cluster.kubectl(
        "get", "agents,workflows,deployments,replicasets,pods,configmaps",
        "-n", namespace, "-o", "name", "--ignore-not-found",
    )  # fmt: skip
    return not [line for line in leftovers.split() if "kube-root-ca.crt" not in line]
