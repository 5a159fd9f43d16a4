"""The one place that builds Kubernetes API clients for the dev cluster.

The kubernetes client's methods are typed with its model classes, yet accept
the plain manifest dicts our pure builders return, so callers get the APIs
as ``Any`` and keep the builders' types honest instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubernetes import client, config


def new_api_client(kubeconfig: Path) -> client.ApiClient:
    """An ApiClient for the user and cluster of ``kubeconfig``."""
    api: client.ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(kubeconfig)
    )
    return api


def core_v1(api_client: client.ApiClient) -> Any:
    """The core/v1 API, untyped so that it accepts manifest dicts."""
    return client.CoreV1Api(api_client)


def apps_v1(api_client: client.ApiClient) -> Any:
    """The apps/v1 API, untyped so that it accepts manifest dicts."""
    return client.AppsV1Api(api_client)
