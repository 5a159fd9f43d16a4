"""The A2A card of an Agent or Workflow: what it says, and that any entry, hostile text and
schemas included, makes a bounded card the SDK's own parser and validator accept."""

from __future__ import annotations

import json
from typing import Any

from a2a.client.card_resolver import parse_agent_card
from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.utils.proto_utils import validate_proto_required_fields
from hypothesis import given, settings
from hypothesis import strategies as st
from troupe_gateway import cards

from troupe_runtime.contract.gateway import DirectoryEntry

SCHEMA = {
    "type": "object",
    "title": "Question",
    "required": ["text"],
    "properties": {"text": {"type": "string"}, "lang": {"type": "string"}},
    "examples": [{"text": "hello"}, {"text": "x" * 5000}],
}


def _entry(**fields: Any) -> DirectoryEntry:
    base: dict[str, Any] = {
        "kind": "Agent",
        "namespace": "team",
        "name": "helper",
        "description": "You answer questions.\n\nA helpful agent.",
        "subject": "troupe.team.inbox.helper.0",
        "input_schema": SCHEMA,
        "generation": 7,
    }
    return DirectoryEntry.model_validate(base | fields)


def test_the_card_names_the_target_its_role_and_generation() -> None:
    card = cards.card(_entry(), "https://gw.example/")
    assert card.name == "helper"
    assert card.description == "You answer questions.\n\nA helpful agent."
    assert card.version == "7"


def test_both_bindings_are_at_the_target_absolute_url() -> None:
    card = cards.card(_entry(), "https://gw.example/")
    urls = {(i.protocol_binding, i.url, i.protocol_version) for i in card.supported_interfaces}
    url = "https://gw.example/a2a/team/agents/helper"
    assert urls == {("JSONRPC", url, "1.0"), ("HTTP+JSON", url, "1.0")}


def test_a_workflow_is_beneath_workflows_and_streams() -> None:
    card = cards.card(_entry(kind="Workflow", subject="troupe.team.wf.helper.start.*"), "http://g")
    assert card.supported_interfaces[0].url == "http://g/a2a/team/workflows/helper"
    assert card.capabilities.streaming
    assert card.capabilities.push_notifications


def test_an_agent_streams_only_when_its_entry_does() -> None:
    assert not cards.card(_entry(), "http://g").capabilities.streaming
    assert cards.card(_entry(streaming=True), "http://g").capabilities.streaming


def test_one_skill_from_the_input_schema() -> None:
    (skill,) = cards.card(_entry(), "http://g").skills
    assert skill.id == "agents/helper"
    assert skill.name == "Question"
    assert skill.description.startswith("You answer questions.")
    assert '"required":["text"]' in skill.description
    assert list(skill.tags) == ["troupe", "agent", "text", "lang"]
    assert list(skill.examples) == ['{"text":"hello"}']


def test_modes_and_security_schemes() -> None:
    card = cards.card(_entry(), "http://g")
    assert list(card.default_input_modes) == ["application/json", "text/plain"]
    assert list(card.default_output_modes) == ["application/json", "text/plain"]
    schemes = card.security_schemes
    assert schemes["bearer"].http_auth_security_scheme.scheme == "Bearer"
    assert schemes["apiKey"].api_key_security_scheme.name == "X-API-Key"
    assert schemes["apiKey"].api_key_security_scheme.location == "header"
    assert [set(r.schemes) for r in card.security_requirements] == [{"bearer"}, {"apiKey"}]


def test_no_schema_says_any_json() -> None:
    (skill,) = cards.card(_entry(input_schema=None, description=""), "http://g").skills
    assert "any JSON" in skill.description
    assert cards.card(_entry(description=""), "http://g").description


json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=30,
)
hostile_text = st.text(alphabet=st.characters(codec=None), max_size=200) | st.builds(
    lambda s, n: s * n, st.text(min_size=1, max_size=5), st.integers(1000, 20000)
)


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(["Agent", "Workflow"]),
    description=hostile_text,
    schema=st.none() | st.dictionaries(st.text(max_size=20), json_values, max_size=6),
    title=json_values,
    examples=json_values,
    properties=json_values,
    generation=st.integers(0, 2**62),
    streaming=st.booleans(),
)
def test_any_entry_makes_a_bounded_card_the_sdk_accepts(
    kind: str,
    description: str,
    schema: dict[str, Any] | None,
    title: Any,
    examples: Any,
    properties: Any,
    generation: int,
    streaming: bool,
) -> None:
    if schema is not None:
        schema = schema | {"title": title, "examples": examples, "properties": properties}
    entry = _entry(
        kind=kind,
        description=description,
        input_schema=schema,
        generation=generation,
        streaming=streaming,
    )
    card = cards.card(entry, "https://gw.example")
    validate_proto_required_fields(card)
    served = agent_card_to_dict(card)
    text = json.dumps(served, ensure_ascii=False)
    assert len(text.encode()) < 64 * 1024
    assert parse_agent_card(json.loads(text)) == card


def test_nesting_too_deep_to_print_still_makes_a_card() -> None:
    deep: Any = "x"
    for _ in range(5000):
        deep = [deep]
    card = cards.card(_entry(input_schema={"type": "array", "examples": [deep]}), "http://g")
    validate_proto_required_fields(card)
    assert list(card.skills[0].examples) == []
