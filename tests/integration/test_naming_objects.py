"""Kubernetes object names that cannot collide across kinds, against the real API server and
operator: an Agent named like a Workflow's engine Deployment is refused at apply time, and
the engine stays the Workflow's."""

from __future__ import annotations

import json
from typing import Any

from tests.integration.operator_support import (
    OperatorProcess,
    agent,
    apply,
    wait_ready,
    workflow,
)
from troupe_devcluster.fixtures import ClusterEndpoints
from troupe_devcluster.kube import apps_v1
from troupe_runtime.contract import naming


def test_an_agent_named_like_an_engine_is_refused_and_the_engine_stays_the_workflows(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, operator: OperatorProcess
) -> None:
    apply(cluster, namespace, agent("worker"))
    apply(cluster, namespace, workflow("shop", [{"name": "s", "agentRef": "worker"}]))
    wait_ready(cluster, namespace, "workflow", "shop")
    engine = naming.engine_deployment("shop")

    refused = cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", stdin=json.dumps(agent(engine)), check=False
    )

    assert naming.ENGINE_SUFFIX in refused
    assert "NotFound" in cluster.kubectl("get", "-n", namespace, "agent", engine, check=False)
    deployment = apps_v1(api_client).read_namespaced_deployment(engine, namespace)
    assert [(o.kind, o.name) for o in deployment.metadata.owner_references] == [
        ("Workflow", "shop")
    ]
