"""An object stored under a looser CRD (an older Troupe) stays deletable under the shipped one.

The shipped rules convert durations with CEL's ``duration()``, which fails on text it cannot
parse; an evaluation error must never refuse the metadata update that removes the finalizer,
or the object (and its namespace) could never be deleted. The shipped Agent CRD is installed
under a test group so the real rules run without touching the cluster's troupe.dev CRDs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from troupe_devcluster.fixtures import ClusterEndpoints, wait_for
from troupe_operator.api.common import GROUP, VERSION

ROOT = Path(__file__).resolve().parents[2]
TEST_GROUP = "upgrade.troupe.test"
FINALIZER = "troupe.dev/nats-cleanup"


def _shipped_crd_under_test_group() -> dict[str, Any]:
    crd: dict[str, Any] = yaml.safe_load((ROOT / "crds" / f"agents.{GROUP}.yaml").read_text())
    crd["metadata"] = {"name": f"agents.{TEST_GROUP}"}
    crd["spec"]["group"] = TEST_GROUP
    return crd


def _loosened(crd: dict[str, Any]) -> dict[str, Any]:
    """The CRD as an older release had it: ``timeout`` any string, no rule converting it."""
    loose = copy.deepcopy(crd)
    spec = loose["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["properties"]["timeout"] = {"type": "string"}
    spec.pop("x-kubernetes-validations", None)
    return loose


def _apply(cluster: ClusterEndpoints, crd: dict[str, Any]) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=json.dumps(crd))
    cluster.kubectl("wait", "--for=condition=Established", f"crd/agents.{TEST_GROUP}")


def test_an_agent_stored_with_a_duration_the_rules_cannot_parse_stays_deletable(
    cluster: ClusterEndpoints, api_client: Any, namespace: str
) -> None:
    shipped = _shipped_crd_under_test_group()
    _apply(cluster, _loosened(shipped))
    custom = client.CustomObjectsApi(api_client)
    body = {
        "apiVersion": f"{TEST_GROUP}/{VERSION}",
        "kind": "Agent",
        "metadata": {"name": "old", "finalizers": [FINALIZER]},
        "spec": {"role": "stored long ago", "timeout": "forever"},
    }
    wait_for(
        lambda: _created(custom, namespace, body), timeout=30, what="the loose CRD to serve Agents"
    )
    try:
        _apply(cluster, shipped)
        custom.delete_namespaced_custom_object(TEST_GROUP, VERSION, namespace, "agents", "old")
        # What the operator's finalizer does last: a metadata patch dropping the finalizer.
        custom.patch_namespaced_custom_object(
            TEST_GROUP, VERSION, namespace, "agents", "old", {"metadata": {"finalizers": None}}
        )
        wait_for(lambda: not _exists(custom, namespace, "old"), timeout=30, what="the Agent to go")
    finally:
        cluster.kubectl("delete", f"crd/agents.{TEST_GROUP}", "--wait=false", check=False)


def _created(custom: client.CustomObjectsApi, namespace: str, body: dict[str, Any]) -> bool:
    try:
        custom.create_namespaced_custom_object(TEST_GROUP, VERSION, namespace, "agents", body)
    except client.ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


def _exists(custom: client.CustomObjectsApi, namespace: str, name: str) -> bool:
    try:
        custom.get_namespaced_custom_object(TEST_GROUP, VERSION, namespace, "agents", name)
    except client.ApiException as error:
        if error.status == 404:
            return False
        raise
    return True
