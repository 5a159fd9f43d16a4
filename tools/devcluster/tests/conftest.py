"""The development cluster's own tests use the same session fixtures as Troupe's."""

from __future__ import annotations

from troupe_devcluster.fixtures import (
    api_client,
    cluster,
    kubeconfig,
    local_model,
    namespace,
    nats_url,
    scripted_llm,
)

__all__ = [
    "api_client",
    "cluster",
    "kubeconfig",
    "local_model",
    "namespace",
    "nats_url",
    "scripted_llm",
]
