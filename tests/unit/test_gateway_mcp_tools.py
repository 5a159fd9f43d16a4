"""Agents and Workflows as MCP tools (``troupe_gateway.mcp_tools``): names that round-trip
and fit every rule, input schemas that are object schemas, results that say what happened,
whatever the directory holds."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import jsonschema
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from troupe_gateway import mcp_tools
from troupe_gateway.calls import TaskView
from troupe_gateway.mcp_server import CALL_WAIT_SECONDS, TIMEOUT_META_KEY, wait_seconds

from troupe_runtime.contract.gateway import DirectoryEntry, TargetKind, TaskRecord, TaskState
from troupe_runtime.contract.llm_policy import TOOL_NAME_PATTERN

MCP_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
KINDS: list[TargetKind] = ["Agent", "Workflow"]

labels = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
kinds = st.sampled_from(KINDS)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
schemas = st.dictionaries(st.text(max_size=10), json_values, max_size=6)
non_object_schemas: st.SearchStrategy[dict[str, Any]] = st.sampled_from(
    [
        {"type": "string"},
        {"type": "array", "items": {"type": "integer"}},
        {"type": ["object", "null"]},
        {"anyOf": [{"type": "string"}, {"type": "number"}]},
        {"$defs": {"n": {"type": "integer"}}, "$ref": "#/$defs/n"},
        {"type": "array", "items": {"$ref": "#"}},
        {},
    ]
)


def entry(
    kind: TargetKind = "Agent",
    name: str = "echo",
    input_schema: dict[str, Any] | None = None,
    output_schema: dict[str, Any] | None = None,
) -> DirectoryEntry:
    return DirectoryEntry(
        kind=kind,
        namespace="team",
        name=name,
        description="Echoes",
        input_schema=input_schema,
        output_schema=output_schema,
        subject="troupe.team.agents.echo.inbox.0",
    )


def view(state: TaskState, output: Any = None, error: str | None = None) -> TaskView:
    record = TaskRecord(
        task_id="t1", kind="Agent", name="echo", context_id="c1", created_at=datetime.now(UTC)
    )
    return TaskView(record=record, state=state, output=output, error=error, reason="why")


@given(kinds, labels)
def test_a_tool_name_fits_mcp_and_model_apis_and_names_its_object(
    kind: TargetKind, name: str
) -> None:
    tool = mcp_tools.tool_name(kind, name)
    assert MCP_TOOL_NAME.match(tool)
    assert re.fullmatch(TOOL_NAME_PATTERN, tool)
    target = mcp_tools.parse_tool_name(tool)
    assert target is not None
    assert target.kind == kind
    assert target.name in (name, None)
    assert mcp_tools.is_tool_name(entry(kind, name), tool)


@given(kinds, labels, kinds, labels)
def test_two_objects_never_share_a_tool_name(
    kind: TargetKind, name: str, other_kind: TargetKind, other: str
) -> None:
    assume((kind, name) != (other_kind, other))
    assert mcp_tools.tool_name(kind, name) != mcp_tools.tool_name(other_kind, other)


def test_long_names_are_cut_with_a_digest_and_short_ones_are_kept() -> None:
    assert mcp_tools.tool_name("Workflow", "ingest") == "workflow_ingest"
    long = "a" * 63
    tool = mcp_tools.tool_name("Workflow", long)
    assert len(tool) == 64
    assert mcp_tools.parse_tool_name(tool) == mcp_tools.ToolTarget("Workflow", None)
    assert mcp_tools.parse_tool_name("agent_" + "a" * 58) == mcp_tools.ToolTarget("Agent", "a" * 58)


@given(st.text(max_size=200))
def test_any_text_parses_to_a_dns_label_of_a_kind_or_to_nothing(text: str) -> None:
    target = mcp_tools.parse_tool_name(text)
    if target is not None and target.name is not None:
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", target.name)
        assert len(target.name) <= 63


@given(kinds, st.text(max_size=80))
def test_an_entry_whose_name_no_object_can_have_is_not_a_tool(kind: TargetKind, name: str) -> None:
    assume(not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name))
    assert mcp_tools.tool_for(entry(kind, name)) is None


def test_an_object_input_schema_is_the_tool_input_schema_unchanged() -> None:
    schema = {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}
    tool = mcp_tools.tool_for(entry(input_schema=schema, output_schema=schema))
    assert tool is not None
    assert tool.input_schema == schema
    assert tool.output_schema == schema
    assert tool.name == "agent_echo"
    assert tool.description == "Echoes"


def test_no_input_schema_is_any_object_and_the_arguments_are_the_input() -> None:
    target = entry()
    assert mcp_tools.input_schema(target) == {"type": "object"}
    assert mcp_tools.call_input(target, {"a": 1}) == {"a": 1}
    assert mcp_tools.call_input(target, None) == {}


@given(schemas)
def test_every_input_schema_becomes_an_object_schema(schema: dict[str, Any]) -> None:
    tool_schema = mcp_tools.input_schema(entry(input_schema=schema))
    assert tool_schema["type"] == "object"
    if schema.get("type") == "object":
        assert tool_schema == schema


@given(non_object_schemas, json_values)
def test_a_wrapped_schema_accepts_exactly_what_the_contract_accepts(
    schema: dict[str, Any], value: Any
) -> None:
    """Valid under the contract if and only if ``{"input": value}`` is valid for the tool,
    references included; and the call sends ``value``."""
    target = entry(input_schema=schema)
    wrapped = mcp_tools.input_schema(target)
    jsonschema.Draft202012Validator.check_schema(wrapped)
    contract_ok = jsonschema.Draft202012Validator(schema).is_valid(value)
    tool_ok = jsonschema.Draft202012Validator(wrapped).is_valid({"input": value})
    assert contract_ok == tool_ok
    assert mcp_tools.call_input(target, {"input": value}) == value


def test_a_wrapped_input_refuses_arguments_without_input_or_with_more() -> None:
    target = entry(input_schema={"type": "string"})
    with pytest.raises(mcp_tools.BadArguments, match="'input'"):
        mcp_tools.call_input(target, {"text": "hi"})
    with pytest.raises(mcp_tools.BadArguments, match="takes its input"):
        mcp_tools.call_input(target, {})


def test_deeply_nested_schemas_are_walked_without_overflow() -> None:
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(5000):
        deep = {"anyOf": [deep]}
    assert mcp_tools.input_schema(entry(input_schema=deep))["type"] == "object"


@given(json_values)
def test_a_completed_task_is_text_and_structured_content_an_object(output: Any) -> None:
    result = mcp_tools.task_result(entry(), view("completed", output), 1.0)
    assert not result.is_error
    assert isinstance(result.structured_content, dict)
    assert result.content[0].type == "text"
    assert result.meta is not None
    assert result.meta[f"{mcp_tools.META_PREFIX}taskId"] == "t1"


def test_structured_content_follows_the_output_schema() -> None:
    typed = entry(output_schema={"type": "object"})
    texty = entry(output_schema={"type": "string"})
    answer = mcp_tools.task_result(typed, view("completed", {"a": 1}), 1.0)
    assert answer.structured_content == {"a": 1}
    said = mcp_tools.task_result(texty, view("completed", "hello"), 1.0)
    assert said.structured_content == {"output": "hello"}
    assert said.content[0].text == "hello"  # type: ignore[union-attr]
    schema = mcp_tools.output_schema(texty)
    assert schema is not None
    jsonschema.validate(said.structured_content, schema)


@pytest.mark.parametrize("state", ["failed", "canceled", "rejected"])
def test_a_task_that_did_not_complete_is_an_error_result_with_its_reason(
    state: TaskState,
) -> None:
    result = mcp_tools.task_result(entry(), view(state, error="TooLong"), 1.0)
    assert result.is_error
    assert "TooLong" in result.content[0].text  # type: ignore[union-attr]
    assert "(why)" in result.content[0].text  # type: ignore[union-attr]


def test_a_task_still_working_says_where_to_read_it() -> None:
    result = mcp_tools.task_result(entry(), view("working"), 5.0)
    assert result.is_error
    text = result.content[0].text  # type: ignore[union-attr]
    assert "still working after 5s" in text
    assert "/v1/namespaces/team/agents/echo/tasks/t1" in text


@given(st.one_of(json_values, st.floats()))
def test_any_timeout_meta_is_a_bounded_positive_wait(asked: Any) -> None:
    seconds = wait_seconds({TIMEOUT_META_KEY: asked})
    assert 0 < seconds <= CALL_WAIT_SECONDS
    assert wait_seconds(None) == CALL_WAIT_SECONDS
