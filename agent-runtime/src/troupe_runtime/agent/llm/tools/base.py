"""What every kind of tool shares: hostile schemas made safe, arguments checked, results capped.

A tool's parameters schema comes from outside the agent (an MCP server, another Agent's
contract, a function's signature) and goes to the model; the model's arguments come back.
Both are untrusted: a schema is kept only if it is a bounded JSON object schema the
runtime's linear-time validator accepts, and arguments are validated against it before a
tool runs, so a malformed call costs the model one error result, never the message.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from jsonschema.exceptions import best_match
from jsonschema.protocols import Validator

from troupe_runtime.agent.llm.types import ToolResult
from troupe_runtime.agent.schemas import compile_schema
from troupe_runtime.contract.envelope import json_problem

T = TypeVar("T")

MAX_RESULT_BYTES = 1024 * 1024
"""A tool's answer is cut here before it reaches the loop (which offloads above
``history.maxToolResultBytes``): 1 MiB, the NATS payload limit, so a journal record of it
can always be stored."""
MAX_SCHEMA_BYTES = 64 * 1024
"""A parameters schema larger than this is refused: it goes into every model request."""
MAX_DESCRIPTION_CHARS = 4096
MAX_REASON_CHARS = 1000


class ToolNameClash(ValueError):
    """Two tools of one agent answer to the same name: the model could not tell them apart."""


def unique(tools: Iterable[T], name: Callable[[T], str], kind: str) -> dict[str, T]:
    """``tools`` by name; ``ToolNameClash`` when two of spec.llm.tools.<kind> share one."""
    named: dict[str, T] = {}
    for tool in tools:
        if name(tool) in named:
            raise ToolNameClash(
                f"two entries of spec.llm.tools.{kind} are named {name(tool)!r}; set name on one"
            )
        named[name(tool)] = tool
    return named


def shortened(text: str, limit: int = MAX_REASON_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def capped(text: str, limit: int = MAX_RESULT_BYTES) -> str:
    """``text`` cut to ``limit`` UTF-8 bytes (on a character boundary), saying how much was cut."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    kept = data[:limit].decode("utf-8", "ignore")
    return f"{kept}\n[truncated: {len(data)} bytes, the first {limit} kept]"


def error_result(text: str) -> ToolResult:
    return ToolResult(content=capped(text), is_error=True)


def as_text(value: Any) -> str:
    """A value for the model: strings as they are, anything else as JSON."""
    if isinstance(value, str):
        return value
    if json_problem(value) is not None:
        return repr(value)
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


class Parameters:
    """A tool's parameters schema, checked once, and the validator of its arguments."""

    def __init__(self, schema: dict[str, Any], validator: Validator) -> None:
        self.schema = schema
        self._validator = validator

    def problem(self, arguments: Any) -> str | None:
        """Why the model's ``arguments`` do not fit, or None."""
        if not isinstance(arguments, dict):
            return f"arguments must be a JSON object, not {type(arguments).__name__}"
        if (problem := json_problem(arguments)) is not None:
            return f"arguments {problem}"
        try:
            error = best_match(self._validator.iter_errors(arguments))
        except RecursionError:
            return "arguments nest too deep to validate"
        if error is None:
            return None
        where = "/".join(str(part) for part in error.absolute_path) or "(root)"
        return shortened(f"arguments violate the tool's schema at {where}: {error.message}")


def parameters(schema: Any) -> Parameters | str:
    """The checked parameters of ``schema``, or why it cannot be offered to a model."""
    if not isinstance(schema, dict):
        return f"its input schema is a {type(schema).__name__}, not a JSON object"
    if schema.get("type") != "object":
        return 'its input schema is not an object schema ("type": "object" at the root)'
    if (problem := json_problem(schema)) is not None:
        return f"its input schema {problem}"
    size = len(json.dumps(schema, allow_nan=False).encode())
    if size > MAX_SCHEMA_BYTES:
        return f"its input schema has {size} bytes, more than {MAX_SCHEMA_BYTES}"
    try:
        validator = compile_schema(schema, "inputSchema")
    except ValueError as error:
        return shortened(f"its input schema is refused: {error}")
    assert validator is not None
    return Parameters(schema, validator)


def description(text: str | None, default: str) -> str:
    return shortened(text or default, MAX_DESCRIPTION_CHARS)
