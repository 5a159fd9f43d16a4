"""Each Agent and Workflow as an MCP tool, and a task as a tool's result: pure, no I/O.

**Tool names.** ``agent_<name>`` and ``workflow_<name>``: Agents and Workflows may share a
name, so the kind is part of it; an object's name is a DNS label (``[a-z0-9-]``, never
``_``), so the first ``_`` ends the kind, and every tool name fits what MCP allows
(``[A-Za-z0-9_.-]``, 1 to 128) and what model APIs take as a function name
(``^[a-zA-Z0-9_-]{1,64}$``, the runtime's ``TOOL_NAME_PATTERN``). A name too long for 64
(an Agent's over 58 characters, a Workflow's over 55) is cut and ends ``_<8 hex of its
SHA-256>``: a second ``_``, which no direct name has, so the two forms never collide; such a
tool is found by comparing the directory's tool names (``ToolTarget.name`` is None).

**Input.** A tool's ``inputSchema`` must be an object schema. A contract whose input schema
has ``type: object`` is the tool's ``inputSchema`` unchanged; none (any JSON) is
``{"type": "object"}`` and the arguments are the input; any other schema (a string, an
array, a union) is wrapped as the one required property ``input`` of an object that allows
no other, and the call's input is ``arguments["input"]``. A wrapped schema that uses
``$ref`` gets an ``$id`` (unless it has one), so its ``#...`` references still resolve
against it, not against the wrapper.

**Output.** An object output schema is the tool's ``outputSchema`` and the output its
``structuredContent``; any other output schema is wrapped the same way as ``output``
(``structuredContent`` ``{"output": ...}``); without one, an object output is the structured
content as is and anything else is wrapped. The text content is the output itself when it
is a string, else its JSON. A failed, canceled or rejected task is an error result
(``isError``) naming the error and its reason; a task still going when the wait ends is an
error result too, with its id and where to read it later (``GET`` on the plain endpoint).
Every result's ``_meta`` carries the task id, the context id and the state.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from mcp_types import CallToolResult, TextContent, Tool, ToolAnnotations

from troupe_gateway.calls import TaskView
from troupe_runtime.contract import grammar
from troupe_runtime.contract.gateway import DirectoryEntry, TargetKind

TOOL_NAME_MAX: Final = 64
PREFIXES: Final[dict[TargetKind, str]] = {"Agent": "agent_", "Workflow": "workflow_"}
DIGEST_CHARS: Final = 8
INPUT_KEY: Final = "input"
OUTPUT_KEY: Final = "output"
META_PREFIX: Final = "dev.troupe/"
WRAPPED_ID: Final = "urn:troupe:schema:"
TOO_DEEP: Final = "<nested too deeply to print>"
TERMINAL_FAILURES: Final = ("failed", "canceled", "rejected")

_LABEL = re.compile(grammar.DNS_LABEL_PATTERN)
_DIRECT = re.compile(r"^(agent|workflow)_([a-z0-9]([-a-z0-9]*[a-z0-9])?)$")
_DIGESTED = re.compile(rf"^(agent|workflow)_[-a-z0-9]*_[0-9a-f]{{{DIGEST_CHARS}}}$")
_KINDS: Final[dict[str, TargetKind]] = {"agent": "Agent", "workflow": "Workflow"}


@dataclass(frozen=True)
class ToolTarget:
    """What a tool name calls: the object's name, or None for a cut name (look it up)."""

    kind: TargetKind
    name: str | None


def tool_name(kind: TargetKind, name: str) -> str:
    direct = PREFIXES[kind] + name
    if len(direct) <= TOOL_NAME_MAX:
        return direct
    digest = hashlib.sha256(name.encode()).hexdigest()[:DIGEST_CHARS]
    room = TOOL_NAME_MAX - len(PREFIXES[kind]) - 1 - DIGEST_CHARS
    return f"{PREFIXES[kind]}{name[:room]}_{digest}"


def parse_tool_name(tool: str) -> ToolTarget | None:
    """None for a name no Agent or Workflow can have."""
    if len(tool) > TOOL_NAME_MAX:
        return None
    direct = _DIRECT.match(tool)
    if direct is not None:
        return ToolTarget(_KINDS[direct.group(1)], direct.group(2))
    digested = _DIGESTED.match(tool)
    if digested is not None and len(tool) == TOOL_NAME_MAX:
        return ToolTarget(_KINDS[digested.group(1)], None)
    return None


def is_tool_name(entry: DirectoryEntry, tool: str) -> bool:
    return tool == tool_name(entry.kind, entry.name)


def is_object_schema(schema: Mapping[str, Any] | None) -> bool:
    return schema is not None and schema.get("type") == "object"


def _uses_ref(schema: Any) -> bool:
    """Whether ``$ref`` appears anywhere; iterative, so no nesting depth can overflow."""
    pending = [schema]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            if "$ref" in node:
                return True
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return False


def wrap_schema(schema: Mapping[str, Any], key: str) -> dict[str, Any]:
    """``schema`` as the one required property ``key`` of an object."""
    inner = dict(schema)
    if "$id" not in inner and _uses_ref(inner):
        inner["$id"] = WRAPPED_ID + key
    return {
        "type": "object",
        "properties": {key: inner},
        "required": [key],
        "additionalProperties": False,
    }


def input_schema(entry: DirectoryEntry) -> dict[str, Any]:
    if entry.input_schema is None:
        return {"type": "object"}
    if is_object_schema(entry.input_schema):
        return dict(entry.input_schema)
    return wrap_schema(entry.input_schema, INPUT_KEY)


def output_schema(entry: DirectoryEntry) -> dict[str, Any] | None:
    if entry.output_schema is None:
        return None
    if is_object_schema(entry.output_schema):
        return dict(entry.output_schema)
    return wrap_schema(entry.output_schema, OUTPUT_KEY)


class BadArguments(ValueError):
    """The arguments do not carry an input (a wrapped schema's ``input`` missing, or more)."""


def call_input(entry: DirectoryEntry, arguments: Mapping[str, Any] | None) -> Any:
    """The input to send for a call's ``arguments``; the schema itself is checked by
    ``Calls.submit``."""
    given = dict(arguments or {})
    if entry.input_schema is None or is_object_schema(entry.input_schema):
        return given
    extra = sorted(set(given) - {INPUT_KEY})
    if extra:
        raise BadArguments(
            f"{entry.kind} {entry.name} takes one argument, {INPUT_KEY!r}; "
            f"remove {', '.join(repr(name[:64]) for name in extra[:5])}"
        )
    if INPUT_KEY not in given:
        raise BadArguments(f"{entry.kind} {entry.name} takes its input as argument {INPUT_KEY!r}")
    return given[INPUT_KEY]


def tool_for(entry: DirectoryEntry) -> Tool | None:
    """None for an entry whose name no object can have (the bucket is not only the
    operator's to write): it is not offered."""
    if not _LABEL.match(entry.name) or len(entry.name) > grammar.DNS_LABEL_MAX:
        return None
    return Tool(
        name=tool_name(entry.kind, entry.name),
        title=f"{entry.kind} {entry.name}",
        description=entry.description
        or f"Calls the Troupe {entry.kind} {entry.name} in namespace {entry.namespace}.",
        input_schema=input_schema(entry),
        output_schema=output_schema(entry),
        annotations=ToolAnnotations(
            title=f"{entry.kind} {entry.name}",
            # A call sends a message or starts a run; each call is a new task.
            read_only_hint=False,
            idempotent_hint=False,
            open_world_hint=True,
        ),
        _meta={
            f"{META_PREFIX}kind": entry.kind,
            f"{META_PREFIX}name": entry.name,
            f"{META_PREFIX}ready": entry.ready,
        },
    )


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except RecursionError:
        return TOO_DEEP
    except (TypeError, ValueError):
        return repr(value)


def structured_output(entry: DirectoryEntry, output: Any) -> Any:
    if entry.output_schema is None:
        return output if isinstance(output, dict) else {OUTPUT_KEY: output}
    if is_object_schema(entry.output_schema):
        return output
    return {OUTPUT_KEY: output}


def task_path(entry: DirectoryEntry, task_id: str) -> str:
    """Where the plain endpoint reads the task (``GET``)."""
    group = "agents" if entry.kind == "Agent" else "workflows"
    return f"/v1/namespaces/{entry.namespace}/{group}/{entry.name}/tasks/{task_id}"


def _meta(view: TaskView) -> dict[str, Any]:
    meta: dict[str, Any] = {
        f"{META_PREFIX}taskId": view.record.task_id,
        f"{META_PREFIX}contextId": view.record.context_id,
        f"{META_PREFIX}state": view.state,
    }
    if view.reason is not None:
        meta[f"{META_PREFIX}reason"] = view.reason
    return meta


def _error(text: str, meta: dict[str, Any] | None = None) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text)], is_error=True, _meta=meta)


def task_result(entry: DirectoryEntry, view: TaskView, waited: float) -> CallToolResult:
    """The tool's answer for ``view``, the task as it was after waiting ``waited`` seconds."""
    if view.state == "completed":
        return CallToolResult(
            content=[TextContent(type="text", text=_text(view.output))],
            structured_content=structured_output(entry, view.output),
            _meta=_meta(view),
        )
    task_id = view.record.task_id
    if view.state in TERMINAL_FAILURES:
        why = view.error or "no error given"
        reason = f" ({view.reason})" if view.reason else ""
        return _error(f"{entry.kind} {entry.name} {view.state}: {why}{reason}", _meta(view))
    return _error(
        f"{entry.kind} {entry.name} is still {view.state} after {waited:g}s (task {task_id}); "
        f"the task goes on: read it with GET {task_path(entry, task_id)}",
        _meta(view),
    )


def refused_input(entry: DirectoryEntry, reason: str) -> CallToolResult:
    """An input the contract refuses: an error result, so a model can correct its call."""
    return _error(f"{entry.kind} {entry.name} refused the input: {reason}")


def not_started(entry: DirectoryEntry, reason: str) -> CallToolResult:
    """A call NATS did not take (``Calls.submit``'s 503): nothing ran, the caller may retry."""
    return _error(f"{entry.kind} {entry.name} was not called: {reason}; try again")
