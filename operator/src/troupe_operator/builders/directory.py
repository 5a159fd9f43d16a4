"""Pure planning of the gateway's directory: what the operator lists for an Agent or Workflow.

The gateway never reads Agent or Workflow objects: it routes a call and builds the A2A
card and the MCP tool from the ``DirectoryEntry`` the operator keeps under
``naming.directory_key`` in the namespace's bucket on the operator's NATS (the one the
gateway connects to). An object on another NATS server is not listed: the gateway could
not reach its subjects. The entry is what the spec resolves to (the inbox or start
subject, the contract's schemas) plus the Ready condition; it is written only when the
stored value differs, so an idle pass writes nothing, and a junk value is overwritten.
A pass whose spec has problems converges nothing, so the entry of the last good spec (the
one still being served) stays and only follows Ready.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nats.js.api import KeyValueConfig, StorageType
from pydantic import ValidationError

from troupe_operator.api import AgentSpec, WorkflowSpec
from troupe_operator.api.agent import NatsConnection
from troupe_operator.api.status import Condition
from troupe_operator.builders.status import READY
from troupe_runtime.contract import naming
from troupe_runtime.contract.gateway import DirectoryEntry, TargetKind

DIRECTORY_PREFIXES = (f"{naming.DIRECTORY_AGENTS}.", f"{naming.DIRECTORY_WORKFLOWS}.")
"""The keys the operator owns in a directory bucket (``triggers.`` keys are the
Trigger reconciler's)."""


def bucket_config(namespace: str) -> KeyValueConfig:
    """The namespace's directory bucket: history 1 (an old entry is of no use), file storage
    (a restart of NATS loses nothing), no TTL (an entry lives as long as its object)."""
    return KeyValueConfig(
        bucket=naming.directory_bucket(namespace), history=1, storage=StorageType.FILE
    )


def listed(connection: NatsConnection, operator_url: str) -> bool:
    """Whether an object on ``connection`` is reachable from the gateway: its NATS is the
    operator's (the URL unset or the same)."""
    return connection.url is None or connection.url == operator_url


def agent_description(spec: AgentSpec) -> str:
    """The role, then a blank line and the description when there is one."""
    return f"{spec.role}\n\n{spec.description}" if spec.description else spec.role


def agent_entry(namespace: str, name: str, spec: AgentSpec, generation: int) -> DirectoryEntry:
    """An Agent as the gateway calls it: its inbox at priority 0 and its contract."""
    return DirectoryEntry(
        kind="Agent",
        namespace=namespace,
        name=name,
        description=agent_description(spec),
        input_schema=spec.contract.input_schema,
        output_schema=spec.contract.output_schema,
        subject=naming.inbox_subject(namespace, name, 0),
        streaming=spec.llm is not None and spec.llm.stream,
        generation=generation,
    )


def workflow_entry(
    namespace: str, name: str, spec: WorkflowSpec, generation: int
) -> DirectoryEntry:
    """A Workflow as the gateway starts it: its start subject (``*`` for the run id). A
    Workflow declares no input schema: its runs take any JSON."""
    return DirectoryEntry(
        kind="Workflow",
        namespace=namespace,
        name=name,
        description=spec.description,
        subject=naming.workflow_subject(namespace, name, "start", "*"),
        generation=generation,
    )


@dataclass(frozen=True)
class Listing:
    """What one pass wants of an object's directory key.

    ``entry`` None with ``listed``: keep the stored entry (the last good spec's) and follow
    Ready only. ``listed`` False: the key must be absent."""

    kind: TargetKind
    namespace: str
    name: str
    entry: DirectoryEntry | None = None
    listed: bool = True

    @property
    def key(self) -> str:
        return naming.directory_key(self.kind, self.name)


def is_ready(conditions: Sequence[Condition]) -> bool:
    return any(c.type == READY and c.status == "True" for c in conditions)


def encode(entry: DirectoryEntry) -> bytes:
    # None kept (no exclude_none): it would also drop nulls inside the schemas.
    return entry.model_dump_json(by_alias=True).encode()


def stored_entry(listing: Listing, stored: bytes | None) -> DirectoryEntry | None:
    """The stored value as this object's entry; None when absent, junk, or another
    object's (filed under the wrong key)."""
    if stored is None:
        return None
    try:
        found = DirectoryEntry.model_validate_json(stored)
    except (ValidationError, ValueError):
        return None
    same = (found.kind, found.namespace, found.name) == (
        listing.kind,
        listing.namespace,
        listing.name,
    )
    return found if same else None


def to_write(listing: Listing, stored: bytes | None, ready: bool) -> bytes | None:
    """What to put under the key so it says what ``listing`` wants with Ready ``ready``;
    None when the stored value says it already (or, keeping the stored entry, there is none
    of this object's to keep)."""
    found = stored_entry(listing, stored)
    base = listing.entry if listing.entry is not None else found
    if base is None:
        return None
    wanted = base.model_copy(update={"ready": ready})
    return None if wanted == found else encode(wanted)
