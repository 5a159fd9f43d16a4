"""Every field of both CRDs explains itself: ``kubectl explain`` shows a description for each,
in plain text, and every duration says its format and its default."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from troupe_operator.gen import crds as crdgen
from troupe_runtime.contract.durations import DURATION_PATTERN

EXEMPT = {"metadata"}
"""The API server refuses a description on the root's metadata: its schema is its own."""


def _schema(resource: crdgen.CustomResource) -> dict[str, Any]:
    (version,) = crdgen.build_crd(resource)["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def _properties(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every property below ``node``, with its path, depth first."""
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from _properties(node[key], f"{path}[]")
    for name, child in (node.get("properties") or {}).items():
        yield f"{path}.{name}", child
        yield from _properties(child, f"{path}.{name}")


def _all(resource: crdgen.CustomResource) -> list[tuple[str, dict[str, Any]]]:
    return list(_properties(_schema(resource), resource.kind.lower()))


@pytest.mark.parametrize("resource", crdgen.RESOURCES, ids=lambda r: r.kind)
def test_every_property_has_a_description(resource: crdgen.CustomResource) -> None:
    missing = [
        path
        for path, node in _all(resource)
        if path.rsplit(".", 1)[-1] not in EXEMPT and not node.get("description", "").strip()
    ]

    assert not missing, f"fields without a description: {missing}"


@pytest.mark.parametrize("resource", crdgen.RESOURCES, ids=lambda r: r.kind)
def test_descriptions_are_plain_text(resource: crdgen.CustomResource) -> None:
    marked = [
        path
        for path, node in _all(resource)
        if any(mark in node.get("description", "") for mark in ("``", "\n", ":class:"))
    ]

    assert not marked, f"descriptions with markup or line breaks: {marked}"


@pytest.mark.parametrize("resource", crdgen.RESOURCES, ids=lambda r: r.kind)
def test_durations_document_their_format_and_default(resource: crdgen.CustomResource) -> None:
    durations = [
        (path, node) for path, node in _all(resource) if node.get("pattern") == DURATION_PATTERN
    ]
    lists = [
        (path, node)
        for path, node in _all(resource)
        if node.get("items", {}).get("pattern") == DURATION_PATTERN
    ]

    # A ModelProvider has no durations, and an Approval's expiry is a time.
    assert durations or lists or resource.kind in ("ModelProvider", "Approval")
    for path, node in durations + lists:
        text = node["description"]
        assert "duration such as" in text, f"{path} does not show the format: {text}"
        if "default" in node:
            assert f"default {node['default']}" in text, f"{path} hides its default: {text}"


def test_every_agent_field_with_a_default_names_it() -> None:
    silent = [
        path
        for resource in crdgen.RESOURCES
        for path, node in _all(resource)
        if "default" in node
        and node["default"] not in ({}, "")
        and "default" not in node["description"].lower()
    ]

    assert not silent, f"fields that do not say their default: {silent}"


def test_wide_columns_show_dead_letters_and_redeliveries() -> None:
    (agent, workflow, *_) = crdgen.RESOURCES

    def wide(resource: crdgen.CustomResource) -> dict[str, str]:
        (version,) = crdgen.build_crd(resource)["spec"]["versions"]
        return {
            column["name"]: column["jsonPath"]
            for column in version["additionalPrinterColumns"]
            if column.get("priority") == 1
        }

    assert wide(agent) == {
        "DeadLetters": ".status.deadLetters",
        "Redelivered": ".status.consumers.redelivered",
        "Tokens(1h)": ".status.usage.tokens",
    }
    assert wide(workflow) == {
        "LastRun": ".status.lastRun.id",
        "Started": ".status.lastRun.startedAt",
        "LastCost": ".status.lastRun.costUsd",
    }
