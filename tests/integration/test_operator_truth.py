"""Every Agent gets a truthful status and can be deleted, against the real API server and
operator: a spec the models refuse, an object the API server refuses, objects Troupe does
not own, missing ConfigMaps and Secret keys, NATS that never answers, passwords in URLs,
crashing pods; and the Events that tell each story."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from tests.integration.operator_support import (
    OperatorProcess,
    agent,
    apply,
    condition,
    get,
    running_agent,
    stream_names,
    workflow,
)
from troupe_devcluster.fixtures import ClusterEndpoints, wait_for
from troupe_devcluster.kube import apps_v1, core_v1
from troupe_runtime.contract import naming

DEADLINE = 45.0
FINALIZER_TIMEOUT = 6
"""Seconds the test operator keeps trying to delete NATS resources before it lets go."""
UNREACHABLE = "nats://127.0.0.1:1"


@pytest.fixture(scope="module")
def operator_env() -> dict[str, str]:
    return {"TROUPE_FINALIZER_TIMEOUT": str(FINALIZER_TIMEOUT)}


def _condition_with(
    cluster: ClusterEndpoints, namespace: str, name: str, kind: str, reason: str
) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        seen = condition(get(cluster, namespace, "agent", name), kind)
        return seen if seen is not None and seen["reason"] == reason else None

    seen: dict[str, Any] = wait_for(found, DEADLINE, f"{kind} with reason {reason} on {name}")
    return seen


def _stalled(cluster: ClusterEndpoints, namespace: str, name: str, reason: str) -> dict[str, Any]:
    """The Stalled condition once it is True for ``reason``; Ready says the same."""
    stalled = _condition_with(cluster, namespace, name, "Stalled", reason)
    body = get(cluster, namespace, "agent", name)
    assert stalled["status"] == "True"
    ready = condition(body)
    reconciling = condition(body, "Reconciling")
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("False", reason)
    assert reconciling is not None
    assert reconciling["status"] == "False"
    return stalled


def _gone(cluster: ClusterEndpoints, namespace: str, name: str) -> bool:
    return (
        not cluster.kubectl("get", "-n", namespace, "agents", "-o", "name")
        .strip()
        .count(f"agent.troupe.dev/{name}")
    )


def _delete(cluster: ClusterEndpoints, namespace: str, name: str) -> None:
    cluster.kubectl("delete", "-n", namespace, "agent", name, "--wait=false")
    wait_for(lambda: _gone(cluster, namespace, name), DEADLINE, f"Agent {name} to be deleted")


def _events(api_client: Any, namespace: str, name: str) -> list[Any]:
    listing = core_v1(api_client).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}"
    )
    return list(listing.items)


def _event(api_client: Any, namespace: str, name: str, reason: str) -> Any:
    def found() -> Any:
        return next((e for e in _events(api_client, namespace, name) if e.reason == reason), None)

    return wait_for(found, DEADLINE, f"an Event {reason} about {name}")


def _loosened(crd: dict[str, Any]) -> dict[str, Any]:
    """The Agent CRD with no validation of the spec: what an older, looser CRD stored."""
    loose = copy.deepcopy(crd)
    for version in loose["spec"]["versions"]:
        schema = version["schema"]["openAPIV3Schema"]
        schema.pop("x-kubernetes-validations", None)
        schema["properties"]["spec"] = {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": True,
        }
    for key in ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields"):
        loose["metadata"].pop(key, None)
    loose.pop("status", None)
    return loose


def _store_under_a_looser_crd(
    cluster: ClusterEndpoints, namespace: str, plural: str, manifest: dict[str, Any]
) -> None:
    """Store ``manifest`` as an older, looser CRD would have, then restore the shipped CRD:
    the API server does not revalidate stored objects, so the operator meets specs its
    models refuse, as after an upgrade that tightened validation."""
    crd = f"{plural}.troupe.dev"
    shipped = json.loads(cluster.kubectl("get", "crd", crd, "-o", "json"))
    cluster.kubectl("replace", "-f", "-", stdin=json.dumps(_loosened(shipped)))
    try:
        wait_for(
            lambda: (
                not cluster.kubectl(
                    "apply", "-n", namespace, "-f", "-", stdin=json.dumps(manifest), check=False
                ).startswith("Error")
            ),
            DEADLINE,
            f"the loose CRD to accept {manifest['metadata']['name']}",
        )
    finally:
        restored = _loosened(shipped)
        restored["spec"] = shipped["spec"]
        cluster.kubectl("replace", "-f", "-", stdin=json.dumps(restored))


def test_a_spec_the_models_refuse_gets_a_status_naming_the_field_and_is_deletable(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, operator: OperatorProcess
) -> None:
    # A pattern the shipped CRD checks too (so updates of the stored object ratchet: kopf
    # can still remove its finalizer).
    relic = agent("relic", runtime={"env": [{"name": "A=B", "value": "x"}]})
    _store_under_a_looser_crd(cluster, namespace, "agents", relic)

    stalled = _stalled(cluster, namespace, "relic", "SpecInvalid")
    assert "spec.runtime.env[0].name" in stalled["message"]
    spec_valid = condition(get(cluster, namespace, "agent", "relic"), "SpecValid")
    assert spec_valid is not None
    assert (spec_valid["status"], spec_valid["reason"]) == ("False", "SpecInvalid")
    assert _event(api_client, namespace, "relic", "SpecInvalid").type == "Warning"

    _delete(cluster, namespace, "relic")


def test_a_workflow_spec_the_models_refuse_gets_a_status_and_is_deletable(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    relic = workflow("old-flow", [{"name": "Not A Label", "agentRef": "someone"}])
    _store_under_a_looser_crd(cluster, namespace, "workflows", relic)

    def stalled() -> dict[str, Any] | None:
        found = condition(get(cluster, namespace, "workflow", "old-flow"), "Stalled")
        return found if found is not None and found["reason"] == "SpecInvalid" else None

    found = wait_for(stalled, DEADLINE, "Stalled=True SpecInvalid on the Workflow")
    assert "spec.steps[0].name" in found["message"]

    cluster.kubectl("delete", "-n", namespace, "workflow", "old-flow", "--wait=false")
    wait_for(
        lambda: not cluster.kubectl("get", "-n", namespace, "workflows", "-o", "name").strip(),
        DEADLINE,
        "the Workflow to be deleted",
    )


def test_an_object_the_api_server_refuses_is_reported_with_its_message_and_field(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    sidecar = {"name": "proxy", "image": "envoy:1", "ports": [{"containerPort": 99999}]}
    apply(cluster, namespace, agent("refused", runtime={"sidecars": [sidecar]}))

    stalled = _stalled(cluster, namespace, "refused", "ObjectRejected")

    assert "spec.runtime.sidecars[0].ports[0].containerPort" in stalled["message"]
    assert "65535" in stalled["message"]
    _delete(cluster, namespace, "refused")


def test_a_foreign_service_account_is_neither_adopted_nor_deleted(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, operator: OperatorProcess
) -> None:
    core_v1(api_client).create_namespaced_service_account(
        namespace, {"metadata": {"name": "borrower"}}
    )
    apply(cluster, namespace, agent("borrower", runtime={"createServiceAccount": True}))

    stalled = _stalled(cluster, namespace, "borrower", "ObjectConflict")

    assert "spec.runtime.createServiceAccount" in stalled["message"]
    assert "ServiceAccount borrower" in stalled["message"]
    account = core_v1(api_client).read_namespaced_service_account("borrower", namespace)
    assert not account.metadata.owner_references
    assert not apps_v1(api_client).list_namespaced_deployment(namespace).items
    _delete(cluster, namespace, "borrower")
    assert core_v1(api_client).read_namespaced_service_account("borrower", namespace)


def test_a_foreign_deployment_is_left_alone(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess, api_client: Any
) -> None:
    cluster.kubectl("create", "deployment", "squatter", "-n", namespace, "--image=someone:1")
    apply(cluster, namespace, agent("squatter"))

    stalled = _stalled(cluster, namespace, "squatter", "ObjectConflict")

    assert "Deployment squatter" in stalled["message"]
    deployment = apps_v1(api_client).read_namespaced_deployment("squatter", namespace)
    assert deployment.spec.template.spec.containers[0].image == "someone:1"
    _delete(cluster, namespace, "squatter")


def test_a_missing_config_map_stalls_until_it_exists(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, operator: OperatorProcess
) -> None:
    handler = {"type": "python", "entrypoint": "mine:handle"}
    apply(
        cluster,
        namespace,
        agent("coder", runtime={"handler": handler, "code": {"configMap": "coder-code"}}),
    )

    stalled = _stalled(cluster, namespace, "coder", "ConfigMapNotFound")
    assert "spec.runtime.code.configMap" in stalled["message"]
    warning = _event(api_client, namespace, "coder", "ConfigMapNotFound")
    assert warning.type == "Warning"

    core_v1(api_client).create_namespaced_config_map(
        namespace, {"metadata": {"name": "coder-code"}, "data": {"mine.py": "def handle(m): m"}}
    )
    _condition_with(cluster, namespace, "coder", "SecretsResolved", "SecretsFound")
    _delete(cluster, namespace, "coder")


def test_a_tls_secret_without_ca_is_not_ready_and_the_agent_is_deletable(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, operator: OperatorProcess
) -> None:
    core_v1(api_client).create_namespaced_secret(
        namespace, {"metadata": {"name": "half-tls"}, "stringData": {"tls.crt": "x"}}
    )
    apply(cluster, namespace, agent("tlsless", nats={"tls": {"secretName": "half-tls"}}))

    stalled = _stalled(cluster, namespace, "tlsless", "SecretKeyMissing")

    assert "ca.crt" in stalled["message"]
    _delete(cluster, namespace, "tlsless")


def test_a_credentials_secret_without_its_key_does_not_block_deletion(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, operator: OperatorProcess
) -> None:
    core_v1(api_client).create_namespaced_secret(
        namespace, {"metadata": {"name": "keyless"}, "stringData": {"other": "x"}}
    )
    credentials = {"name": "keyless", "key": "nats.creds"}
    apply(cluster, namespace, agent("keyless", nats={"credentialsSecret": credentials}))
    _stalled(cluster, namespace, "keyless", "SecretKeyMissing")

    _delete(cluster, namespace, "keyless")


def test_deletion_lets_go_of_nats_that_never_answers_with_a_warning(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, operator: OperatorProcess
) -> None:
    apply(cluster, namespace, agent("stranded", nats={"url": UNREACHABLE}))
    _condition_with(cluster, namespace, "stranded", "Ready", "MessagingUnavailable")

    _delete(cluster, namespace, "stranded")

    warning = _event(api_client, namespace, "stranded", "CleanupAbandoned")
    assert warning.type == "Warning"
    assert naming.inbox_stream(namespace, "stranded") in warning.message


def test_a_password_in_the_nats_url_reaches_neither_status_nor_events_nor_logs(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, operator: OperatorProcess
) -> None:
    secret = "hunter2sesame"
    apply(cluster, namespace, agent("leaky", nats={"url": f"nats://bob:{secret}@127.0.0.1:1"}))

    ready = _condition_with(cluster, namespace, "leaky", "Ready", "MessagingUnavailable")

    assert "127.0.0.1:1" in ready["message"]
    assert secret not in json.dumps(get(cluster, namespace, "agent", "leaky")["status"])
    _event(api_client, namespace, "leaky", "MessagingUnavailable")
    assert all(secret not in (e.message or "") for e in _events(api_client, namespace, "leaky"))
    _delete(cluster, namespace, "leaky")
    assert secret not in operator.log_tail(2000)


def test_a_drift_correction_is_an_event(
    cluster: ClusterEndpoints, api_client: Any, namespace: str, operator: OperatorProcess
) -> None:
    apply(cluster, namespace, agent("steady"))
    _condition_with(cluster, namespace, "steady", "Ready", "Ready")

    cluster.kubectl("scale", "-n", namespace, "deployment/steady", "--replicas=3")

    drift = _event(api_client, namespace, "steady", "DriftCorrected")
    assert "Deployment steady" in drift.message
    ready = _event(api_client, namespace, "steady", "Ready")
    assert ready.type == "Normal"
    wait_for(
        lambda: (
            apps_v1(api_client).read_namespaced_deployment("steady", namespace).spec.replicas == 1
        ),
        DEADLINE,
        "the Deployment back at one replica",
    )
    _delete(cluster, namespace, "steady")
    assert naming.inbox_stream(namespace, "steady") not in stream_names(cluster.nats_url)


def test_crashing_pods_are_reported_with_their_termination_message(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    handler = {"type": "python", "entrypoint": "no_such_module_here:handle"}
    apply(cluster, namespace, running_agent("crasher", runtime={"handler": handler}))

    stalled = _stalled(cluster, namespace, "crasher", "PodsCrashing")

    assert "no_such_module_here" in stalled["message"]
    assert "crasher-" in stalled["message"]
    _delete(cluster, namespace, "crasher")
