"""Budgets against the real API server, operator and nats-server: the API server refuses what
the models refuse (and accepts what they accept); the operator writes the definition the
runtimes enforce, resolves an Agents selector and follows the Agents' labels, reads a ledger
written by hand into status and the printer columns, turns SoftLimitExceeded and
HardLimitExceeded on with a Warning Event each, writes nothing on an idle pass, and deleting
a Budget removes its definition and ledgers."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from tests.integration.operator_support import API_VERSION, CRDS, install_crds
from tests.integration.test_crd_property import values
from troupe_devcluster.fixtures import ClusterEndpoints
from troupe_operator.api import BudgetSpec
from troupe_operator.api.common import GROUP, VERSION

DEADLINE = 45.0


def budget(name: str, **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "scope": {"type": "Namespace"},
        "window": {"type": "Day"},
        "limits": {"tokens": {"soft": 800, "hard": 1000}},
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "Budget",
        "metadata": {"name": name},
        "spec": {**base, **spec},
    }


# The API server refuses what the models refuse.

REFUSED = [
    pytest.param(
        budget("b", scope={"type": "Agents"}),
        ["spec.scope.agents", "set exactly when scope.type is Agents"],
        id="agents-without-selector",
    ),
    pytest.param(
        budget("b", scope={"type": "Namespace", "agents": {}}),
        ["spec.scope.agents", "set exactly when scope.type is Agents"],
        id="selector-without-agents",
    ),
    pytest.param(
        budget("b", scope={"type": "Workflow"}),
        ["spec.scope.workflow", "set exactly when scope.type is Workflow"],
        id="workflow-without-name",
    ),
    pytest.param(
        budget("b", scope={"type": "Workflow", "workflow": "Not_A_Name"}),
        ["spec.scope.workflow", "should match"],
        id="workflow-not-a-dns-label",
    ),
    pytest.param(
        budget("b", window={"type": "Rolling"}),
        ["spec.window.duration", "set exactly when window.type is Rolling"],
        id="rolling-without-duration",
    ),
    pytest.param(
        budget("b", window={"type": "Day", "duration": "1h"}),
        ["spec.window.duration", "set exactly when window.type is Rolling"],
        id="duration-without-rolling",
    ),
    pytest.param(
        budget("b", window={"type": "Rolling", "duration": "0s"}),
        ["spec.window.duration", "greater than 0"],
        id="zero-duration",
    ),
    pytest.param(
        budget("b", window={"type": "Week"}), ["spec.window.type", "Unsupported value"], id="week"
    ),
    pytest.param(budget("b", limits={}), ["spec.limits", "needs tokens or costUsd"], id="no-limit"),
    pytest.param(
        budget("b", limits={"tokens": {"soft": 10, "hard": 5}}),
        ["spec.limits.tokens", "soft may not exceed"],
        id="token-soft-above-hard",
    ),
    pytest.param(
        budget("b", limits={"costUsd": {"soft": 2.5, "hard": 1}}),
        ["spec.limits.costUsd", "soft may not exceed"],
        id="cost-soft-above-hard",
    ),
    pytest.param(
        budget("b", limits={"tokens": {"hard": 0}}),
        ["spec.limits.tokens.hard", "greater than or equal to 1"],
        id="zero-tokens",
    ),
    pytest.param(
        budget("b", limits={"costUsd": {"hard": 0}}),
        ["spec.limits.costUsd.hard", "greater than 0"],
        id="zero-dollars",
    ),
    pytest.param(
        budget("b", limits={"costUsd": {"hard": 1e10}}),
        ["spec.limits.costUsd.hard", "less than or equal to"],
        id="absurd-dollars",
    ),
    pytest.param(
        budget("b", scope={"type": "Everything"}),
        ["spec.scope.type", "Unsupported value"],
        id="unknown-scope",
    ),
    pytest.param(budget("Upper"), ["metadata.name", "should match"], id="name-not-a-dns-label"),
]


@pytest.fixture(scope="module")
def crds(cluster: ClusterEndpoints) -> None:
    install_crds(cluster)


def _apply(cluster: ClusterEndpoints, namespace: str, manifest: dict[str, Any]) -> str:
    return cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", stdin=json.dumps(manifest), check=False
    )


@pytest.mark.parametrize(("manifest", "expected"), REFUSED)
def test_the_api_server_refuses_an_invalid_budget_naming_the_field(
    cluster: ClusterEndpoints,
    namespace: str,
    crds: None,
    manifest: dict[str, Any],
    expected: list[str],
) -> None:
    refusal = _apply(cluster, namespace, manifest)

    for fragment in expected:
        assert fragment in refusal, refusal
    assert not cluster.kubectl("get", "budgets", "-n", namespace, "-o", "name").strip()


def test_the_edges_of_a_valid_budget_are_accepted(
    cluster: ClusterEndpoints, namespace: str, crds: None
) -> None:
    manifests = [
        budget("equal", limits={"tokens": {"soft": 5, "hard": 5}, "costUsd": {"hard": 1e9}}),
        budget(
            "agents",
            scope={
                "type": "Agents",
                "agents": {
                    "matchLabels": {"team": "research"},
                    "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a"]}],
                },
            },
            window={"type": "Rolling", "duration": "168h"},
            limits={"costUsd": {"soft": 0.01}},
        ),
        budget("run", scope={"type": "Workflow", "workflow": "research"}, window={"type": "Run"}),
    ]
    for manifest in manifests:
        assert "created" in _apply(cluster, namespace, manifest)

    listed = cluster.kubectl("get", "bgt", "-n", namespace)
    assert listed.splitlines()[0].split()[:6] == [
        "NAME",
        "SCOPE",
        "WINDOW",
        "TOKENS",
        "HARD",
        "COST",
    ]
    stored = json.loads(cluster.kubectl("get", "budget/agents", "-n", namespace, "-o", "json"))
    assert BudgetSpec.model_validate(stored["spec"]).window.type == "Rolling"


CRD = yaml.safe_load((CRDS / f"budgets.{GROUP}.yaml").read_text())
SPECS = values(CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"])
SCOPES = st.sampled_from(["Namespace", "Agents", "Workflow"])
WINDOWS = st.sampled_from(["Run", "Hour", "Day", "Month", "Rolling"])


@st.composite
def budget_specs(draw: st.DrawFn) -> dict[str, Any]:
    """Specs from the CRD's schema, with what only CEL or the models refuse mixed in: a
    scope's target or a window's duration set or missing whatever the type, soft above
    hard, no limit at all."""
    spec: dict[str, Any] = draw(SPECS)
    scope = dict(spec.get("scope") or {})
    if draw(st.booleans()):
        scope["type"] = draw(SCOPES)
    if draw(st.booleans()):
        scope["agents"] = {"matchLabels": {"team": "a"}}
    if draw(st.booleans()):
        scope["workflow"] = "research"
    spec["scope"] = scope
    window = dict(spec.get("window") or {})
    if draw(st.booleans()):
        window["type"] = draw(WINDOWS)
    if draw(st.booleans()):
        window["duration"] = draw(st.sampled_from(["1h", "0s", "30m"]))
    spec["window"] = window
    if draw(st.booleans()):
        soft, hard = draw(st.integers(1, 100)), draw(st.integers(1, 100))
        spec["limits"] = {"tokens": {"soft": soft, "hard": hard}}
    if draw(st.booleans()):
        spec["limits"] = {}
    return spec


def _accepted_by_the_api_server(api_client: Any, namespace: str, spec: dict[str, Any]) -> bool:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Budget",
        "metadata": {"name": "judged"},
        "spec": spec,
    }
    try:
        client.CustomObjectsApi(api_client).create_namespaced_custom_object(
            GROUP, VERSION, namespace, "budgets", body, dry_run="All"
        )
    except ApiException as error:
        if error.status != 422:
            raise
        return False
    return True


def _accepted_by_the_models(spec: dict[str, Any]) -> bool:
    try:
        BudgetSpec.model_validate(spec)
    except ValidationError:
        return False
    return True


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(spec=budget_specs())
def test_the_crd_and_the_models_accept_and_refuse_budgets_alike(
    api_client: Any, namespace: str, crds: None, spec: dict[str, Any]
) -> None:
    server = _accepted_by_the_api_server(api_client, namespace, spec)
    assert server == _accepted_by_the_models(spec), json.dumps(spec)
