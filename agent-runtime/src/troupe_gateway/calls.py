"""A call to an Agent or a Workflow, as a task: what every front end of the gateway shares.

An Agent's task is one CloudEvent to its inbox (id = task id, ``replyto`` =
``naming.gateway_reply_subject``, ``Nats-Msg-Id`` = task id); its answer is read from the
namespace's event log. A Workflow's task is a run (run id = task id) started on its start
subject; its state is the run's projection and its outcome the results subject. The
``TaskRecord`` is filed in ``naming.tasks_bucket`` before anything is published, with
``create`` semantics, so the same task id twice is the same task (idempotent submit).

STUB (issue 14): signatures agreed in /work/issue14-common.md; helper G1 implements.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from troupe_runtime.contract.gateway import DirectoryEntry, TaskRecord, TaskState


@dataclass(frozen=True)
class TaskView:
    """A task as any replica sees it now."""

    record: TaskRecord
    state: TaskState
    output: Any = None
    """The Agent's reply data or the run's output, once completed (or BudgetExceeded)."""
    error: str | None = None
    reason: str | None = None
    """A failure's machine-readable reason (a dead-letter reason, ``budget-exceeded``)."""
    updated_at: datetime | None = None

    @property
    def terminal(self) -> bool:
        return self.state in ("completed", "failed", "canceled", "rejected")


@dataclass(frozen=True)
class Delta:
    """One piece of a streamed answer: token text from an LLM agent, or a run's step event."""

    text: str = ""
    event: dict[str, Any] = field(default_factory=dict)


class CallRefused(Exception):
    """The call cannot be made; ``status`` is the HTTP status a front end answers with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Calls:
    """Tasks on NATS; one instance per gateway process, shared by every front end."""

    async def submit(
        self,
        entry: DirectoryEntry,
        data: Any,
        *,
        caller: str,
        task_id: str | None = None,
        context_id: str | None = None,
    ) -> TaskRecord:
        """File the record and publish the call; the same ``task_id`` again returns the first
        record and publishes nothing new. Raises ``CallRefused`` (400 for input its schema
        refuses, 409 for a task id of another target, 503 when NATS does not store it)."""
        raise NotImplementedError

    async def get(self, entry: DirectoryEntry, task_id: str) -> TaskView | None:
        raise NotImplementedError

    async def wait(self, entry: DirectoryEntry, task_id: str, within: float) -> TaskView:
        """The task once terminal, or as it is when ``within`` seconds pass."""
        raise NotImplementedError

    async def list(
        self, entry: DirectoryEntry, *, context_id: str | None = None, limit: int = 100
    ) -> list[TaskView]:
        """Newest first."""
        raise NotImplementedError

    async def cancel(self, entry: DirectoryEntry, task_id: str) -> TaskView:
        """A Workflow run is cancelled (the engine ends it ``Cancelled``); an Agent's message
        cannot be recalled once sent: ``CallRefused(409)`` unless already terminal."""
        raise NotImplementedError

    def stream(self, entry: DirectoryEntry, task_id: str) -> AsyncIterator[Delta | TaskView]:
        """Deltas as they come, then the terminal ``TaskView``; subscribe before submit."""
        raise NotImplementedError
