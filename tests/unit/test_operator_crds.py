"""The generated CRDs: structural, carrying the conventions kubectl, Argo CD and Flux rely on,
and identical to the committed copies (what ``make verify`` checks)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from troupe_operator.gen import apidoc
from troupe_operator.gen import crds as crdgen

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN_IN_STRUCTURAL = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "title", "const"}


def _nodes(schema: Any) -> Iterator[dict[str, Any]]:
    if isinstance(schema, dict):
        yield schema
        for child in schema.get("properties", {}).values():
            yield from _nodes(child)
        for key in ("items", "additionalProperties"):
            if isinstance(schema.get(key), dict):
                yield from _nodes(schema[key])


def _version(resource: crdgen.CustomResource) -> dict[str, Any]:
    (version,) = crdgen.build_crd(resource)["spec"]["versions"]
    assert isinstance(version, dict)
    return version


@pytest.mark.parametrize("directory", ["crds", "charts/troupe/crds"])
def test_committed_crds_match_the_models(directory: str) -> None:
    assert crdgen.main(["check", str(REPO / directory)]) == 0


@pytest.mark.parametrize("resource", crdgen.RESOURCES, ids=lambda r: r.kind)
def test_schema_is_structural(resource: crdgen.CustomResource) -> None:
    schema = _version(resource)["schema"]["openAPIV3Schema"]

    for node in _nodes(schema):
        assert not FORBIDDEN_IN_STRUCTURAL & node.keys(), node
        assert node.get("additionalProperties") is not False
        typed = "type" in node or node.get("x-kubernetes-int-or-string")
        assert typed, f"untyped schema node {node}"


@pytest.mark.parametrize("resource", crdgen.RESOURCES, ids=lambda r: r.kind)
def test_crd_has_status_subresource_printer_columns_and_names(
    resource: crdgen.CustomResource,
) -> None:
    crd = crdgen.build_crd(resource)
    version = _version(resource)

    assert version["subresources"] == {"status": {}}
    columns = [column["name"] for column in version["additionalPrinterColumns"]]
    # A Budget leads with its figures (kubectl get budgets shows the burn), a Trigger with what
    # it fires and when, an Approval with who waits at which step; Ready still shows.
    leads = {
        "Budget": ["Scope", "Window"],
        "Trigger": ["Target", "Schedule"],
        "Approval": ["Requester", "Step"],
        "ChaosExperiment": ["Phase", "Verdict"],
    }
    expected = leads.get(resource.kind, ["Ready", "Reason"])
    assert columns[:2] == expected
    assert "Ready" in columns
    assert columns[-1] == "Age"
    assert crd["spec"]["names"]["shortNames"] == [resource.short_name]
    assert crd["spec"]["names"]["categories"] == ["troupe"]


def test_agent_columns_show_replicas_and_lag() -> None:
    (agent, *_) = crdgen.RESOURCES
    columns = {c["name"]: c["jsonPath"] for c in _version(agent)["additionalPrinterColumns"]}

    assert columns["Replicas"] == ".status.readyReplicas"
    assert columns["Lag"] == ".status.lag"


def test_defaults_reach_nested_fields_through_empty_objects() -> None:
    (agent, *_) = crdgen.RESOURCES
    spec = _version(agent)["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]

    assert spec["messaging"]["default"] == {}
    assert spec["messaging"]["properties"]["ackWait"]["default"] == "2m"
    assert spec["runtime"]["properties"]["image"]["default"] == "troupe/runtime:0.1.0"
    assert spec["deletionPolicy"]["default"] == "Delete"
    assert spec["deletionPolicy"]["enum"] == ["Delete", "Retain"]


def test_optional_fields_are_plain_optional_properties() -> None:
    (agent, *_) = crdgen.RESOURCES
    spec = _version(agent)["schema"]["openAPIV3Schema"]["properties"]["spec"]

    assert spec["required"] == ["role"]
    assert spec["properties"]["rateLimit"]["type"] == "object"
    assert "default" not in spec["properties"]["rateLimit"]


def test_cel_rules_are_attached_where_the_models_declare_them() -> None:
    (agent, workflow, *_) = crdgen.RESOURCES
    agent_spec = _version(agent)["schema"]["openAPIV3Schema"]["properties"]["spec"]
    workflow_spec = _version(workflow)["schema"]["openAPIV3Schema"]["properties"]["spec"]

    def messages(node: dict[str, Any]) -> list[str]:
        return [rule["message"] for rule in node.get("x-kubernetes-validations", [])]

    assert messages(agent_spec)[0].startswith("timeout + 10s must fit into 70% of")
    assert messages(agent_spec["properties"]["retry"]) == [
        "backoff must not list more delays than maxAttempts"
    ]
    assert messages(workflow_spec) == [
        "step names must be unique",
        "every dependsOn must name a step of this workflow",
    ]
    assert "a step must not depend on itself" in messages(
        workflow_spec["properties"]["steps"]["items"]
    )


def test_free_form_json_schemas_are_preserved() -> None:
    (agent, *_) = crdgen.RESOURCES
    spec = _version(agent)["schema"]["openAPIV3Schema"]["properties"]["spec"]
    contract = spec["properties"]["contract"]["properties"]

    assert contract["inputSchema"]["x-kubernetes-preserve-unknown-fields"] is True


def test_the_committed_api_reference_matches_the_models() -> None:
    reference = Path(__file__).resolve().parents[2] / "docs" / "api-reference.md"
    assert reference.read_text() == apidoc.render()
