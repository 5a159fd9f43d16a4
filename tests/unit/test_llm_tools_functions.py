"""Python functions as tools: the schema from the signature, arguments validated before the
call, plain functions on a thread, a timeout per call, and errors the model can read."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from troupe_runtime.agent.handlers.threads import HandlerThreads
from troupe_runtime.agent.llm.tools.functions import FunctionToolBox, PythonTool
from troupe_runtime.agent.llm.types import ToolCall
from troupe_runtime.contract.llm_policy import FunctionTool

MODULE = "tests.support.tool_functions"


def tool(function: str, **policy: Any) -> PythonTool:
    return PythonTool.load(FunctionTool(entrypoint=f"{MODULE}:{function}", **policy))


def box(*tools: PythonTool) -> FunctionToolBox:
    return FunctionToolBox(list(tools), HandlerThreads(2))


def call(name: str) -> ToolCall:
    return ToolCall(id="c1", name=name, arguments="")


def test_the_schema_comes_from_the_signature_and_the_description_from_the_docstring() -> None:
    spec = tool("forecast").spec
    assert spec.name == "forecast"
    assert spec.description == "Forecast the weather for a city."
    assert spec.parameters["type"] == "object"
    assert spec.parameters["required"] == ["city"]
    properties = spec.parameters["properties"]
    assert properties["city"]["type"] == "string"
    assert properties["days"] == {"default": 3, "title": "Days", "type": "integer"}
    assert properties["unit"]["enum"] == ["C", "F"]
    assert spec.parameters["additionalProperties"] is False
    assert spec.idempotent is False


def test_a_model_parameter_becomes_a_nested_schema_and_the_policy_names_the_tool() -> None:
    spec = tool("geocode", name="where", idempotent=True).spec
    assert spec.name == "where"
    assert spec.idempotent is True
    assert spec.parameters["properties"]["address"] == {"$ref": "#/$defs/Address"}
    assert spec.parameters["$defs"]["Address"]["required"] == ["city"]


def test_a_parameter_without_annotation_takes_anything() -> None:
    assert tool("untyped").spec.parameters["properties"]["value"] == {"title": "Value"}


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("variadic", "parameter 'names' is variadic positional; a tool takes named parameters"),
        ("NOT_A_FUNCTION", "is not a function"),
        ("missing", "is not a function"),
    ],
)
def test_a_function_that_cannot_be_a_tool_is_refused_at_start_up(
    function: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        tool(function)


def test_a_module_that_cannot_be_imported_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="'no_such_module:f' cannot be imported"):
        PythonTool.load(FunctionTool(entrypoint="no_such_module:f"))


async def test_a_plain_function_runs_on_a_thread_with_validated_and_coerced_arguments() -> None:
    result = await box(tool("forecast")).call(call("forecast"), {"city": "Oslo", "days": "2"})
    assert not result.is_error
    answer = json.loads(result.content)
    assert answer["city"] == "Oslo"
    assert answer["days"] == 2
    assert answer["unit"] == "C"
    assert answer["thread"] != "MainThread"


async def test_an_async_function_runs_on_the_loop_and_a_model_result_becomes_json() -> None:
    tools = box(tool("geocode"))
    result = await tools.call(call("geocode"), {"address": {"city": "bergen"}})
    assert json.loads(result.content) == {"city": "Bergen", "zip": None}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "city: Field required"),
        ({"city": "Oslo", "days": "many"}, "days: Input should be a valid integer"),
        ({"city": "Oslo", "unit": "K"}, "unit: Input should be 'C' or 'F'"),
        ({"city": "Oslo", "wind": True}, "wind: Extra inputs are not permitted"),
    ],
)
async def test_arguments_that_do_not_fit_are_an_error_the_model_can_read(
    arguments: dict[str, Any], message: str
) -> None:
    result = await box(tool("forecast")).call(call("forecast"), arguments)
    assert result.is_error
    assert message in result.content


@pytest.mark.parametrize("function", ["sleepy", "sleepy_async"])
async def test_a_call_past_its_timeout_is_an_error(function: str) -> None:
    tools = box(tool(function, timeout=timedelta(milliseconds=200)))
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await tools.call(call(function), {"seconds": 2})
    assert loop.time() - started < 1.5
    assert result.is_error
    assert "did not return within 0.2s" in result.content


@pytest.mark.parametrize(
    ("function", "arguments", "message"),
    [
        ("broken", {"reason": "disk full"}, "broken raised RuntimeError: disk full"),
        ("exits", {}, "exits raised SystemExit: 3"),
    ],
)
async def test_what_a_function_raises_is_an_error_result_not_a_crash(
    function: str, arguments: dict[str, Any], message: str
) -> None:
    result = await box(tool(function)).call(call(function), arguments)
    assert result.is_error
    assert message in result.content


async def test_an_unknown_tool_is_an_error() -> None:
    result = await box(tool("forecast")).call(call("weather"), {})
    assert result.is_error


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
TOOLS = box(tool("forecast"), tool("geocode"), tool("untyped"))


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(["forecast", "geocode", "untyped", "nope"]), arguments=JSON)
def test_arbitrary_arguments_never_crash_a_call(name: str, arguments: Any) -> None:
    result = asyncio.run(TOOLS.call(call(name), arguments))
    assert isinstance(result.content, str)
