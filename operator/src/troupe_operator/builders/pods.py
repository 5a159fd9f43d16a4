"""What every pod the operator runs shares, agents' runtimes and workflows' engines alike.

Object metadata with a controller owner reference; a container that reads its config
from its ConfigMap, mounted read-only as a file (``pod.CONFIG_PATH``: an env var would cap
it at 128 KiB), binds to ``$POD_IP``, is probed on its health port and, when it dies,
leaves its log's tail as the termination message; the restricted Pod Security profile;
NATS Secrets mounted read-only; the config-hash and Prometheus annotations on the pod
template; the Deployment around it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from troupe_operator.api import API_VERSION
from troupe_operator.api.agent import NatsConnection
from troupe_runtime.contract import pod
from troupe_runtime.contract.agent_config import NatsSettings

FIELD_MANAGER = "troupe-operator"
CONFIG_HASH_ANNOTATION = "troupe.dev/config-hash"
RUNTIME_CONTAINER = pod.RUNTIME_CONTAINER
RUNTIME_USER = 10001
NATS_SECRETS_DIR = Path("/var/run/troupe/nats")
CONFIG_VOLUME = "config"

CONFIG_MAP_LIMIT_BYTES = 1024 * 1024
"""The API server refuses a ConfigMap whose data passes 1 MiB."""
CONFIG_RESERVE_BYTES = 4096
"""What the operator adds to a spec's content in its config, beyond what validation can
measure from the spec alone: the NATS URL it defaults to, and the key."""
CONFIG_BUDGET_BYTES = CONFIG_MAP_LIMIT_BYTES - CONFIG_RESERVE_BYTES
"""The largest config, in bytes of compact JSON, that validation lets through."""


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
        "data": {pod.CONFIG_FILE_NAME: text},
    }


def nats_settings(
    connection: NatsConnection, default_url: str, default_replicas: int = 1
) -> NatsSettings:
    """How a pod reaches NATS: the spec's URL (else the operator's), mounted Secret paths,
    and the replicas of what it creates (the spec's, else the operator's)."""
    tls = connection.tls
    tls_dir = NATS_SECRETS_DIR / "tls"
    client_cert = tls is not None and tls.client_certificate
    return NatsSettings(
        url=connection.url or default_url,
        replicas=connection.replicas or default_replicas,
        credentials_file=(
            NATS_SECRETS_DIR / "credentials" / connection.credentials_secret.key
            if connection.credentials_secret
            else None
        ),
        tls_ca_file=tls_dir / TLS_CA_KEY if tls else None,
        tls_cert_file=tls_dir / TLS_CERT_KEY if client_cert else None,
        tls_key_file=tls_dir / TLS_KEY_KEY if client_cert else None,
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


TLS_CA_KEY = "ca.crt"
TLS_CERT_KEY = "tls.crt"
TLS_KEY_KEY = "tls.key"


def nats_secrets(connection: NatsConnection, field: str = "spec.nats") -> list[SecretReference]:
    """The Secrets a NATS connection names, one reference per key the pods read."""
    references = []
    if connection.credentials_secret:
        secret = connection.credentials_secret
        references.append(SecretReference(f"{field}.credentialsSecret", secret.name, secret.key))
    if connection.tls:
        tls = connection.tls
        keys = [TLS_CA_KEY, *([TLS_CERT_KEY, TLS_KEY_KEY] if tls.client_certificate else [])]
        references.extend(
            SecretReference(f"{field}.tls.secretName", tls.secret_name, key) for key in keys
        )
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
    health_port: int
    extra_env: list[dict[str, Any]]
    secret_mounts: list[dict[str, Any]]


def config_volume(config_map: str) -> dict[str, Any]:
    """The ConfigMap holding the config, as a volume of just that file."""
    item = {"key": pod.CONFIG_FILE_NAME, "path": pod.CONFIG_FILE_NAME}
    return {"name": CONFIG_VOLUME, "configMap": {"name": config_map, "items": [item]}}


def runtime_container(spec: Container) -> dict[str, Any]:
    """The restricted, probed container that reads its config from the mounted ConfigMap."""
    env: list[dict[str, Any]] = [
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
        # A runtime that refuses its config says why in its last log line; this makes that
        # line the pod's termination message, which the status reports.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": CONFIG_VOLUME, "mountPath": str(pod.CONFIG_DIR), "readOnly": True},
            *spec.secret_mounts,
        ],
    }


def restricted_pod_spec(
    containers: list[dict[str, Any]], config_map: str, secret_volumes: list[dict[str, Any]]
) -> dict[str, Any]:
    """A pod spec that passes the restricted Pod Security profile; ``/tmp`` is an emptyDir,
    ``config_map`` the config volume."""
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
        "volumes": [
            {"name": "tmp", "emptyDir": {}},
            config_volume(config_map),
            *secret_volumes,
        ],
    }


def deployment(
    owner: Owner,
    name: str,
    labels: dict[str, str],
    selector: dict[str, str],
    replicas: int | None,
    config_json: str,
    health_port: int,
    pod_spec: dict[str, Any],
    strategy: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Deployment whose pod template carries the config hash and scrape annotations;
    ``replicas`` None leaves them out, to whoever scales it (``builders.autoscale``)."""
    spec: dict[str, Any] = {"selector": {"matchLabels": selector}}
    if replicas is not None:
        spec = {"replicas": replicas, **spec}
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
