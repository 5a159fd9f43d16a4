"""Pure builders of the Kubernetes objects the harness smoke tests apply."""

from __future__ import annotations

from typing import Any

KWOK_TOLERATION = {"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}


def kwok_deployment(name: str, replicas: int) -> dict[str, Any]:
    """A Deployment whose pods tolerate the kwok taint and are pinned to kwok nodes."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "nodeSelector": {"type": "kwok"},
                    "tolerations": [KWOK_TOLERATION],
                    "containers": [{"name": "app", "image": "registry.invalid/fake:1"}],
                },
            },
        },
    }


def http_server_deployment(name: str, replicas: int = 1, port: int = 8080) -> dict[str, Any]:
    """A Deployment that really serves HTTP on its pod IP, with a readiness probe."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [
                        {
                            "name": "web",
                            "image": "python:3.11-slim",
                            "command": ["python", "-m", "http.server", str(port)],
                            "args": ["--bind", "$(POD_IP)"],
                            "env": [
                                {
                                    "name": "POD_IP",
                                    "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
                                }
                            ],
                            "readinessProbe": {
                                "httpGet": {"path": "/", "port": port},
                                "periodSeconds": 1,
                            },
                        }
                    ],
                },
            },
        },
    }


def privileged_pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "containers": [
                {
                    "name": "root",
                    "image": "busybox:1",
                    "securityContext": {"privileged": True},
                }
            ]
        },
    }


def range_crd(group: str) -> dict[str, Any]:
    """A CRD whose CEL rule refuses ``min`` greater than ``max``."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"ranges.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "ranges", "singular": "range", "kind": "Range"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {
                                        "min": {"type": "integer"},
                                        "max": {"type": "integer"},
                                    },
                                    "x-kubernetes-validations": [
                                        {
                                            "rule": "self.min <= self.max",
                                            "message": "spec.min must not exceed spec.max",
                                        }
                                    ],
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
