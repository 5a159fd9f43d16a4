"""An Agent spec → its runtime config, ConfigMap, ServiceAccount and Deployment.

The runtime config is the runtime's own model (``troupe_runtime.config``); the
ConfigMap carries its JSON, which reaches the container as ``TROUPE_CONFIG_JSON``,
and its hash annotates the pod template so that any change rolls the pods.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from troupe_operator.api import API_VERSION, AgentSpec
from troupe_runtime.config import CONFIG_FILE_NAME, CONFIG_JSON_ENV, NatsSettings, RuntimeConfig

FIELD_MANAGER = "troupe-operator"
CONFIG_HASH_ANNOTATION = "troupe.dev/config-hash"
AGENT_LABEL = "troupe.dev/agent"
RUNTIME_CONTAINER = "runtime"
RUNTIME_USER = 10001
NATS_SECRETS_DIR = Path("/var/run/troupe/nats")


@dataclass(frozen=True)
class Owner:
    """The Agent that owns the built objects, for names, labels and owner references."""

    namespace: str
    name: str
    uid: str


def agent_labels(name: str) -> dict[str, str]:
    """Labels on every object of an agent; the Deployment selects its pods by these."""
    return {
        "app.kubernetes.io/name": "troupe-agent",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": FIELD_MANAGER,
        AGENT_LABEL: name,
    }


def config_map_name(agent: str) -> str:
    return f"{agent}-runtime"


def service_account_name(owner: Owner, spec: AgentSpec) -> str | None:
    """The pods' ServiceAccount: the one named, else the agent's own if created, else none."""
    runtime = spec.runtime
    if runtime.service_account_name:
        return runtime.service_account_name
    return owner.name if runtime.create_service_account else None


def _metadata(owner: Owner, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": agent_labels(owner.name),
        "ownerReferences": [
            {
                "apiVersion": API_VERSION,
                "kind": "Agent",
                "name": owner.name,
                "uid": owner.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }


def build_runtime_config(owner: Owner, spec: AgentSpec, default_nats_url: str) -> RuntimeConfig:
    """The runtime's config: the spec's policies, unchanged, plus what the operator resolved."""
    tls = spec.nats.tls
    tls_dir = NATS_SECRETS_DIR / "tls"
    client_cert = tls is not None and tls.client_certificate
    nats = NatsSettings(
        url=spec.nats.url or default_nats_url,
        credentials_file=(
            NATS_SECRETS_DIR / "credentials" / spec.nats.credentials_secret.key
            if spec.nats.credentials_secret
            else None
        ),
        tls_ca_file=tls_dir / "ca.crt" if tls else None,
        tls_cert_file=tls_dir / "tls.crt" if client_cert else None,
        tls_key_file=tls_dir / "tls.key" if client_cert else None,
    )
    return RuntimeConfig(
        agent=owner.name,
        namespace=owner.namespace,
        role=spec.role,
        handler=spec.runtime.handler,
        contract=spec.contract,
        messaging=spec.messaging,
        rate_limit=spec.rate_limit,
        timeout=spec.timeout,
        retry=spec.retry,
        dead_letter=spec.dead_letter,
        state=spec.state,
        nats=nats,
    )


@dataclass(frozen=True)
class SecretReference:
    """A Secret the agent needs, and the spec field that names it (for error messages)."""

    field: str
    name: str
    key: str | None = None


def referenced_secrets(spec: AgentSpec) -> list[SecretReference]:
    """Every Secret the spec names, so a missing one is reported before pods wait on it."""
    references = []
    if spec.nats.credentials_secret:
        secret = spec.nats.credentials_secret
        references.append(SecretReference("spec.nats.credentialsSecret", secret.name, secret.key))
    if spec.nats.tls:
        references.append(SecretReference("spec.nats.tls.secretName", spec.nats.tls.secret_name))
    if spec.runtime.handler.secret_name:
        references.append(
            SecretReference("spec.runtime.handler.secretName", spec.runtime.handler.secret_name)
        )
    return references


def config_hash(config: RuntimeConfig) -> str:
    """A short digest of the config: the pod-template annotation that rolls pods on change."""
    return hashlib.sha256(config.to_json().encode()).hexdigest()[:16]


def build_config_map(owner: Owner, config: RuntimeConfig) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, config_map_name(owner.name)),
        "data": {CONFIG_FILE_NAME: config.to_json()},
    }


def build_service_account(owner: Owner, spec: AgentSpec) -> dict[str, Any] | None:
    """The agent's ServiceAccount, when the spec asks the operator to create one."""
    name = service_account_name(owner, spec)
    if not spec.runtime.create_service_account or name is None:
        return None
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(owner, name),
        "automountServiceAccountToken": False,
    }


def _secret_volumes(spec: AgentSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Volumes and mounts for the NATS credentials and TLS Secrets, read-only."""
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    sources = [
        ("nats-credentials", spec.nats.credentials_secret and spec.nats.credentials_secret.name),
        ("nats-tls", spec.nats.tls and spec.nats.tls.secret_name),
    ]
    for volume, secret in sources:
        if not secret:
            continue
        volumes.append({"name": volume, "secret": {"secretName": secret, "defaultMode": 0o440}})
        subdir = volume.removeprefix("nats-")
        mounts.append(
            {"name": volume, "mountPath": str(NATS_SECRETS_DIR / subdir), "readOnly": True}
        )
    return volumes, mounts


def _runtime_container(
    owner: Owner, spec: AgentSpec, config: RuntimeConfig, secret_mounts: list[dict[str, Any]]
) -> dict[str, Any]:
    port = config.health_port
    runtime = spec.runtime
    env: list[dict[str, Any]] = [
        {
            "name": CONFIG_JSON_ENV,
            "valueFrom": {
                "configMapKeyRef": {"name": config_map_name(owner.name), "key": CONFIG_FILE_NAME}
            },
        },
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        *(e.model_dump(by_alias=True, exclude_none=True) for e in runtime.env),
    ]
    container: dict[str, Any] = {
        "name": RUNTIME_CONTAINER,
        "image": runtime.image,
        "imagePullPolicy": runtime.image_pull_policy,
        "command": ["python", "-m", "troupe_runtime"],
        "env": env,
        "ports": [{"name": "health", "containerPort": port, "protocol": "TCP"}],
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "health"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "health"},
            "periodSeconds": 5,
            "failureThreshold": 2,
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, *secret_mounts],
    }
    if runtime.env_from:
        container["envFrom"] = list(runtime.env_from)
    resources = runtime.resources.model_dump(by_alias=True)
    if any(resources.values()):
        container["resources"] = {kind: value for kind, value in resources.items() if value}
    return container


def build_deployment(owner: Owner, spec: AgentSpec, config: RuntimeConfig) -> dict[str, Any]:
    """The runtime's Deployment, compliant with the restricted Pod Security profile."""
    runtime = spec.runtime
    labels = agent_labels(owner.name)
    secret_volumes, secret_mounts = _secret_volumes(spec)
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNTIME_USER,
            "runAsGroup": RUNTIME_USER,
            "fsGroup": RUNTIME_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            _runtime_container(owner, spec, config, secret_mounts),
            *runtime.sidecars,
        ],
        "volumes": [{"name": "tmp", "emptyDir": {}}, *secret_volumes],
    }
    account = service_account_name(owner, spec)
    if account:
        pod_spec["serviceAccountName"] = account
    if runtime.node_selector:
        pod_spec["nodeSelector"] = dict(runtime.node_selector)
    if runtime.tolerations:
        pod_spec["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in runtime.tolerations
        ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner, owner.name),
        "spec": {
            "replicas": runtime.replicas,
            "selector": {"matchLabels": {AGENT_LABEL: owner.name}},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        CONFIG_HASH_ANNOTATION: config_hash(config),
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(config.health_port),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        },
    }
