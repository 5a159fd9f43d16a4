"""Whatever the API server accepts, the operator answers: random Agents and Workflows,
generated from the very CRD schemas that ship, are applied with the real operator running.
The API server judges validity (what it refuses is filtered out); every object it stores
must get a status and be deletable, each within a deadline."""

from __future__ import annotations

import os
import string
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.integration.operator_support import CRDS, OperatorProcess
from troupe_devcluster.fixtures import wait_for
from troupe_operator.api.common import GROUP, VERSION

STATUS_DEADLINE = 30.0
DELETE_DEADLINE = 45.0
FINALIZER_TIMEOUT = "10"
"""Seconds the operator waits on an unreachable NATS before letting a deletion go: a random
spec may name a NATS server that does not exist, and the deadline above must cover it."""
MAX_ITEMS = 2
MAP_KEYS = st.sampled_from(
    ["cpu", "memory", "ephemeral-storage", "example.com/gpu", "pool", "kubernetes.io/arch"]
)
"""Keys of free-form maps: the CRD's CEL rules judge them, so offer ones it may accept."""
FREE_FORM = st.sampled_from([{}, {"type": "object"}, {"type": "string", "maxLength": 8}])


def _properties(kind: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRDS / f"{kind}s.{GROUP}.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    properties: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]
    return properties


def _schema(kind: str) -> dict[str, Any]:
    spec: dict[str, Any] = _properties(kind)["spec"]
    return spec


def _metadata(kind: str) -> dict[str, Any]:
    metadata: dict[str, Any] = _properties(kind)["metadata"]
    return metadata


def values(node: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values of one structural schema node: its types, patterns, bounds and enums; the API
    server decides the rest (CEL)."""
    if "enum" in node:
        return st.sampled_from(node["enum"])
    if node.get("x-kubernetes-int-or-string"):
        return st.one_of(st.integers(0, 4), _strings(node))
    kind = node.get("type")
    if kind == "string":
        return _strings(node)
    if kind == "integer":
        low = node.get("minimum", 0)
        return st.integers(low, min(node.get("maximum", low + 100), max(low, 100)))
    if kind == "number":
        return st.floats(0.01, 100, allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "array":
        return st.lists(
            values(node["items"]),
            min_size=node.get("minItems", 0),
            max_size=max(min(node.get("maxItems", MAX_ITEMS), MAX_ITEMS), node.get("minItems", 0)),
        )
    if "properties" in node:
        required = set(node.get("required", []))
        properties = node["properties"]
        return st.fixed_dictionaries(
            {name: values(properties[name]) for name in properties if name in required},
            optional={
                name: values(properties[name]) for name in properties if name not in required
            },
        )
    if isinstance(node.get("additionalProperties"), dict):
        return st.dictionaries(MAP_KEYS, values(node["additionalProperties"]), max_size=MAX_ITEMS)
    return FREE_FORM


def _strings(node: dict[str, Any]) -> st.SearchStrategy[str]:
    longest = min(node.get("maxLength", 24), 64)
    if "pattern" in node:
        return st.from_regex(node["pattern"], fullmatch=True).filter(lambda s: len(s) <= longest)
    alphabet = string.ascii_letters + string.digits + " .-_"
    return st.text(alphabet, min_size=node.get("minLength", 0), max_size=min(longest, 24))


NAMES = st.one_of(
    values(_metadata("agent")["properties"]["name"]),
    st.from_regex(r"^[a-z][a-z0-9]{56,62}$", fullmatch=True),
)
"""Names as the CRD allows them, up to 63 characters: they become object names, labels and
subject tokens."""
AGENT_SPECS = values(_schema("agent"))
WORKFLOW_SPECS = values(_schema("workflow"))


@pytest.fixture(scope="module")
def operator_env() -> dict[str, str]:
    return {"TROUPE_FINALIZER_TIMEOUT": FINALIZER_TIMEOUT}


def _objects(api_client: Any) -> Any:
    return client.CustomObjectsApi(api_client)


def _applied_answered_and_deleted(
    api_client: Any,
    namespace: str,
    kind: str,
    name: str,
    spec: dict[str, Any],
    operator: OperatorProcess,
) -> None:
    plural = f"{kind.lower()}s"
    manifest = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    }
    objects = _objects(api_client)
    try:
        objects.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, manifest)
    except ApiException as refusal:
        if refusal.status != 422:  # anything but "invalid" is the test's own failure
            raise
        reject()

    def answered() -> Any:
        stored = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        status = stored.get("status") or {}
        types = {condition["type"] for condition in status.get("conditions", [])}
        current = status.get("observedGeneration") == stored["metadata"]["generation"]
        return current and {"Ready", "Reconciling", "Stalled"} <= types and status

    status = wait_for(
        answered, STATUS_DEADLINE, f"a status for {kind} {name} ({operator.log_tail(5)})"
    )
    objects.delete_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
    wait_for(
        lambda: _gone(objects, namespace, plural, name),
        DELETE_DEADLINE,
        f"{kind} {name} to be deleted (status: {status})",
    )


def _gone(objects: Any, namespace: str, plural: str, name: str) -> bool:
    try:
        objects.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
    except ApiException as error:
        return bool(error.status == 404)
    return False


PROPERTY_SETTINGS = settings(
    # A fixed sequence of examples, so the run stays about a minute and never varies; explore
    # further with TROUPE_PROPERTY_EXAMPLES=200 and a --hypothesis-seed.
    max_examples=int(os.environ.get("TROUPE_PROPERTY_EXAMPLES", "12")),
    deadline=None,
    derandomize="TROUPE_PROPERTY_EXAMPLES" not in os.environ,
    suppress_health_check=[
        HealthCheck.filter_too_much,
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)


@PROPERTY_SETTINGS
@given(name=NAMES, spec=AGENT_SPECS)
def test_every_stored_agent_gets_a_status_and_can_be_deleted(
    api_client: Any, namespace: str, operator: OperatorProcess, name: str, spec: dict[str, Any]
) -> None:
    _applied_answered_and_deleted(api_client, namespace, "Agent", name, spec, operator)


@PROPERTY_SETTINGS
@given(name=NAMES, spec=WORKFLOW_SPECS)
def test_every_stored_workflow_gets_a_status_and_can_be_deleted(
    api_client: Any, namespace: str, operator: OperatorProcess, name: str, spec: dict[str, Any]
) -> None:
    _applied_answered_and_deleted(api_client, namespace, "Workflow", name, spec, operator)
