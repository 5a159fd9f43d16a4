"""Python functions from the agent's code as tools (``spec.llm.tools.functions``).

The function's signature is the tool's schema: pydantic builds a model from its parameters
(annotations and defaults) and the model's JSON Schema is what the model sees; the
docstring is the description. Arguments are validated by that model before the function
runs, so the model gets a readable error for a malformed call. A plain function runs on a
thread of its own (``HandlerThreads``: a call past its timeout leaves the thread running,
counted as stuck), an async one on the loop; both under the tool's timeout.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pydantic
import pydantic_core

from troupe_runtime.agent.handlers.python import import_entrypoint
from troupe_runtime.agent.handlers.threads import HandlerThreads
from troupe_runtime.agent.llm.tools.base import (
    MAX_REASON_CHARS,
    as_text,
    capped,
    description,
    error_result,
    parameters,
    shortened,
    unique,
)
from troupe_runtime.agent.llm.types import ToolCall, ToolResult, ToolSpec
from troupe_runtime.contract.llm_policy import FunctionTool


def load_function(entrypoint: str) -> Callable[..., Any]:
    """The function ``module:function`` names; ``ValueError`` saying why it cannot be used."""
    return import_entrypoint(
        entrypoint, "spec.llm.tools.functions entrypoint", not_callable="is not a function"
    )


def arguments_model(fn: Callable[..., Any], entrypoint: str) -> type[pydantic.BaseModel]:
    """A pydantic model of ``fn``'s parameters: what a call's arguments must be."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations (a forward reference): fall back to raw ones
        hints = {}
    fields: dict[str, Any] = {}
    for parameter in inspect.signature(fn).parameters.values():
        if parameter.kind not in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
            raise ValueError(
                f"function tool {entrypoint!r}: parameter {parameter.name!r} is "
                f"{parameter.kind.description}; a tool takes named parameters only"
            )
        annotation = hints.get(parameter.name, parameter.annotation)
        if annotation is inspect.Parameter.empty:
            annotation = Any
        default = ... if parameter.default is inspect.Parameter.empty else parameter.default
        fields[parameter.name] = (annotation, default)
    try:
        model: type[pydantic.BaseModel] = pydantic.create_model(
            f"{fn.__name__}_arguments",
            __config__=pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=False),
            **fields,
        )
        model.model_json_schema()
    except Exception as error:  # pydantic's: a parameter type with no JSON Schema
        raise ValueError(
            f"function tool {entrypoint!r}: its parameters have no JSON Schema: {error}"
        ) from error
    return model


@dataclass(frozen=True)
class PythonTool:
    """One function, its schema, and how long a call may take."""

    spec: ToolSpec
    fn: Callable[..., Any]
    model: type[pydantic.BaseModel]
    timeout: float

    @classmethod
    def load(cls, policy: FunctionTool) -> PythonTool:
        fn = load_function(policy.entrypoint)
        model = arguments_model(fn, policy.entrypoint)
        checked = parameters(model.model_json_schema())
        if isinstance(checked, str):
            raise ValueError(f"function tool {policy.entrypoint!r}: {checked}")
        name = policy.name or fn.__name__
        spec = ToolSpec(
            name=name,
            description=description(inspect.getdoc(fn), f"The function {policy.entrypoint}."),
            parameters=checked.schema,
            idempotent=policy.idempotent,
        )
        return cls(spec, fn, model, policy.timeout.total_seconds())


def _validation_message(error: pydantic.ValidationError) -> str:
    problems = [
        f"{'.'.join(str(part) for part in detail['loc']) or '(root)'}: {detail['msg']}"
        for detail in error.errors(include_url=False, include_input=False)
    ]
    return shortened("; ".join(problems), MAX_REASON_CHARS)


class Escaped(Exception):
    """``SystemExit`` or ``KeyboardInterrupt`` from a tool: asyncio would stop the loop for
    them, so they travel wrapped, to become an error result like any other."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _called(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    try:
        return fn(**kwargs)
    except (SystemExit, KeyboardInterrupt) as error:
        raise Escaped(error) from error


async def _awaited(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    try:
        return await fn(**kwargs)
    except (SystemExit, KeyboardInterrupt) as error:
        raise Escaped(error) from error


class FunctionToolBox:
    """The agent's Python function tools."""

    def __init__(self, tools: list[PythonTool], threads: HandlerThreads) -> None:
        self._tools = unique(tools, lambda tool: tool.spec.name, "functions")
        self._threads = threads

    async def specs(self) -> list[ToolSpec]:
        return [tool.spec for tool in self._tools.values()]

    def has(self, name: str) -> bool:
        return name in self._tools

    async def call(self, call: ToolCall, arguments: dict[str, Any]) -> ToolResult:
        tool = self._tools.get(call.name)
        if tool is None:
            return error_result(f"{call.name!r} is not a tool of this agent")
        raw: object = arguments  # the model's: typed as a dict, not trusted to be one
        if not isinstance(raw, dict):
            return error_result(f"{call.name}: arguments must be a JSON object")
        try:
            validated = tool.model.model_validate(arguments)
        except pydantic.ValidationError as error:
            return error_result(f"{call.name}: invalid arguments: {_validation_message(error)}")
        kwargs = {name: getattr(validated, name) for name in type(validated).model_fields}
        try:
            if inspect.iscoroutinefunction(tool.fn):
                result = await asyncio.wait_for(_awaited(tool.fn, kwargs), tool.timeout)
            else:
                run = functools.partial(_called, tool.fn, kwargs)
                result = await asyncio.wait_for(self._threads.call(run), tool.timeout)
        except TimeoutError:
            return error_result(f"{call.name} did not return within {tool.timeout:g}s")
        except Escaped as escaped:
            raised = escaped.error
            return error_result(f"{call.name} raised {type(raised).__name__}: {raised}")
        except Exception as error:  # the user's function: whatever it raises, the model reads
            return error_result(f"{call.name} raised {type(error).__name__}: {error}")
        try:
            value = pydantic_core.to_jsonable_python(result)
        except pydantic_core.PydanticSerializationError:
            value = repr(result)
        return ToolResult(content=capped(as_text(value)))

    async def aclose(self) -> None:
        return None
