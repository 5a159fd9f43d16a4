"""What a tool server says is hostile input: schemas kept only when safe, names models accept,
results rendered to bounded text."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mcp_types import (
    BlobResourceContents,
    CallToolResult,
    EmbeddedResource,
    ResourceLink,
    TextContent,
    TextResourceContents,
    Tool,
    ToolAnnotations,
)

from troupe_runtime.agent.llm.tools.base import (
    MAX_RESULT_BYTES,
    MAX_SCHEMA_BYTES,
    Parameters,
    capped,
    parameters,
)
from troupe_runtime.agent.llm.tools.mcp import McpConnection, render
from troupe_runtime.contract.llm_policy import McpServer

OBJECT = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        (["not", "a", "dict"], "is a list, not a JSON object"),
        ({"type": "string"}, "not an object schema"),
        ({"properties": {}}, "not an object schema"),
        ({"type": "object", "minimum": float("nan")}, "NaN"),
        ({"type": "object", "properties": {"q": {"pattern": "(?<=a)b"}}}, "refused"),
        ({"type": "object", "properties": {"q": {"type": 7}}}, "refused"),
        ({"type": "object", "$ref": "https://example.invalid/schema"}, "refused"),
        ({"type": "object", "description": "x" * MAX_SCHEMA_BYTES}, "more than"),
    ],
    ids=["list", "string", "untyped", "nan", "lookbehind", "bad type", "remote ref", "huge"],
)
def test_a_schema_a_model_must_not_get_is_refused_saying_why(schema: Any, problem: str) -> None:
    checked = parameters(schema)
    assert isinstance(checked, str)
    assert problem in checked


def test_an_object_schema_is_kept_and_checks_arguments() -> None:
    checked = parameters(OBJECT)
    assert isinstance(checked, Parameters)
    assert checked.problem({"q": "x"}) is None
    assert "at (root): 'q' is a required property" in (checked.problem({}) or "")
    assert "must be a JSON object" in (checked.problem(["q"]) or "")
    assert "NaN" in (checked.problem({"q": float("nan")}) or "")


def test_a_catastrophic_pattern_validates_in_linear_time() -> None:
    checked = parameters({"type": "object", "properties": {"q": {"pattern": "^(a+)+$"}}})
    assert isinstance(checked, Parameters)
    assert checked.problem({"q": "a" * 50_000 + "!"}) is not None


@given(text=st.text(max_size=300), limit=st.integers(min_value=4, max_value=200))
def test_capped_text_fits_its_limit_and_keeps_a_prefix(text: str, limit: int) -> None:
    out = capped(text, limit)
    if len(text.encode("utf-8", "replace")) <= limit:
        assert out == text
    else:
        kept = out.split("\n[truncated: ")[0]
        assert len(kept.encode()) <= limit
        assert text.startswith(kept)


def tool(name: str, schema: Any = None, idempotent: bool | None = None) -> Tool:
    annotations = None if idempotent is None else ToolAnnotations(idempotent_hint=idempotent)
    return Tool.model_construct(
        name=name, description=None, input_schema=schema or OBJECT, annotations=annotations
    )


def connection(**policy: Any) -> McpConnection:
    fields = {"name": "srv", "url": "http://127.0.0.1:9/mcp", "timeout": timedelta(seconds=1)}
    return McpConnection(McpServer.model_validate({**fields, **policy}), "http://127.0.0.1:9/mcp")


def test_listed_tools_are_admitted_only_when_named_and_shaped_safely(
    caplog: pytest.LogCaptureFixture,
) -> None:
    listed = [
        tool("good"),
        tool("good"),
        tool("has.dot"),
        tool("x" * 65),
        tool("string_schema", {"type": "string"}),
        tool("hinted", idempotent=True),
        tool("unhinted", idempotent=False),
    ]
    with caplog.at_level(logging.WARNING):
        admitted = connection()._admit(listed)
    assert sorted(admitted) == ["good", "hinted", "unhinted"]
    assert admitted["hinted"].spec.idempotent is True
    assert admitted["unhinted"].spec.idempotent is False
    assert admitted["good"].spec.description == "good (MCP server srv)"
    assert "'good' is listed twice" in caplog.text
    assert "'has.dot' is not a name models accept" in caplog.text
    assert "'string_schema' is skipped: its input schema is not an object schema" in caplog.text


def test_the_allow_list_filters_and_the_idempotent_list_marks() -> None:
    admitted = connection(allow=["good", "other"], idempotent=["good"])._admit(
        [tool("good"), tool("other"), tool("secret")]
    )
    assert sorted(admitted) == ["good", "other"]
    assert admitted["good"].spec.idempotent is True
    assert admitted["other"].spec.idempotent is False


def test_content_blocks_render_to_text_and_placeholders() -> None:
    result = CallToolResult(
        content=[
            TextContent(text="one"),
            ResourceLink(uri="file:///a.txt", name="a"),
            EmbeddedResource(resource=TextResourceContents(uri="file:///b.txt", text="bee")),
            EmbeddedResource(resource=BlobResourceContents(uri="file:///c.bin", blob="AAAA")),
            TextContent(text="two"),
        ]
    )
    assert render(result).content == (
        "one\n[resource link: file:///a.txt]\n[resource file:///b.txt]\nbee\n"
        "[resource file:///c.bin: binary, 3 bytes]\ntwo"
    )


def test_structured_content_is_json_when_no_text_block_carries_it() -> None:
    alone = render(CallToolResult(content=[], structured_content={"n": 1}))
    assert alone.content == '{"n": 1}'
    beside = render(
        CallToolResult(content=[TextContent(text="n is 1")], structured_content={"n": 1})
    )
    assert beside.content == "n is 1"


def test_an_error_result_stays_an_error_and_every_result_is_capped() -> None:
    failed = render(CallToolResult(content=[TextContent(text="boom")], is_error=True))
    assert failed.is_error
    many = render(CallToolResult(content=[TextContent(text="y" * MAX_RESULT_BYTES)] * 5))
    assert len(many.content.encode()) < MAX_RESULT_BYTES + 200
