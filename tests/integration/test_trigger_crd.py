"""The Trigger CRD on the real API server: a good Trigger is stored, two sources refused."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.integration.operator_support import install_crds
from troupe_devcluster.fixtures import ClusterEndpoints
from troupe_operator.api import GROUP, VERSION


@pytest.fixture(scope="module")
def crds(cluster: ClusterEndpoints) -> None:
    install_crds(cluster)


def _trigger(source: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Trigger",
        "metadata": {"name": "nightly"},
        "spec": {"target": {"kind": "Workflow", "name": "research"}, "source": source},
    }


def test_a_trigger_is_stored_and_two_sources_are_refused(
    crds: None, api_client: Any, namespace: str
) -> None:
    objects = client.CustomObjectsApi(api_client)
    cron: dict[str, Any] = {"cron": {"schedule": "*/5 * * * *", "timeZone": "Europe/Paris"}}
    stored: Any = objects.create_namespaced_custom_object(
        GROUP, VERSION, namespace, "triggers", _trigger(cron)
    )
    assert stored["spec"]["source"]["cron"]["concurrencyPolicy"] == "Allow"
    both = {**cron, "webhook": {"secretRef": {"name": "hook"}}}
    with pytest.raises(ApiException) as refusal:
        objects.create_namespaced_custom_object(
            GROUP, VERSION, namespace, "triggers", _trigger(both) | {"metadata": {"name": "b"}}
        )
    assert "exactly one of cron, webhook and subject" in str(refusal.value.body)
