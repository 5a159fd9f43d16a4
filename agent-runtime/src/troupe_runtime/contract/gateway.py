"""What the operator tells the gateway, and what the gateway keeps: one shared contract.

The operator writes one ``DirectoryEntry`` per Agent and per Workflow into the namespace's
directory bucket (``naming.directory_bucket``, key ``naming.directory_key``). The gateway
reads it to route a call and to build the A2A agent card and the MCP tool: it never reads
Agent or Workflow objects, so it needs no RBAC on them and sees exactly what the operator
resolved (the inbox subject, the contract's schemas).

A call through the gateway is a *task*. Its id is Troupe's own: the event id of the message
sent to an Agent, or the run id of a Workflow run. The gateway files a ``TaskRecord`` in the
namespace's task bucket (``naming.tasks_bucket``) before it publishes, so any replica can
answer GetTask and ListTasks, and a replica killed mid-call loses nothing: an Agent's answer
is stored on ``naming.gateway_reply_subject`` (a subject of the namespace's event log) and a
run's outcome in the Workflow's stream and runs bucket.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any, Literal

from nats.js.api import Header
from pydantic import Field

from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.policies import WireModel

TargetKind = Literal["Agent", "Workflow"]

GATEWAY_SOURCE = "/troupe-gateway"
"""The CloudEvent ``source`` of everything the gateway publishes."""
CALL_TYPE = "troupe.gateway.call"
"""The type of the event the gateway sends to an Agent (a Workflow run's start keeps
``troupe.workflow.start``)."""
START_TYPE = "troupe.workflow.start"
"""The type of the event that starts a Workflow run."""
INVOKE_VERB = "invoke"
"""The virtual verb a SubjectAccessReview asks about: ``invoke`` on ``agents`` or
``workflows`` (group ``troupe.dev``) with the object's name, so RBAC decides who may call."""


class DirectoryEntry(WireModel):
    """One Agent or Workflow as the gateway sees it (written by the operator)."""

    kind: TargetKind
    namespace: str
    name: str
    description: str = ""
    """The Agent's role and description, or the Workflow's description."""
    input_schema: dict[str, Any] | None = None
    """The contract's input schema (a Workflow: its runs' input); None: any JSON."""
    output_schema: dict[str, Any] | None = None
    subject: str
    """Where a call is published: an Agent's inbox at priority 0, or a Workflow's start
    subject pattern with ``*`` for the run id (``naming.workflow_subject(.., "start")``)."""
    streaming: bool = False
    """An LLM agent that streams its answer's tokens (``naming.token_stream_subject``)."""
    ready: bool = False
    """The object's Ready condition when the entry was written."""
    generation: int = 0
    """``metadata.generation``: the card's version."""


TaskState = Literal[
    "submitted", "working", "input-required", "completed", "failed", "canceled", "rejected"
]
"""A2A's task states that Troupe reaches, in A2A's spelling."""


class TaskRecord(WireModel):
    """What the gateway files for each task before it publishes the call."""

    task_id: str
    kind: TargetKind
    name: str
    context_id: str
    """A2A's contextId: the caller's, or the correlation id Troupe gives the call."""
    created_at: datetime
    caller: str = Field(default="", max_length=512)
    """Who called (a Kubernetes user name), for ListTasks and audit; never a credential."""
    input: Any = None
    """The data sent: what GetTask shows as the task's history."""
    cancel_requested_at: datetime | None = None


def caller_session(caller: str, context_id: str) -> str:
    """The ``sessionid`` of a gateway call: the caller's context, as a digest of who called
    and the context id. A context id is the caller's to choose (``conv-1``), so two callers
    choosing the same one must not share a conversation, nor one read another's by
    guessing it; the digest fits the envelope's session id whatever the two hold."""
    digest = hashlib.sha256(f"{caller}\n{context_id}".encode()).hexdigest()
    return f"gw-{digest[:48]}"


def call_message(entry: DirectoryEntry, record: TaskRecord) -> tuple[str, dict[str, str], bytes]:
    """The subject, headers and payload that carry ``record`` to ``entry``: an event on the
    Agent's inbox answered on ``naming.gateway_reply_subject``, or a Workflow run's start.

    Shared by the gateway and the operator's cron (both file the record first); the message
    id is the task id, so a publish repeated after a crash is one message. An Agent's event
    carries the caller's context as its ``sessionid`` too (``caller_session``): A2A's
    contextId is the session (an Agent with ``spec.llm.session`` remembers the context's
    earlier tasks of the same caller; any other ignores it).
    """
    if entry.kind == "Agent":
        subject = entry.subject
        event = CloudEvent(
            id=record.task_id,
            source=GATEWAY_SOURCE,
            type=CALL_TYPE,
            datacontenttype=envelope.JSON_CONTENT_TYPE,
            correlationid=record.context_id,
            replyto=naming.gateway_reply_subject(entry.namespace, record.task_id),
            sessionid=caller_session(record.caller, record.context_id),
            data=record.input,
        )
    else:
        subject = naming.workflow_subject(entry.namespace, entry.name, "start", record.task_id)
        event = CloudEvent(
            id=record.task_id,
            source=GATEWAY_SOURCE,
            type=START_TYPE,
            datacontenttype=envelope.JSON_CONTENT_TYPE,
            data=record.input,
        )
    headers, payload = envelope.to_binary(event)
    headers[Header.MSG_ID.value] = record.task_id
    return subject, headers, payload
