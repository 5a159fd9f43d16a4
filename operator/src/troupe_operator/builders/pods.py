"""What every pod the operator runs shares, agents' runtimes and workflows' engines alike.

Object metadata with a controller owner reference; a container that reads its config
from a ConfigMap key through an env var, binds to ``$POD_IP`` and is probed on its
health port; the restricted Pod Security profile; NATS Secrets mounted read-only; the
config-hash and Prometheus annotations on the pod template; the Deployment around it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from troupe_operator.api import API_VERSION
from troupe_operator.api.agent import NatsConnection
from troupe_runtime.contract import pod
from troupe_runtime.contract.agent_config import CONFIG_FILE_NAME, NatsSettings

FIELD_MANAGER = "troupe-operator"
CONFIG_HASH_ANNOTATION = "troupe.dev/config-hash"
RUNTIME_CONTAINER = pod.RUNTIME_CONTAINER
RUNTIME_USER = 10001
NATS_SECRETS_DIR = Path("/var/run/troupe/nats")


@dataclass(frozen=True)
class Owner:
    """The custom resource that owns the built objects: names, labels, owner references."""

    namespace: str
    name: str
    uid: str
    kind: Literal["Agent", "Workflow"] = "Agent"


def metadata(owner: Owner, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": dict(labels),
        "ownerReferences": [
            {
                "apiVersion": API_VERSION,
                "kind": owner.kind,
                "name": owner.name,
                "uid": owner.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }


def config_hash(config_json: str) -> str:
    """A short digest of a config: the pod-template annotation that rolls pods on change."""
    return hashlib.sha256(config_json.encode()).hexdigest()[:16]


def config_map(owner: Owner, name: str, labels: dict[str, str], text: str) -> dict[str, Any]:
    """The ConfigMap holding a config's JSON under ``config.json``."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(owner, name, labels),
        "data": {CONFIG_FILE_NAME: text},
    }


def nats_settings(connection: NatsConnection, default_url: str) -> NatsSettings:
    """How a pod reaches NATS: the spec's URL (else the operator's) and mounted Secret paths."""
    tls = connection.tls
    tls_dir = NATS_SECRETS_DIR / "tls"
    client_cert = tls is not None and tls.client_certificate
    return NatsSettings(
        url=connection.url or default_url,
        credentials_file=(
            NATS_SECRETS_DIR / "credentials" / connection.credentials_secret.key
            if connection.credentials_secret
            else None
        ),
        tls_ca_file=tls_dir / "ca.crt" if tls else None,
        tls_cert_file=tls_dir / "tls.crt" if client_cert else None,
        tls_key_file=tls_dir / "tls.key" if client_cert else None,
    )


@dataclass(frozen=True)
class SecretReference:
    """A Secret a spec needs, and the field that names it (for error messages)."""

    field: str
    name: str
    key: str | None = None


@dataclass(frozen=True)
class ConfigMapReference:
    """A ConfigMap a spec names (``field``), and the key it needs, if any."""

    field: str
    name: str
    key: str | None = None


def nats_secrets(connection: NatsConnection, field: str = "spec.nats") -> list[SecretReference]:
    """The Secrets a NATS connection names."""
    references = []
    if connection.credentials_secret:
        secret = connection.credentials_secret
        references.append(SecretReference(f"{field}.credentialsSecret", secret.name, secret.key))
    if connection.tls:
        references.append(SecretReference(f"{field}.tls.secretName", connection.tls.secret_name))
    return references


def nats_secret_volumes(
    connection: NatsConnection,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Volumes and mounts for the NATS credentials and TLS Secrets, read-only."""
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    sources = [
        ("nats-credentials", connection.credentials_secret and connection.credentials_secret.name),
        ("nats-tls", connection.tls and connection.tls.secret_name),
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


@dataclass(frozen=True)
class Container:
    """What differs between the runtime containers of agents and engines."""

    image: str
    image_pull_policy: str
    command: list[str]
    config_env: str
    config_map: str
    health_port: int
    extra_env: list[dict[str, Any]]
    secret_mounts: list[dict[str, Any]]


def runtime_container(spec: Container) -> dict[str, Any]:
    """The restricted, probed container that reads its config from ``spec.config_env``."""
    env: list[dict[str, Any]] = [
        {
            "name": spec.config_env,
            "valueFrom": {"configMapKeyRef": {"name": spec.config_map, "key": CONFIG_FILE_NAME}},
        },
        {"name": pod.POD_IP_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        *spec.extra_env,
    ]
    return {
        "name": RUNTIME_CONTAINER,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": spec.command,
        "env": env,
        "ports": [{"name": "health", "containerPort": spec.health_port, "protocol": "TCP"}],
        "livenessProbe": {
            "httpGet": {"path": pod.HEALTH_PATH, "port": "health"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": pod.READY_PATH, "port": "health"},
            "periodSeconds": 5,
            "failureThreshold": 2,
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, *spec.secret_mounts],
    }


def restricted_pod_spec(
    containers: list[dict[str, Any]], secret_volumes: list[dict[str, Any]]
) -> dict[str, Any]:
    """A pod spec that passes the restricted Pod Security profile; ``/tmp`` is an emptyDir."""
    return {
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNTIME_USER,
            "runAsGroup": RUNTIME_USER,
            "fsGroup": RUNTIME_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": containers,
        "volumes": [{"name": "tmp", "emptyDir": {}}, *secret_volumes],
    }


def deployment(
    owner: Owner,
    name: str,
    labels: dict[str, str],
    selector: dict[str, str],
    replicas: int,
    config_json: str,
    health_port: int,
    pod_spec: dict[str, Any],
    strategy: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Deployment whose pod template carries the config hash and scrape annotations."""
    spec: dict[str, Any] = {"replicas": replicas, "selector": {"matchLabels": selector}}
    if strategy is not None:
        spec["strategy"] = strategy
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(owner, name, labels),
        "spec": {
            **spec,
            "template": {
                "metadata": {
                    "labels": dict(labels),
                    "annotations": {
                        CONFIG_HASH_ANNOTATION: config_hash(config_json),
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(health_port),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        },
    }
