"""A call to an Agent or a Workflow, as a task: what every front end of the gateway shares.

An Agent's task is one CloudEvent to its inbox (id = task id, ``replyto`` =
``naming.gateway_reply_subject``, ``Nats-Msg-Id`` = task id); its answer is read from the
namespace's event log, where it is stored. A Workflow's task is a run (run id = task id)
started on its start subject; its state is the run's projection in the runs bucket, its
outcome the results subject. The ``TaskRecord`` is filed in ``naming.tasks_bucket`` with
``create`` before anything is published, so the same task id twice is the same task and a
replica killed between the two steps is repaired by the caller's retry (the publish is
deduplicated by its ``Nats-Msg-Id``).

The input is not checked against the target's schema here: the Agent's runtime checks it
(with linear-time patterns) and answers a refusal as a failed task with reason
``contract-violation``; a second checker here would be a second truth.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import Header, KeyValueConfig, RawStreamMsg, StorageType
from nats.js.errors import BucketNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.approvals import MAX_MESSAGE_CHARS, REQUEST_TYPE, bounded_text
from troupe_runtime.contract.envelope import ERROR_TYPE, CloudEvent, MalformedMessage
from troupe_runtime.contract.gateway import (
    GATEWAY_SOURCE,
    DirectoryEntry,
    TaskRecord,
    TaskState,
    call_message,
)
from troupe_runtime.contract.run_events import CANCEL_TYPE, RUN_ID_PATTERN
from troupe_runtime.contract.run_state import RunState, pending_approvals
from troupe_runtime.nats.publish import NoStream, publish_stored

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.0
"""How often a waiter reads the state again besides what its subscription brings: a result
published while it subscribed is never missed for longer."""
HEADROOM_BYTES = 4096
"""Room left under the server's payload limit for the call's CloudEvent headers."""
MAX_LISTED = 1000
"""ListTasks reads at most this many records of one target."""
STREAM_BACKLOG = 256
"""Messages a slow stream reader may fall behind by; past it deltas are dropped (anyone may
publish on a token stream subject, so the backlog is bounded; the final view is whole)."""
RUN_STATES: dict[str, TaskState] = {
    "Running": "working",
    "WaitingForApproval": "input-required",
    "Compensating": "working",
    "Succeeded": "completed",
    "BudgetExceeded": "completed",
    "Failed": "failed",
    "Cancelled": "canceled",
}


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
    approvals: tuple[str, ...] = ()
    """An input-required run's pending Approvals (their names): what a person decides."""
    prompt: str | None = None
    """What an input-required task asks: the pending approvals' messages."""

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


@dataclass(frozen=True)
class Submitted:
    """A call filed and published."""

    record: TaskRecord
    new: bool
    """This call filed the record (not a retry of a task filed before): nothing can have
    answered it before its publish."""


class Listener:
    """A subscription to one task's end (``Calls.listening``)."""

    def __init__(
        self, calls: Calls, entry: DirectoryEntry, task_id: str, subscription: Subscription
    ) -> None:
        self._calls = calls
        self._entry = entry
        self._task_id = task_id
        self._subscription = subscription

    async def wait(self, within: float, submitted: Submitted | None = None) -> TaskView:
        """As ``Calls.wait``; given the ``send`` made inside the block, a new task's state
        is known without a read (its record is at hand, its answer not yet sent)."""
        return await self._calls._wait(
            self._entry, self._task_id, self._subscription, within, submitted
        )


def valid_task_id(task_id: str) -> str:
    """A caller's task id, or ``CallRefused(400)``: it becomes a run id and a message id."""
    if not RUN_ID_PATTERN.fullmatch(task_id):
        raise CallRefused(
            400, "a task id is 1 to 200 characters of letters, digits, '-', '_' and '='"
        )
    return task_id


def agent_view(record: TaskRecord, reply: CloudEvent | None) -> TaskView:
    """An Agent's task from its reply (pure): none yet is working; an LLM agent's call that
    waits for an Approval (``approvals.REQUEST_TYPE``, sent before the answer) is
    input-required, naming it and what it asks."""
    if reply is None:
        return TaskView(record, "working")
    updated = reply.time
    if reply.type == REQUEST_TYPE:
        data = reply.data if isinstance(reply.data, dict) else {}
        name = bounded_text(str(data.get("approval") or ""), 63)
        tool = bounded_text(str(data.get("tool") or ""), 64)
        asks = bounded_text(str(data.get("message") or ""), MAX_MESSAGE_CHARS)
        prompt = f"approval {name} (tool {tool})" + (f": {asks}" if asks else "")
        return TaskView(
            record,
            "input-required",
            approvals=(name,) if name else (),
            prompt=prompt,
            updated_at=updated,
        )
    if reply.type == ERROR_TYPE:
        data = reply.data if isinstance(reply.data, dict) else {"error": reply.data}
        error, reason = data.get("error"), data.get("reason")
        return TaskView(
            record,
            "failed",
            error=str(error)[:2000] if error is not None else "the agent failed",
            reason=str(reason)[:200] if reason is not None else None,
            updated_at=updated,
        )
    data = reply.data
    if isinstance(data, bytes):
        data = {"contentType": reply.datacontenttype, "bytes": len(data)}
    return TaskView(record, "completed", output=data, updated_at=updated)


def run_view(record: TaskRecord, run: RunState | None) -> TaskView:
    """A Workflow's task from its run's projection (pure)."""
    if run is None:
        return TaskView(record, "submitted")
    state = RUN_STATES.get(run.status, "working")
    reason = "budget-exceeded" if run.status == "BudgetExceeded" else None
    error = run.error
    if state == "failed" and error is None:
        failed = [step.error for step in run.steps.values() if step.error]
        error = failed[-1] if failed else "the run failed"
    pending = pending_approvals(run) if state == "input-required" else {}
    prompt = "; ".join(
        f"approval {a.name} (step {step}): {a.message}" if a.message else f"approval {a.name}"
        for step, a in pending.items()
    )
    return TaskView(
        record,
        state,
        output=run.output,
        error=error,
        reason=reason,
        updated_at=run.finished_at,
        approvals=tuple(a.name for a in pending.values()),
        prompt=prompt or None,
    )


class Calls:
    """Tasks on NATS; one instance per gateway process, shared by every front end."""

    def __init__(self, nc: NATS, js: JetStreamContext, task_ttl_seconds: float) -> None:
        self._nc = nc
        self._js = js
        self._ttl = task_ttl_seconds
        self._tasks: dict[str, KeyValue] = {}
        self._runs: dict[tuple[str, str], KeyValue] = {}

    async def _bucket(self, namespace: str) -> KeyValue:
        if (kv := self._tasks.get(namespace)) is not None:
            return kv
        bucket = naming.tasks_bucket(namespace)
        try:
            kv = await self._js.key_value(bucket)
        except BucketNotFoundError:
            kv = await self._js.create_key_value(
                KeyValueConfig(
                    bucket=bucket,
                    history=1,
                    storage=StorageType.FILE,
                    ttl=self._ttl,
                    description=f"The gateway's tasks in namespace {namespace}",
                )
            )
        self._tasks[namespace] = kv
        return kv

    async def _record(self, entry: DirectoryEntry, task_id: str) -> TaskRecord | None:
        kv = await self._bucket(entry.namespace)
        try:
            stored = await kv.get(naming.task_key(entry.kind, entry.name, task_id))
        except NotFoundError:
            return None
        try:
            record = TaskRecord.model_validate_json(stored.value or b"")
        except ValidationError:
            return None  # junk under the key: no task of ours
        return record if record.task_id == task_id else None

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
        record and publishes it again under the same message id (JetStream drops the copy),
        so a retry after a replica died between the two steps completes the call."""
        submitted = await self.send(
            entry, data, caller=caller, task_id=task_id, context_id=context_id
        )
        return submitted.record

    async def send(
        self,
        entry: DirectoryEntry,
        data: Any,
        *,
        caller: str,
        task_id: str | None = None,
        context_id: str | None = None,
    ) -> Submitted:
        """``submit``, telling whether this call filed the record (see ``Submitted``)."""
        task_id = valid_task_id(task_id) if task_id else uuid.uuid4().hex
        context = valid_task_id(context_id) if context_id else task_id
        record = TaskRecord(
            task_id=task_id,
            kind=entry.kind,
            name=entry.name,
            context_id=context,
            created_at=datetime.now(UTC),
            caller=caller[:512],
            input=data,
        )
        encoded = record.model_dump_json(by_alias=True).encode()
        if len(encoded) + HEADROOM_BYTES > self._nc.max_payload:
            # The record and the call each carry the input: past the server's payload limit
            # neither could be stored. Refused before anything is written.
            raise CallRefused(
                413, f"the input is too large for NATS (at most {self._nc.max_payload} bytes)"
            )
        kv = await self._bucket(entry.namespace)
        key = naming.task_key(entry.kind, entry.name, task_id)
        new = True
        try:
            await kv.create(key, encoded)
        except KeyWrongLastSequenceError:
            existing = await self._record(entry, task_id)
            if existing is None:
                raise CallRefused(409, f"task id {task_id!r} is taken") from None
            record, new = existing, False
        await self._publish(entry, record)
        return Submitted(record, new)

    async def _publish(self, entry: DirectoryEntry, record: TaskRecord) -> None:
        subject, headers, payload = call_message(entry, record)
        try:
            await publish_stored(self._js, subject, payload, headers)
        except NoStream as error:
            raise CallRefused(
                503, f"{entry.kind} {entry.name} cannot be reached: {error}"
            ) from None
        except TimeoutError:
            raise CallRefused(503, f"NATS did not store the call to {entry.name} in time") from None

    async def get(self, entry: DirectoryEntry, task_id: str) -> TaskView | None:
        record = await self._record(entry, task_id)
        if record is None:
            return None
        return await self._view(entry, record)

    async def _view(self, entry: DirectoryEntry, record: TaskRecord) -> TaskView:
        if entry.kind == "Agent":
            return agent_view(record, await self._stored_reply(entry, record))
        return run_view(record, await self._run(entry, record.task_id))

    async def _stored_reply(self, entry: DirectoryEntry, record: TaskRecord) -> CloudEvent | None:
        subject = naming.gateway_reply_subject(entry.namespace, record.task_id)
        try:
            msg = await self._js.get_last_msg(naming.event_log_stream(entry.namespace), subject)
        except NotFoundError:
            return None
        return _reply(entry, record, msg)

    async def _run(self, entry: DirectoryEntry, run_id: str) -> RunState | None:
        key = (entry.namespace, entry.name)
        kv = self._runs.get(key)
        if kv is None:
            try:
                kv = await self._js.key_value(naming.workflow_runs_bucket(*key))
            except BucketNotFoundError:
                return None
            self._runs[key] = kv
        try:
            stored = await kv.get(run_id)
        except NotFoundError:
            return None
        try:
            return RunState.model_validate_json(stored.value or b"")
        except ValidationError:
            return None

    def _signal(self, entry: DirectoryEntry, task_id: str) -> str:
        """The subject whose message says the task ended."""
        if entry.kind == "Agent":
            return naming.gateway_reply_subject(entry.namespace, task_id)
        return naming.workflow_subject(entry.namespace, entry.name, "results", task_id)

    async def wait(self, entry: DirectoryEntry, task_id: str, within: float) -> TaskView:
        """The task once terminal, or as it is when ``within`` seconds pass. Subscribes before
        it reads, so an answer stored in between is not missed; reads again every
        ``POLL_SECONDS`` whatever the subscription brings."""
        async with self.listening(entry, task_id) as listener:
            return await listener.wait(within)

    @asynccontextmanager
    async def listening(self, entry: DirectoryEntry, task_id: str) -> AsyncIterator[Listener]:
        """Subscribed to the subject that says task ``task_id`` ended, for as long as the
        block runs. Opened before ``send``, a new task's wait reads nothing: its answer can
        only come after the publish, hence to the subscription (a blocking call's hot path
        is then the record's create and the publish, each one round trip)."""
        subscription = await self._nc.subscribe(self._signal(entry, valid_task_id(task_id)))
        try:
            yield Listener(self, entry, task_id, subscription)
        finally:
            await subscription.unsubscribe()

    async def _wait(
        self,
        entry: DirectoryEntry,
        task_id: str,
        subscription: Subscription,
        within: float,
        submitted: Submitted | None,
    ) -> TaskView:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(within, 0.0)
        if submitted is not None and submitted.new:
            record = submitted.record
            view = agent_view(record, None) if entry.kind == "Agent" else run_view(record, None)
        else:
            found = (
                submitted.record if submitted is not None else await self._record(entry, task_id)
            )
            if found is None:
                raise CallRefused(404, f"no task {task_id!r} of {entry.kind} {entry.name}")
            record = found
            view = await self._view(entry, record)
        while not view.terminal and (left := deadline - loop.time()) > 0:
            try:
                msg = await subscription.next_msg(timeout=min(left, POLL_SECONDS))
            except (NatsTimeoutError, TimeoutError):
                view = await self._view(entry, record)
                continue
            if entry.kind == "Agent" and (reply := _reply(entry, record, msg)) is not None:
                view = agent_view(record, reply)
            elif entry.kind == "Workflow":
                view = await self._view(entry, record)
        return view

    async def list(
        self, entry: DirectoryEntry, *, context_id: str | None = None, limit: int = 100
    ) -> list[TaskView]:
        """Newest first: the target's records, read by the stream's subject index."""
        kv = await self._bucket(entry.namespace)
        prefix = f"$KV.{naming.tasks_bucket(entry.namespace)}."
        wildcard = prefix + naming.task_key_wildcard(entry.kind, entry.name)
        info = await self._js.stream_info(
            naming.kv_stream(naming.tasks_bucket(entry.namespace)), subjects_filter=wildcard
        )
        records: list[TaskRecord] = []
        for subject in list((info.state.subjects or {}).keys())[:MAX_LISTED]:
            try:
                stored = await kv.get(subject[len(prefix) :])
                record = TaskRecord.model_validate_json(stored.value or b"")
            except (NotFoundError, ValidationError):
                continue
            if context_id is None or record.context_id == context_id:
                records.append(record)
        records.sort(key=lambda record: record.created_at, reverse=True)
        return [await self._view(entry, record) for record in records[: max(limit, 0)]]

    async def cancel(self, entry: DirectoryEntry, task_id: str) -> TaskView:
        """A Workflow run is cancelled (the engine ends it ``Cancelled``); an Agent's message
        cannot be recalled once sent: ``CallRefused(409)`` unless already terminal."""
        record = await self._record(entry, task_id)
        if record is None:
            raise CallRefused(404, f"no task {task_id!r} of {entry.kind} {entry.name}")
        view = await self._view(entry, record)
        if view.terminal:
            return view
        if entry.kind == "Agent":
            raise CallRefused(409, "a message sent to an agent cannot be recalled")
        event = CloudEvent(
            id=f"cancel-{task_id}",
            source=GATEWAY_SOURCE,
            type=CANCEL_TYPE,
            datacontenttype=envelope.JSON_CONTENT_TYPE,
            data={"reason": "cancelled through the gateway"},
        )
        headers, payload = envelope.to_binary(event)
        headers[Header.MSG_ID.value] = event.id
        subject = naming.workflow_subject(entry.namespace, entry.name, "cancel", task_id)
        try:
            await publish_stored(self._js, subject, payload, headers)
        except (NoStream, TimeoutError):
            raise CallRefused(503, f"workflow {entry.name} took no cancel request") from None
        return view

    async def stream(self, entry: DirectoryEntry, task_id: str) -> AsyncIterator[Delta | TaskView]:
        """Token deltas (an LLM agent) or run events (a Workflow) as they come, then the
        terminal ``TaskView``. What came before the subscription is in the final view."""
        record = await self._record(entry, task_id)
        if record is None:
            raise CallRefused(404, f"no task {task_id!r} of {entry.kind} {entry.name}")
        if entry.kind == "Agent":
            pieces = naming.token_stream_subject(entry.namespace, record.context_id, task_id)
        else:
            pieces = naming.workflow_subject(entry.namespace, entry.name, "events", task_id)
        signal = self._signal(entry, task_id)
        queue: asyncio.Queue[Msg] = asyncio.Queue(maxsize=STREAM_BACKLOG)

        async def heard(msg: Msg) -> None:
            if not queue.full():
                queue.put_nowait(msg)

        subscriptions = [
            await self._nc.subscribe(pieces, cb=heard),
            await self._nc.subscribe(signal, cb=heard),
        ]
        try:
            view = await self._view(entry, record)
            while not view.terminal:
                try:  # asyncio.timeout: 3.11's wait_for can swallow a cancel (see pull.py)
                    async with asyncio.timeout(POLL_SECONDS):
                        msg = await queue.get()
                except TimeoutError:
                    view = await self._view(entry, record)
                    continue
                if msg.subject == pieces:
                    yield _delta(msg)
                elif entry.kind == "Agent" and (reply := _reply(entry, record, msg)) is not None:
                    view = agent_view(record, reply)
                else:
                    view = await self._view(entry, record)
            yield view
        finally:
            for subscription in subscriptions:
                await subscription.unsubscribe()


def _reply(entry: DirectoryEntry, record: TaskRecord, msg: Msg | RawStreamMsg) -> CloudEvent | None:
    """``msg`` as the Agent's reply to the task, or None (malformed, or not from the Agent:
    whoever may publish to an inbox may aim a reply at this subject)."""
    try:
        reply = envelope.parse(dict(msg.headers or {}), msg.data or b"")
    except MalformedMessage:
        return None
    if reply.causationid != record.task_id or reply.source != f"/{entry.namespace}/{entry.name}":
        return None
    return reply


MAX_DELTA_BYTES = 64 * 1024


def _delta(msg: Msg) -> Delta:
    """A token stream's ``{"delta": text}`` as text; anything else (a tool announcement, a
    turn's end, a run event) as a small event. Anyone may publish there: bounded, and only
    believed in the token stream's shape."""
    data = msg.data or b""
    if len(data) > MAX_DELTA_BYTES:
        return Delta(event={"bytes": len(data)})
    try:
        body = json.loads(data)
    except ValueError:
        return Delta(event={"bytes": len(data)})
    if not isinstance(body, dict):
        return Delta(event={"bytes": len(data)})
    if isinstance(body.get("delta"), str):
        return Delta(text=body["delta"])
    kept = {k: v for k, v in body.items() if k in ("tool", "done", "turn", "final", "type")}
    return Delta(event={k: v for k, v in kept.items() if isinstance(v, str | int | bool)})
