"""The only CLI module that talks to NATS: one namespace's workflows, agents and state.

Every missing stream or bucket becomes a ``CliError`` naming it and the likely
cause, so that ``main`` prints a sentence, not a traceback.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import NoServersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import Header, RawStreamMsg, StreamInfo
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from troupe_cli.errors import CliError
from troupe_cli.views import (
    AgentSample,
    ConsumerCounters,
    DeadLetter,
    RunResult,
    readable_data,
    replay_headers,
)
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.dead_letters import header_map
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.nats_servers import InvalidNatsUrl
from troupe_runtime.contract.run_events import CANCEL_TYPE, Event
from troupe_runtime.contract.run_state import RunState
from troupe_runtime.contract.state_entries import Entry
from troupe_runtime.nats.kv import KeyValueRevisions
from troupe_runtime.nats.replicas import connect_without_retry
from troupe_runtime.nats.streams import read_events

CONNECT_TIMEOUT_SECONDS = 3
# What the CRD allows for messaging.priorityLevels.
MAX_LEVELS = 10
# How much of a text taken from a dead letter an error message quotes.
MAX_SHOWN = 200
# What a token-stream listener holds before the server counts it a slow consumer and
# drops the excess: a flood costs messages, never the CLI's memory.
HEARD_QUEUE = 1024
PENDING_MESSAGES = 4096
PENDING_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Heard:
    """A core-NATS message a listener received, tagged with the subscription it came by."""

    tag: str
    subject: str
    data: bytes
    headers: dict[str, str]


async def _quiet(error: Exception) -> None:
    """Silences nats-py's own error log: the CLI reports a failure once, as a ``CliError``."""


@asynccontextmanager
async def connected(url: str, namespace: str) -> AsyncIterator[Ops]:
    """Connect without retrying: a person waiting at a prompt wants the error now."""
    try:
        nc = await connect_without_retry(
            url, name="troupe-cli", connect_timeout=CONNECT_TIMEOUT_SECONDS, error_cb=_quiet
        )
    except (NoServersError, OSError, NatsTimeoutError, InvalidNatsUrl) as error:
        raise CliError(
            f"cannot reach NATS at {url} ({error}); set --nats-url or NATS_URL"
        ) from error
    try:
        yield Ops(nc, namespace)
    except NatsError as error:
        raise CliError(f"NATS at {url} failed a request: {error}") from error
    finally:
        await nc.close()


def _encode(event: CloudEvent) -> tuple[dict[str, str], bytes]:
    """The event as NATS headers and payload, or a CLI error saying why it cannot be sent."""
    try:
        return envelope.to_binary(event)
    except envelope.UnpublishableEvent as error:
        raise CliError(f"cannot send this data: {error}") from error


class Ops:
    """The reads and writes behind every command, in one namespace."""

    def __init__(self, nc: Client, namespace: str) -> None:
        self._nc = nc
        self._js: JetStreamContext = nc.jetstream()
        self.namespace = namespace

    # Token streams (core NATS)

    @asynccontextmanager
    async def listening(self, subjects: Mapping[str, str]) -> AsyncIterator[asyncio.Queue[Heard]]:
        """Subscribe to ``subjects`` (tag to subject) and yield their messages in one
        queue, once the server has the subscriptions: whatever is published after the
        block starts is heard."""
        heard: asyncio.Queue[Heard] = asyncio.Queue(HEARD_QUEUE)

        def deliver(tag: str) -> Any:
            async def callback(msg: Msg) -> None:
                await heard.put(Heard(tag, msg.subject, msg.data or b"", msg.headers or {}))

            return callback

        subscriptions = []
        try:
            for tag, subject in subjects.items():
                subscriptions.append(
                    await self._nc.subscribe(
                        subject,
                        cb=deliver(tag),
                        pending_msgs_limit=PENDING_MESSAGES,
                        pending_bytes_limit=PENDING_BYTES,
                    )
                )
            await self.caught_up()
            yield heard
        finally:
            for subscription in subscriptions:
                await subscription.unsubscribe()

    async def caught_up(self) -> None:
        """One round trip to the server: everything it sent before has been read."""
        await self._nc.flush(CONNECT_TIMEOUT_SECONDS)

    # Workflows

    async def start_run(
        self, workflow: str, run_id: str, data: Any, priority: int | None = None
    ) -> bool:
        """Publish the run's start event; True if JetStream had it already (same run id)."""
        await self._workflow_stream(workflow)
        event = CloudEvent(
            id=run_id,
            source="/troupe-cli",
            type="troupe.workflow.start",
            datacontenttype=envelope.JSON_CONTENT_TYPE,
            priority=priority,
            data=data,
        )
        headers, payload = _encode(event)
        ack = await self._js.publish(
            naming.workflow_subject(self.namespace, workflow, "start", run_id),
            payload,
            headers={**headers, Header.MSG_ID.value: run_id},
        )
        return bool(ack.duplicate)

    async def cancel_run(self, workflow: str, run_id: str, reason: str | None) -> None:
        """Ask the engine to end the run ``Cancelled``; a finished run stays as it is."""
        await self._workflow_stream(workflow)
        event = CloudEvent(
            id=uuid.uuid4().hex,
            source="/troupe-cli",
            type=CANCEL_TYPE,
            datacontenttype=envelope.JSON_CONTENT_TYPE,
            data={} if reason is None else {"reason": reason},
        )
        headers, payload = _encode(event)
        await self._js.publish(
            naming.workflow_subject(self.namespace, workflow, "cancel", run_id),
            payload,
            headers=headers,
        )

    async def wait_result(self, workflow: str, run_id: str, within: float) -> RunResult | None:
        """The run's result, read from the stream so a run that already ended is found too."""
        subject = naming.workflow_subject(self.namespace, workflow, "results", run_id)
        subscription = await self._js.subscribe(subject, ordered_consumer=True)
        try:
            msg = await subscription.next_msg(within)
        except NatsTimeoutError:
            return None
        finally:
            await subscription.unsubscribe()
        body = readable_data(msg.data or b"{}", envelope.JSON_CONTENT_TYPE)
        if not isinstance(body, dict):  # anyone may publish on the results subject
            return RunResult(run_id, "", None, "the run's result is not a JSON object")
        return RunResult(run_id, body.get("status", ""), body.get("output"), body.get("error"))

    async def runs(self, workflow: str) -> list[RunState]:
        """Every run's projection, read in one pass over the runs bucket."""
        kv = await self._runs_bucket(workflow)
        values = await _current_values(
            self._js, kv, naming.workflow_runs_bucket(self.namespace, workflow), ">"
        )
        states = [RunState.model_validate_json(value) for value in values.values()]
        return sorted(states, key=lambda state: state.started_at)

    async def run_projection(self, workflow: str, run_id: str) -> RunState | None:
        kv = await self._runs_bucket(workflow)
        try:
            entry = await kv.get(run_id)
        except NotFoundError:
            return None
        return RunState.model_validate_json(entry.value) if entry.value else None

    async def run_events(self, workflow: str, run_id: str) -> list[Event]:
        stream = await self._workflow_stream(workflow)
        subject = naming.workflow_subject(self.namespace, workflow, "events", run_id)
        return await read_events(self._js, stream, subject)

    async def _workflow_stream(self, workflow: str) -> str:
        stream = naming.workflow_stream(self.namespace, workflow)
        await self._existing(
            stream,
            f"workflow {workflow} has no stream {stream} in namespace {self.namespace}: "
            "is its engine running?",
        )
        return stream

    async def _existing(self, stream: str, missing: str) -> StreamInfo:
        """The stream's info; a CLI error saying ``missing`` when there is no such stream."""
        try:
            return await self._js.stream_info(stream)
        except NotFoundError as error:
            raise CliError(missing) from error

    async def _runs_bucket(self, workflow: str) -> KeyValue:
        bucket = naming.workflow_runs_bucket(self.namespace, workflow)
        try:
            return await self._js.key_value(bucket)
        except BucketNotFoundError as error:
            raise CliError(
                f"workflow {workflow} has no runs bucket {bucket} in namespace "
                f"{self.namespace}: is its engine running?"
            ) from error

    # Agents

    async def send(self, agent: str, event: CloudEvent, priority: int) -> tuple[str, str, int]:
        """Publish to the agent's inbox; return the subject, stream and sequence."""
        stream = naming.inbox_stream(self.namespace, agent)
        consumer = naming.consumer_name(agent, priority)
        try:
            await self._js.stream_info(stream)
        except NotFoundError as error:
            raise CliError(
                f"agent {agent} has no inbox stream {stream}: is the Agent deployed in "
                f"namespace {self.namespace}?"
            ) from error
        try:
            await self._js.consumer_info(stream, consumer)
        except NotFoundError as error:
            raise CliError(
                f"agent {agent} has no consumer {consumer} for priority {priority}: "
                f"use a priority below the Agent's messaging.priorityLevels"
            ) from error
        subject = naming.inbox_subject(self.namespace, agent, priority)
        headers, payload = _encode(event)
        ack = await self._js.publish(subject, payload, headers=headers)
        return subject, ack.stream, ack.seq

    async def sample_agents(self) -> list[AgentSample]:
        """Consumer counters and dead-letter depth of every agent in the namespace."""
        streams = {info.config.name: info for info in await self._streams()}
        prefix = naming.inbox_stream(self.namespace, "")
        samples = []
        for name, info in streams.items():
            agent = _inbox_agent(info, self.namespace)
            if name is None or not name.startswith(prefix) or agent is None:
                continue
            consumers = tuple(
                ConsumerCounters(
                    pending=consumer.num_pending or 0,
                    ack_pending=consumer.num_ack_pending or 0,
                    redelivered=consumer.num_redelivered or 0,
                    ack_floor=consumer.ack_floor.consumer_seq if consumer.ack_floor else 0,
                )
                for consumer in await self._js.consumers_info(name)
            )
            dead = streams.get(naming.dead_letter_stream(self.namespace, agent))
            samples.append(AgentSample(agent, consumers, dead.state.messages if dead else None))
        return samples

    async def _streams(self) -> list[StreamInfo]:
        """Every stream of the account; the server pages the listing."""
        found: list[StreamInfo] = []
        while page := await self._js.streams_info(offset=len(found)):
            found.extend(page)
        return found

    # Dead letters

    async def dead_letters(self, agent: str, limit: int) -> list[DeadLetter]:
        stream = await self._dead_letter_stream(agent)
        subject = naming.dead_letter_subject(self.namespace, agent)
        letters = []
        async for msg in self._stored(stream, subject):
            letters.append(_dead_letter(msg))
            if len(letters) == limit:
                break
        return letters

    async def dead_letter(self, agent: str, sequence: int) -> DeadLetter:
        stream = await self._dead_letter_stream(agent)
        try:
            return _dead_letter(await self._js.get_msg(stream, sequence))
        except NotFoundError as error:
            raise CliError(
                f"agent {agent} has no dead letter {sequence} in {stream}: "
                f"list them with `troupe dlq list {agent}`"
            ) from error

    async def replay(self, agent: str, sequence: int) -> str:
        """Publish the dead letter to its original subject, then delete it; return the subject.

        Anyone may have written the letter, so the subject it names is used only if it
        is one of the agent's own inbox subjects (a declared priority level): a replay
        never publishes anywhere else. Published first: a crash in between leaves a
        copy behind, never a loss.
        """
        letter = await self.dead_letter(agent, sequence)
        show = f"inspect it with `troupe dlq show {agent} {sequence}`"
        subject = letter.original_subject
        if subject is None:
            raise CliError(
                f"dead letter {sequence} of agent {agent} has no Troupe-Original-Subject "
                f"header, so it cannot be replayed; {show}"
            )
        inboxes = await self._inbox_subjects(agent)
        if subject not in inboxes:
            raise CliError(
                f"dead letter {sequence} of agent {agent} names {subject[:MAX_SHOWN]!r} as its "
                f"original subject, which is not one of the agent's inbox subjects "
                f"({', '.join(sorted(inboxes))}), so it was not replayed; {show}"
            )
        if letter.dropped is not None:
            raise CliError(
                f"dead letter {sequence} of agent {agent} lacks {letter.dropped[:MAX_SHOWN]}, "
                f"so it cannot be replayed as it was; {show}"
            )
        stream = naming.dead_letter_stream(self.namespace, agent)
        try:
            await self._js.publish(subject, letter.data, headers=replay_headers(letter, stream))
        except NatsError as error:
            raise CliError(
                f"could not replay dead letter {sequence} of agent {agent} to {subject}: "
                f"{error}; it is kept"
            ) from error
        await self._js.delete_msg(stream, sequence)
        return subject

    async def _inbox_subjects(self, agent: str) -> set[str]:
        """The agent's inbox subjects that its stream stores and a consumer reads: one per
        declared priority level."""
        stream = naming.inbox_stream(self.namespace, agent)
        try:
            info = await self._js.stream_info(stream)
            consumers = await self._js.consumers_info(stream)
        except NotFoundError as error:
            raise CliError(
                f"agent {agent} has no inbox stream {stream}: is the Agent deployed in "
                f"namespace {self.namespace}?"
            ) from error
        levels = {naming.inbox_subject(self.namespace, agent, p) for p in range(MAX_LEVELS)}
        levels &= set(info.config.subjects or [])
        read = {c.config.filter_subject for c in consumers} | {
            subject for c in consumers for subject in c.config.filter_subjects or ()
        }
        return levels & {subject for subject in read if subject is not None}

    async def dead_letter_sequences(self, agent: str) -> list[int]:
        stream = await self._dead_letter_stream(agent)
        subject = naming.dead_letter_subject(self.namespace, agent)
        return [msg.seq async for msg in self._stored(stream, subject) if msg.seq is not None]

    async def purge_dead_letters(self, agent: str) -> int:
        """Empty the agent's dead-letter stream; return how many letters it held."""
        stream = naming.dead_letter_stream(self.namespace, agent)
        held = (await self._dead_letter_info(agent)).state.messages
        await self._js.purge_stream(stream)
        return held

    async def _dead_letter_stream(self, agent: str) -> str:
        await self._dead_letter_info(agent)
        return naming.dead_letter_stream(self.namespace, agent)

    async def _dead_letter_info(self, agent: str) -> StreamInfo:
        stream = naming.dead_letter_stream(self.namespace, agent)
        return await self._existing(
            stream,
            f"agent {agent} has no dead-letter stream {stream}: is the Agent deployed in "
            f"namespace {self.namespace} with deadLetter.enabled?",
        )

    async def _stored(self, stream: str, subject: str) -> AsyncIterator[RawStreamMsg]:
        """The messages of one subject, oldest first, skipping gaps left by deletions."""
        sequence = 1
        while True:
            try:
                msg = await self._js.get_msg(stream, sequence, subject=subject, next=True)
            except NotFoundError:
                return
            yield msg
            sequence = (msg.seq or sequence) + 1

    # Budgets

    async def budget_entries(self, pattern: str = ">") -> dict[str, bytes]:
        """The namespace's budget bucket's keys matching ``pattern`` and their values, read
        in one pass; empty when the namespace has no Budget yet (no bucket)."""
        bucket = naming.budget_bucket(self.namespace)
        try:
            kv = await self._js.key_value(bucket)
        except BucketNotFoundError:
            return {}
        return await _current_values(self._js, kv, bucket, pattern)

    async def budget_definition(self, name: str) -> dict[str, bytes]:
        """One budget's definition and ledgers, as ``budget_entries`` gives them."""
        entries = await self.budget_entries(naming.budget_definition_key(name))
        if not entries:
            raise CliError(
                f"namespace {self.namespace} has no Budget {name}: list them with "
                "`troupe budget ls`"
            )
        return {**entries, **await self.budget_entries(naming.budget_ledger_wildcard(name))}

    # Shared state

    async def bucket(self, name: str) -> KeyValueRevisions:
        bucket = naming.kv_bucket(self.namespace, name)
        try:
            kv = await self._js.key_value(bucket)
        except BucketNotFoundError as error:
            raise CliError(
                f"state bucket {name} has no JetStream bucket {bucket}: does an Agent in "
                f"namespace {self.namespace} declare it in spec.state?"
            ) from error
        return KeyValueRevisions(kv, name, None)

    async def get(self, name: str, key: str) -> Entry:
        entry = (await (await self.bucket(name)).snapshot(key)).entry
        if entry is None:
            raise CliError(f"state bucket {name} has no key {key!r} in namespace {self.namespace}")
        return entry


READ_CONCURRENCY = 64
"""Keys ``_current_values`` reads at once."""


async def _current_values(
    js: JetStreamContext, kv: KeyValue, bucket: str, pattern: str
) -> dict[str, bytes]:
    """The current value of every key matching ``pattern``; deleted keys are left out.

    The keys come from the stream's subject index and each value from a get: a KV watch
    would be one pass, but nats-py can signal the end of its initial values before they
    have all arrived (nats-io/nats.py#842), which made a listing come back short."""
    prefix = f"$KV.{bucket}."
    info = await js.stream_info(naming.kv_stream(bucket), subjects_filter=f"{prefix}{pattern}")
    keys = [subject[len(prefix) :] for subject in info.state.subjects or {}]
    values: dict[str, bytes] = {}
    gate = asyncio.Semaphore(READ_CONCURRENCY)

    async def read(key: str) -> None:
        async with gate:
            try:
                entry = await kv.get(key)
            except NotFoundError:  # deleted, purged or expired since it was listed
                return
        if entry.value:
            values[key] = entry.value

    await asyncio.gather(*(read(key) for key in keys))
    return {key: values[key] for key in sorted(values)}


def _inbox_agent(info: StreamInfo, namespace: str) -> str | None:
    """The agent whose inbox this is, from its stream's name and subjects: those are
    ``naming.inbox_subject`` for priority 0 and on, one per level."""
    owner = naming.stream_owner(info.config.name or "")
    if owner is None or owner.kind != "Agent" or owner.namespace != namespace:
        return None
    subjects = info.config.subjects or []
    levels = [naming.inbox_subject(namespace, owner.name, p) for p in range(len(subjects))]
    return owner.name if subjects and subjects == levels else None


def _dead_letter(msg: RawStreamMsg) -> DeadLetter:
    assert msg.seq is not None
    return DeadLetter(msg.seq, msg.time, header_map(msg.headers), msg.data or b"")
