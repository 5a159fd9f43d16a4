"""The ConfigMaps and Secrets a pod refers to, fetched up front and read by pure code.

Env resolution and volume contents are pure functions of the pod and these
objects, so they can be tested without a cluster; only the fetching is I/O.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

JSON = dict[str, Any]


class ConfigError(Exception):
    """A container cannot be configured: the kubelet's ``CreateContainerConfigError``."""


def all_containers(pod: JSON) -> Iterator[JSON]:
    """The init containers then the app containers of a pod."""
    spec = pod.get("spec") or {}
    yield from spec.get("initContainers") or []
    yield from spec.get("containers") or []


def referenced_names(pod: JSON) -> tuple[set[str], set[str]]:
    """The names of the ConfigMaps and of the Secrets the pod's env and volumes use."""
    config_maps: set[str] = set()
    secrets: set[str] = set()
    for container in all_containers(pod):
        for source in container.get("envFrom") or []:
            if "configMapRef" in source:
                config_maps.add(source["configMapRef"]["name"])
            if "secretRef" in source:
                secrets.add(source["secretRef"]["name"])
        for var in container.get("env") or []:
            value_from = var.get("valueFrom") or {}
            if "configMapKeyRef" in value_from:
                config_maps.add(value_from["configMapKeyRef"]["name"])
            if "secretKeyRef" in value_from:
                secrets.add(value_from["secretKeyRef"]["name"])
    for volume in (pod.get("spec") or {}).get("volumes") or []:
        if "configMap" in volume:
            config_maps.add(volume["configMap"]["name"])
        if "secret" in volume:
            secrets.add(volume["secret"]["secretName"])
        for projection in (volume.get("projected") or {}).get("sources") or []:
            if "configMap" in projection:
                config_maps.add(projection["configMap"]["name"])
            if "secret" in projection:
                secrets.add(projection["secret"]["name"])
    return config_maps, secrets


@dataclass(frozen=True)
class Sources:
    """Fetched objects by name; a name mapped to None does not exist in the namespace."""

    config_maps: Mapping[str, JSON | None] = field(default_factory=dict)
    secrets: Mapping[str, JSON | None] = field(default_factory=dict)

    def config_map_text(self, name: str) -> dict[str, str] | None:
        """A ConfigMap's ``data`` (what env vars can use), or None when it is missing."""
        config_map = self.config_maps.get(name)
        if config_map is None:
            return None
        return dict(config_map.get("data") or {})

    def config_map_files(self, name: str) -> dict[str, bytes] | None:
        """A ConfigMap's ``data`` and ``binaryData`` as file contents, or None when missing."""
        config_map = self.config_maps.get(name)
        if config_map is None:
            return None
        files = {key: value.encode() for key, value in (config_map.get("data") or {}).items()}
        for key, value in (config_map.get("binaryData") or {}).items():
            files[key] = base64.b64decode(value)
        return files

    def secret_files(self, name: str) -> dict[str, bytes] | None:
        """A Secret's decoded ``data``, or None when it is missing."""
        secret = self.secrets.get(name)
        if secret is None:
            return None
        return {key: base64.b64decode(value) for key, value in (secret.get("data") or {}).items()}

    def secret_text(self, name: str) -> dict[str, str] | None:
        """A Secret's values as env strings; bytes that are not UTF-8 survive the round trip."""
        files = self.secret_files(name)
        if files is None:
            return None
        return {key: value.decode("utf-8", "surrogateescape") for key, value in files.items()}
