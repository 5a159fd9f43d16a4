"""The fixtures every Troupe test can ask for, and where they come from.

The real cluster (kube-apiserver, etcd, controller-manager, scheduler, kwok,
the process node) and the real nats-server are started by the development
cluster's launcher, once per session and only when a test asks for one:
``make test-unit`` runs without either.

- ``cluster``: the running control plane's endpoints, with ``kubectl``;
- ``kubeconfig``: its admin kubeconfig file;
- ``api_client``: a kubernetes client for it;
- ``nats_url``: a JetStream-enabled nats-server;
- ``nats_cluster``: a three-server JetStream cluster of one module's own (its layout);
- ``namespace``: a fresh namespace, deleted after the test;
- ``scripted_llm``: a scripted OpenAI-compatible server (one per test);
- ``local_model``: the real local model (SmolLM2 on llama-cpp-python's OpenAI-compatible
  server), started once per session when a test asks for it.
"""

from __future__ import annotations

from troupe_devcluster.fixtures import (
    api_client,
    cluster,
    kubeconfig,
    local_model,
    namespace,
    nats_cluster,
    nats_url,
    scripted_llm,
)

__all__ = [
    "api_client",
    "cluster",
    "kubeconfig",
    "local_model",
    "namespace",
    "nats_cluster",
    "nats_url",
    "scripted_llm",
]
