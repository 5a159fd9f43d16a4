"""What the Approval tests share: people as the API server authenticates them (a
ServiceAccount's token in a kubeconfig of its own, so ``request.userInfo`` is that account,
not the admin), the RBAC that lets them patch approvals, and Approval manifests."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.integration.operator_support import API_VERSION
from troupe_devcluster.components import venv_bin
from troupe_devcluster.fixtures import ClusterEndpoints


@dataclass(frozen=True)
class Person:
    """A ServiceAccount acting as a person: its user name and a kubeconfig of its own."""

    user: str
    kubeconfig: Path

    def kubectl(self, *args: str, stdin: str | None = None) -> tuple[int, str]:
        """Kubectl as this person: (exit status, stdout or stderr)."""
        result = subprocess.run(
            [str(venv_bin() / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return result.returncode, result.stdout if result.returncode == 0 else result.stderr


def person(cluster: ClusterEndpoints, namespace: str, name: str, directory: Path) -> Person:
    """A new ServiceAccount ``name`` with a token, its kubeconfig naming ``namespace``."""
    cluster.kubectl("-n", namespace, "create", "serviceaccount", name)
    token = cluster.kubectl("-n", namespace, "create", "token", name, "--duration=1h").strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    server = admin["clusters"][0]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [server],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [
            {
                "name": name,
                "context": {"cluster": server["name"], "user": name, "namespace": namespace},
            }
        ],
        "current-context": name,
    }
    path = directory / f"{namespace}-{name}.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return Person(f"system:serviceaccount:{namespace}:{name}", path)


def may_decide(cluster: ClusterEndpoints, namespace: str, *accounts: str) -> None:
    """RBAC: ``accounts`` may read and patch the namespace's approvals, as the chart's
    ``troupe-approver`` role allows."""
    _grant(cluster, namespace, "approver", ["get", "list", "watch", "patch"], accounts)


def may_read(cluster: ClusterEndpoints, namespace: str, *accounts: str) -> None:
    """RBAC: ``accounts`` may read the namespace's approvals, as ``troupe-view`` allows."""
    _grant(cluster, namespace, "reader", ["get", "list", "watch"], accounts)


def _grant(
    cluster: ClusterEndpoints,
    namespace: str,
    name: str,
    verbs: list[str],
    accounts: tuple[str, ...],
) -> None:
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": name},
        "rules": [{"apiGroups": ["troupe.dev"], "resources": ["approvals"], "verbs": verbs}],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [
            {"kind": "ServiceAccount", "name": account, "namespace": namespace}
            for account in accounts
        ],
    }
    cluster.kubectl("-n", namespace, "apply", "-f", "-", stdin=yaml.safe_dump_all([role, binding]))


def approval(name: str, users: list[str], groups: list[str] | None = None) -> dict[str, Any]:
    """An Approval as the operator makes one, without a decision."""
    return {
        "apiVersion": API_VERSION,
        "kind": "Approval",
        "metadata": {"name": name},
        "spec": {
            "requester": {"kind": "Workflow", "name": "deploy", "runId": "r1", "step": "gate"},
            "approvers": {"users": users, "groups": groups or []},
            "message": "ship it?",
        },
    }


def decision_patch(verdict: str, decided_by: str, reason: str = "") -> str:
    return json.dumps(
        {"spec": {"decision": {"verdict": verdict, "decidedBy": decided_by, "reason": reason}}}
    )
