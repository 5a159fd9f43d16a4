"""What the Approval tests share: people as the API server authenticates them (a
ServiceAccount's token in a kubeconfig of its own, so ``request.userInfo`` is that account,
not the admin), the RBAC that lets them patch approvals, and Approval manifests."""

from __future__ import annotations

import contextlib
import json
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import BucketNotFoundError, NotFoundError

from tests.integration.operator_support import API_VERSION, apply, get, jetstream, workflow
from troupe_devcluster.components import venv_bin
from troupe_devcluster.fixtures import ClusterEndpoints
from troupe_runtime.contract import approvals, envelope, naming
from troupe_runtime.contract.approvals import ApprovalRequest, Approvers, Requester
from troupe_runtime.contract.envelope import CloudEvent


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


def workflow_gate(cluster: ClusterEndpoints, namespace: str, name: str) -> dict[str, Any]:
    """A Workflow that owns Approvals: its step names an Agent that does not exist, so the
    operator provisions nothing for it (the test stands in for its engine)."""
    manifest = workflow(name, [{"name": "ship", "agentRef": "absent"}])
    apply(cluster, namespace, manifest)
    return get(cluster, namespace, "workflow", name)


def request(
    namespace: str,
    workflow_name: str,
    run_id: str,
    users: list[str],
    reply_subject: str | None = None,
) -> ApprovalRequest:
    """A pending request of the Workflow run's step ``gate``, as its engine files one."""
    return ApprovalRequest(
        name=approvals.approval_name(workflow_name, run_id, "gate"),
        namespace=namespace,
        requester=Requester(kind="Workflow", name=workflow_name, run_id=run_id, step="gate"),
        approvers=Approvers(users=users),
        message="Ship release 1.2?\nApproved by everyone",
        requested_at=datetime.now(UTC),
        expires_at=datetime.now(UTC) + timedelta(hours=1),
        reply_subject=reply_subject
        or naming.workflow_subject(namespace, workflow_name, "approve", run_id),
    )


def file_request(nats_url: str, filed: ApprovalRequest) -> None:
    """Put ``filed`` in its namespace's approvals bucket (created as the Workflow reconciler
    creates it), as a requester does."""

    async def put(js: JetStreamContext) -> None:
        config = approvals.approvals_bucket_config(filed.namespace)
        try:
            bucket = await js.key_value(str(config.bucket))
        except BucketNotFoundError:
            bucket = await js.create_key_value(config)
        await bucket.put(
            naming.approval_key(filed.name), filed.model_dump_json(by_alias=True).encode()
        )

    jetstream(nats_url, put)


def reply_stream(nats_url: str, name: str, subject: str) -> None:
    """A stream storing ``subject``, where the test reads what the operator relays."""

    async def add(js: JetStreamContext) -> None:
        await js.add_stream(StreamConfig(name=name, subjects=[subject]))

    jetstream(nats_url, add)


def relayed(nats_url: str, stream: str) -> list[CloudEvent]:
    """Every message the stream holds, read as CloudEvents."""

    async def read(js: JetStreamContext) -> list[CloudEvent]:
        info = await js.stream_info(stream)
        events = []
        for sequence in range(info.state.first_seq, info.state.last_seq + 1):
            if info.state.messages == 0:
                break
            message = await js.get_msg(stream, sequence)
            events.append(envelope.parse(dict(message.headers or {}), message.data or b""))
        return events

    return jetstream(nats_url, read)


def forget_namespace(nats_url: str, namespace: str, streams: list[str]) -> None:
    """Delete the namespace's approvals bucket and the test's reply ``streams``, so later
    modules' operators do not read them."""

    async def delete(js: JetStreamContext) -> None:
        for name in [naming.kv_stream(naming.approvals_bucket(namespace)), *streams]:
            with contextlib.suppress(NotFoundError):
                await js.delete_stream(name)

    jetstream(nats_url, delete)
