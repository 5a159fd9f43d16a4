"""A2A messages to a target's input, and Troupe tasks to A2A tasks and stream events: pure.

**A message to an input.** A Troupe target takes one JSON value, its contract's input:
- one data part: its value is the input, as is (whole numbers, which protobuf's ``Value``
  holds as doubles, are given back as integers up to 2^53); text parts beside it are
  ignored (clients add a caption). Two data parts or more: refused, the input is one value.
- no data part: the text parts, joined by a newline, are the text. It is the input as a
  string, unless the schema says the input is not a string (a ``type`` without
  ``string``, or ``properties`` and no ``type``): then the text is parsed as JSON, and a
  text that is no JSON, for an object schema with exactly one string property (the one
  required, or the only one), is that property (``{"text": "hello"}`` from ``hello``), so
  the plain text every A2A client sends reaches the common ``{text}`` contract. Anything
  else is refused (``InvalidParamsError``) with what to send instead.
- a file part (raw bytes or a URL): refused (``ContentTypeNotSupportedError``).

**A task.** Id, context id, state (A2A's spelling is Troupe's), the timestamp of the last
change; the history is the one user message the task was made of (its id = the task id,
its data part the input); a completed task's output is the artifact ``output``: a text part
when it is a string, else a data part. A failed task's status message says the error, and
its reason is in the status message's metadata (``reason``). A Workflow run, or an LLM
agent's tool call, waiting for approval is ``input-required`` (not terminal: it goes on once
a person decides, and may be cancelled); its status message says what the approvers are
asked, and the pending Approvals' names are in its metadata (``approvals``).

**A stream.** Token text is appended to the artifact ``output`` as it comes; the final
output then replaces it (``append`` false, ``last_chunk`` true), so a client folding the
events ends with what GetTask says. A run's step events are ``working`` status updates
whose message carries the event as a data part.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

from a2a.helpers.proto_helpers import get_data_parts, new_data_part
from a2a.types.a2a_pb2 import (
    Artifact,
    Message,
    Part,
    Role,
    Task,
    TaskArtifactUpdateEvent,
    TaskStatus,
    TaskStatusUpdateEvent,
)
from a2a.types.a2a_pb2 import TaskState as A2ATaskState
from a2a.utils.errors import ContentTypeNotSupportedError, InvalidParamsError

from troupe_gateway.calls import Delta, TaskView
from troupe_runtime.contract.gateway import TaskState

OUTPUT_ARTIFACT: Final = "output"
JSON_MEDIA_TYPE: Final = "application/json"
TEXT_MEDIA_TYPE: Final = "text/plain"
SAFE_INTEGER: Final = 2**53
STATES: Final[dict[TaskState, A2ATaskState]] = {
    "submitted": A2ATaskState.TASK_STATE_SUBMITTED,
    "working": A2ATaskState.TASK_STATE_WORKING,
    "input-required": A2ATaskState.TASK_STATE_INPUT_REQUIRED,
    "completed": A2ATaskState.TASK_STATE_COMPLETED,
    "failed": A2ATaskState.TASK_STATE_FAILED,
    "canceled": A2ATaskState.TASK_STATE_CANCELED,
    "rejected": A2ATaskState.TASK_STATE_REJECTED,
}
TROUPE_STATES: Final = {value: key for key, value in STATES.items()}


def _narrowed(value: Any) -> Any:
    """Whole doubles back to integers: protobuf's ``Value`` has no integers."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= SAFE_INTEGER:
        return int(value)
    if isinstance(value, dict):
        return {key: _narrowed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_narrowed(item) for item in value]
    return value


def _types(schema: dict[str, Any]) -> set[str]:
    declared = schema.get("type")
    if isinstance(declared, str):
        return {declared}
    if isinstance(declared, list):
        return {item for item in declared if isinstance(item, str)}
    return {"object"} if isinstance(schema.get("properties"), dict) else set()


def _only_string_property(schema: dict[str, Any]) -> str | None:
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return None
    required = schema.get("required")
    names = required if isinstance(required, list) and required else list(properties)
    if len(names) != 1 or not isinstance(names[0], str):
        return None
    spec = properties.get(names[0])
    return names[0] if isinstance(spec, dict) and spec.get("type") == "string" else None


def text_input(text: str, schema: dict[str, Any] | None) -> Any:
    """The input a text part makes for ``schema`` (see the module's docstring)."""
    types = _types(schema) if isinstance(schema, dict) else set()
    if not types or "string" in types:
        return text
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    wrapped = _only_string_property(schema) if schema is not None and "object" in types else None
    if wrapped is not None:
        return {wrapped: text}
    wanted = " or ".join(sorted(types))
    raise InvalidParamsError(
        message=f"the input schema wants {wanted}, and the text is no JSON: "
        "send a data part, or the input as JSON text"
    )


def message_input(message: Message, schema: dict[str, Any] | None) -> Any:
    """The input a message makes (see the module's docstring)."""
    parts: Sequence[Part] = message.parts
    if any(part.HasField("raw") or part.HasField("url") for part in parts):
        raise ContentTypeNotSupportedError(
            message="a Troupe target takes JSON: send a data part or text, not a file"
        )
    data = [part for part in parts if part.HasField("data")]
    if len(data) > 1:
        raise InvalidParamsError(
            message=f"{len(data)} data parts: a Troupe target takes one input, one data part"
        )
    if data:
        return _narrowed(get_data_parts(data)[0])
    texts = [part.text for part in parts if part.HasField("text")]
    if not texts:
        raise InvalidParamsError(message="the message has no data part and no text")
    return text_input("\n".join(texts), schema)


def _when(when: datetime | None) -> datetime:
    return (when or datetime.now(UTC)).astimezone(UTC)


def output_parts(output: Any) -> list[Part]:
    """A string as a text part, anything else as a data part (its JSON text if protobuf
    cannot hold it)."""
    if isinstance(output, str):
        return [Part(text=output, media_type=TEXT_MEDIA_TYPE)]
    try:
        return [new_data_part(output, JSON_MEDIA_TYPE)]
    except Exception:  # protobuf's ParseError (no stubs), a number it cannot hold, depth
        return [Part(text=json.dumps(output, default=str), media_type=JSON_MEDIA_TYPE)]


def _status_message(view: TaskView) -> Message | None:
    if view.state == "input-required" and view.prompt:
        return _input_required_message(view, view.prompt)
    if view.state not in ("failed", "rejected", "canceled") or not (view.error or view.reason):
        return None
    message = Message(
        message_id=f"{view.record.task_id}-status",
        context_id=view.record.context_id,
        task_id=view.record.task_id,
        role=Role.ROLE_AGENT,
        parts=[Part(text=view.error or view.reason or view.state)],
    )
    if view.reason:
        message.metadata.update({"reason": view.reason})
    return message


def _input_required_message(view: TaskView, prompt: str) -> Message:
    """What a run waiting for approval asks, with the Approvals' names in the metadata
    (``approvals``), so a client can point the person at ``troupe approve``."""
    message = Message(
        message_id=f"{view.record.task_id}-status",
        context_id=view.record.context_id,
        task_id=view.record.task_id,
        role=Role.ROLE_AGENT,
        parts=[Part(text=prompt)],
    )
    message.metadata.update({"approvals": list(view.approvals)})
    return message


def status(view: TaskView) -> TaskStatus:
    status = TaskStatus(
        state=STATES[view.state], timestamp=_when(view.updated_at or view.record.created_at)
    )
    message = _status_message(view)
    if message is not None:
        status.message.CopyFrom(message)
    return status


def input_message(view: TaskView) -> Message:
    """The user message the task was made of, as GetTask's history shows it."""
    return Message(
        message_id=view.record.task_id,
        context_id=view.record.context_id,
        task_id=view.record.task_id,
        role=Role.ROLE_USER,
        parts=output_parts(view.record.input),
    )


def output_artifact(view: TaskView) -> Artifact:
    return Artifact(
        artifact_id=OUTPUT_ARTIFACT, name=OUTPUT_ARTIFACT, parts=output_parts(view.output)
    )


def task(view: TaskView, *, history: bool = True) -> Task:
    """The A2A task of a Troupe task as it is now."""
    made = Task(id=view.record.task_id, context_id=view.record.context_id, status=status(view))
    if history:
        made.history.append(input_message(view))
    if view.state == "completed":
        made.artifacts.append(output_artifact(view))
    return made


def status_update(view: TaskView) -> TaskStatusUpdateEvent:
    return TaskStatusUpdateEvent(
        task_id=view.record.task_id, context_id=view.record.context_id, status=status(view)
    )


def delta_events(
    view: TaskView, delta: Delta, *, appended: bool, sequence: int
) -> list[TaskArtifactUpdateEvent | TaskStatusUpdateEvent]:
    """The events of the ``sequence``-th delta; ``appended``: earlier text went into the
    artifact already."""
    events: list[TaskArtifactUpdateEvent | TaskStatusUpdateEvent] = []
    task_id, context_id = view.record.task_id, view.record.context_id
    if delta.text:
        events.append(
            TaskArtifactUpdateEvent(
                task_id=task_id,
                context_id=context_id,
                artifact=Artifact(
                    artifact_id=OUTPUT_ARTIFACT,
                    name=OUTPUT_ARTIFACT,
                    parts=[Part(text=delta.text, media_type=TEXT_MEDIA_TYPE)],
                ),
                append=appended,
                last_chunk=False,
            )
        )
    if delta.event:
        working = TaskStatus(state=A2ATaskState.TASK_STATE_WORKING, timestamp=_when(None))
        working.message.CopyFrom(
            Message(
                message_id=f"{task_id}-event-{sequence}",
                context_id=context_id,
                task_id=task_id,
                role=Role.ROLE_AGENT,
                parts=output_parts(delta.event),
            )
        )
        events.append(TaskStatusUpdateEvent(task_id=task_id, context_id=context_id, status=working))
    return events


def final_events(view: TaskView) -> list[TaskArtifactUpdateEvent | TaskStatusUpdateEvent]:
    """The end of a stream: the whole output (replacing the streamed text), then the state."""
    events: list[TaskArtifactUpdateEvent | TaskStatusUpdateEvent] = []
    if view.state == "completed":
        events.append(
            TaskArtifactUpdateEvent(
                task_id=view.record.task_id,
                context_id=view.record.context_id,
                artifact=output_artifact(view),
                append=False,
                last_chunk=True,
            )
        )
    events.append(status_update(view))
    return events
