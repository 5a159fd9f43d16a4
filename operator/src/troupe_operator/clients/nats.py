"""The only module that talks to NATS: pooled connections, provisioning and counts.

It wraps ``troupe_runtime.nats.provision`` (the one applier of JetStream resources, for
agents and workflow engines alike), counts a workflow's runs from its stream's subject
index (the engine's active markers and tallies: no run is read). It tells two failures
apart: NATS unreachable (timeouts, refused connections, no responders) is
``MessagingUnavailable``, retried; JetStream refusing a config (an API error with an error
code: overlapping subjects, an invalid config, a duration it cannot represent) is
``SpecRejected``, naming the spec field, since retrying the same config cannot help.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import tempfile
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import nats
from nats.aio.client import Client, RawCredentials
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import (
    ConsumerConfig,
    ConsumerInfo,
    KeyValueConfig,
    ObjectStoreConfig,
    StorageType,
    StreamConfig,
)
from nats.js.errors import (
    APIError,
    BadRequestError,
    BucketNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KeyValue
from pydantic import ValidationError

from troupe_operator.api.status import AgentUsage, ConsumerCounts
from troupe_operator.builders import usage as usage_builders
from troupe_operator.builders.autoscale import Backlog
from troupe_operator.builders.jetstream import SpecFields
from troupe_operator.builders.problems import Problem, SpecRejected
from troupe_runtime.contract import naming
from troupe_runtime.contract.agent_resources import AgentResources
from troupe_runtime.contract.budget import BudgetDefinition
from troupe_runtime.contract.engine_config import EngineConfig
from troupe_runtime.contract.run_state import TERMINAL_STATUSES, RunState
from troupe_runtime.contract.workflow_resources import WorkflowResources
from troupe_runtime.nats.provision import (
    ProvisionReport,
    ResourceRefused,
    budget_bucket_config,
    delete_agent_resources,
    ensure_agent_resources,
    ensure_bucket,
    ensure_consumer,
    ensure_stream,
    ensure_workflow_resources,
    refuses_config,
)
from troupe_runtime.nats.publish import publish_stored
from troupe_runtime.nats.replicas import ReplicatedJetStream, connect_without_retry

CONNECT_TIMEOUT_SECONDS = 2
LEDGER_WRITE_ATTEMPTS = 5
REQUEST_TIMEOUT_SECONDS = 5.0
RETRY_PAUSE_SECONDS = 0.5
RETRY_BUDGET_SECONDS = 20.0
"""How long a pass keeps retrying NATS requests that time out (a cluster electing leaders)."""
SUBJECTS_OVERLAP = 10065
"""JetStream's error code for a stream whose subjects another stream already stores."""
T = TypeVar("T")
logger = logging.getLogger(__name__)


async def _delete_streams(js: JetStreamContext, streams: list[str]) -> list[str]:
    """Delete the named streams; return those that existed."""
    deleted = []
    for stream in streams:
        try:
            await js.delete_stream(stream)
        except NotFoundError:
            continue
        deleted.append(f"stream/{stream}")
    return deleted


class MessagingUnavailable(Exception):
    """NATS could not be reached, or could not serve a JetStream request now."""


async def _conflicts(
    js: JetStreamContext, refused: ResourceRefused, fields: SpecFields
) -> list[Problem]:
    """A problem for each refused subject that another stream stores, naming its owner."""
    own = refused.resource.removeprefix("stream/")
    problems = []
    for subject in refused.subjects:
        try:
            other = await js.find_stream_name_by_subject(subject)
        except NotFoundError:
            continue
        if other == own:
            continue
        owner = naming.stream_owner(other)
        whose = f" of {owner}" if owner else ""
        problems.append(
            Problem(
                fields.of_subject(subject),
                "SubjectConflict",
                f"subject {subject} overlaps stream {other}{whose}, which stores it already: "
                "choose a subject no other stream stores",
            )
        )
    return problems


async def _rejection(
    js: JetStreamContext, refused: ResourceRefused, fields: SpecFields
) -> SpecRejected:
    """What to tell a person about JetStream's refusal of one of the object's resources."""
    error = refused.error
    if error.err_code == SUBJECTS_OVERLAP:
        conflicts = await _conflicts(js, refused, fields)
        if conflicts:
            return SpecRejected(conflicts)
    description = error.description or "no reason given"
    return SpecRejected(
        [
            Problem(
                fields.of_refusal(refused.resource, description),
                "StreamRejected",
                f"JetStream refused {refused.resource}: {description} (error {error.err_code})",
            )
        ]
    )


@dataclass(frozen=True)
class TlsMaterial:
    """PEM data from an agent's TLS Secret."""

    ca: bytes
    cert: bytes | None = None
    key: bytes | None = None


@dataclass(frozen=True)
class NatsTarget:
    """One NATS (a server or, comma-separated, a cluster's servers) as a set of agents
    reach it, and the replicas of what is created there for them; targets that differ only
    in replicas share a connection."""

    url: str
    credentials: str | None = None
    tls: TlsMaterial | None = None
    replicas: int = 1

    @property
    def connection(self) -> NatsTarget:
        """The target as a connection's key: replicas are the JetStream context's, not its."""
        return replace(self, replicas=1)


async def _subject_counts(js: JetStreamContext, stream: str, subjects: str) -> dict[str, int]:
    """Messages per subject matching ``subjects``, from the server's subject index."""
    return dict((await js.stream_info(stream, subjects_filter=subjects)).state.subjects or {})


async def _last_message(
    js: JetStreamContext, stream: str, subject: str
) -> tuple[int, bytes] | None:
    try:
        msg = await js.get_last_msg(stream, subject)
    except NotFoundError:
        return None
    return msg.seq or 0, msg.data or b""


@dataclass(frozen=True)
class RunTally:
    """A workflow's runs as its stream counts them, and its latest run's projection."""

    running: int
    succeeded: int
    failed: int
    budget_exceeded: int
    cancelled: int
    last: RunState | None


async def _projection(js: JetStreamContext, config: EngineConfig, marker: bytes) -> RunState | None:
    """The projection of the run a marker or tally message names; None if unreadable."""
    try:
        run_id = str(json.loads(marker)["run"])
        entry = await (await js.key_value(config.runs_bucket)).get(run_id)
        return RunState.model_validate_json(entry.value or b"")
    except (
        ValueError,
        KeyError,
        TypeError,
        RecursionError,
        NotFoundError,
        ValidationError,
    ) as error:
        logger.warning("the latest run of %s is unreadable: %s", config.stream, error)
        return None


@dataclass(frozen=True)
class Counts:
    consumers: ConsumerCounts
    dead_letters: int
    usage: AgentUsage | None = None
    """LLM agents: tokens and cost over the last hour."""
    last_active: datetime | None = None
    """The latest creation, delivery or acknowledgement of any of the consumers."""

    @property
    def backlog(self) -> Backlog:
        return Backlog(self.consumers.pending, self.consumers.ack_pending, self.last_active)


def _last_active(info: ConsumerInfo) -> datetime | None:
    """When the consumer last did anything: created, delivered, or saw an acknowledgement."""
    moments = [
        moment
        for moment in (
            info.created,
            info.delivered.last_active if info.delivered else None,
            info.ack_floor.last_active if info.ack_floor else None,
        )
        if isinstance(moment, datetime)
    ]
    return max(moments, default=None)


async def _consumer_counts(
    js: JetStreamContext, resources: AgentResources
) -> tuple[ConsumerCounts, datetime | None]:
    """The consumers' pending, ack-pending and redelivered sums, and their last activity."""
    assert resources.inbox.name is not None
    pending = ack_pending = redelivered = 0
    moments = []
    for consumer in resources.consumers:
        assert consumer.durable_name is not None
        info = await js.consumer_info(resources.inbox.name, consumer.durable_name)
        pending += info.num_pending or 0
        ack_pending += info.num_ack_pending or 0
        redelivered += info.num_redelivered or 0
        moments.append(_last_active(info))
    counts = ConsumerCounts(pending=pending, ack_pending=ack_pending, redelivered=redelivered)
    return counts, max((m for m in moments if m is not None), default=None)


async def _ensure_object_store(
    js: JetStreamContext, config: ObjectStoreConfig, report: ProvisionReport
) -> None:
    """Create the Object Store bucket when it is missing (its settings never change)."""
    assert config.bucket is not None
    try:
        await js.object_store(config.bucket)
        return
    except NotFoundError:
        pass
    try:
        await js.create_object_store(config.bucket, config)
    except APIError as error:
        if refuses_config(error):
            raise ResourceRefused(f"objects/{config.bucket}", [], error) from error
        raise
    report.created.append(f"objects/{config.bucket}")


async def _usage(js: JetStreamContext, bucket: str, agent: str, now: datetime) -> AgentUsage:
    """The agent's usage records of the last hour, summed; zero while there are none.

    The keys come from the bucket stream's subject index in one request (filtered to the
    agent's), and only the last hour's values are read."""
    prefix = f"$KV.{bucket}."
    try:
        subjects = await _subject_counts(
            js, naming.kv_stream(bucket), prefix + usage_builders.key_filter(agent)
        )
        kv = await js.key_value(bucket)
    except NotFoundError:
        return usage_builders.summed({})
    keys = [subject.removeprefix(prefix) for subject in subjects]
    values: dict[str, bytes] = {}
    for key in usage_builders.recent_keys(keys, agent, now):
        try:
            entry = await kv.get(key)
        except NotFoundError:
            continue  # expired or deleted since it was listed
        values[key] = entry.value or b""
    return usage_builders.summed(values)


@dataclass(frozen=True)
class BudgetRead:
    """One pass's look at a Budget in its namespace's bucket."""

    written: bool
    """Whether the definition had to be (re)written."""
    windows: list[str]
    """The window ids of the ledgers present."""
    values: dict[str, bytes]
    """The ledgers asked for that exist, by window id."""


def _ledger_subject(bucket: str, budget: str) -> str:
    return f"$KV.{bucket}." + naming.budget_ledger_wildcard(budget)


async def _budget_windows(js: JetStreamContext, bucket: str, budget: str) -> list[str]:
    """The window ids of a budget's ledgers, from the bucket stream's subject index in one
    request (ledgers are pruned by purging their subjects, so no tombstone lingers there)."""
    prefix = f"$KV.{bucket}." + naming.budget_ledger_key(budget, "")
    subjects = await _subject_counts(js, naming.kv_stream(bucket), _ledger_subject(bucket, budget))
    return sorted(subject.removeprefix(prefix) for subject in subjects)


async def _sync_budget(
    js: JetStreamContext,
    namespace: str,
    definition: BudgetDefinition,
    encoded: bytes,
    stale: Callable[[bytes | None], bool],
    wanted: Callable[[list[str]], list[str]],
) -> BudgetRead:
    config = budget_bucket_config(namespace)
    assert config.bucket is not None
    await ensure_bucket(js, config, ProvisionReport())
    kv = await js.key_value(config.bucket)
    key = naming.budget_definition_key(definition.name)
    try:
        stored = (await kv.get(key)).value
    except NotFoundError:
        stored = None
    written = stale(stored)
    if written:
        await kv.put(key, encoded)
    windows = await _budget_windows(js, config.bucket, definition.name)
    values: dict[str, bytes] = {}
    for wid in wanted(windows):
        try:
            values[wid] = (
                await kv.get(naming.budget_ledger_key(definition.name, wid))
            ).value or b""
        except NotFoundError:
            continue  # pruned or never written since it was listed
    return BudgetRead(written, windows, values)


async def _prune_ledgers(
    js: JetStreamContext, bucket: str, budget: str, windows: list[str]
) -> None:
    stream = naming.kv_stream(bucket)
    for wid in windows:
        await js.purge_stream(
            stream, subject=f"$KV.{bucket}." + naming.budget_ledger_key(budget, wid)
        )


async def _delete_budget(js: JetStreamContext, namespace: str, budget: str) -> list[str]:
    """Purge the definition (a marker the runtimes' watches see) and every ledger."""
    bucket = naming.budget_bucket(namespace)
    try:
        kv = await js.key_value(bucket)
    except NotFoundError:
        return []
    key = naming.budget_definition_key(budget)
    removed = []
    try:
        await kv.get(key)
    except NotFoundError:
        pass
    else:
        await kv.purge(key)
        removed.append(f"kv/{bucket}/{key}")
    windows = await _budget_windows(js, bucket, budget)
    if windows:
        await js.purge_stream(naming.kv_stream(bucket), subject=_ledger_subject(bucket, budget))
        removed += [f"kv/{bucket}/{naming.budget_ledger_key(budget, w)}" for w in windows]
    return removed


async def _defined_budgets(js: JetStreamContext, namespace: str) -> list[str]:
    """The budgets with a definition key in the namespace's bucket (purged ones included:
    their marker stays in the subject index), from one request."""
    bucket = naming.budget_bucket(namespace)
    prefix = f"$KV.{bucket}." + naming.budget_definition_key("")
    try:
        subjects = await _subject_counts(js, naming.kv_stream(bucket), prefix + "*")
    except NotFoundError:
        return []
    return sorted(subject.removeprefix(prefix) for subject in subjects)


async def _stored(js: JetStreamContext, bucket: str, key: str) -> bytes | None:
    """The key's value; None when it, or the bucket, does not exist (or was deleted)."""
    try:
        return (await (await js.key_value(bucket)).get(key)).value or b""
    except NotFoundError:
        return None


@dataclass(frozen=True)
class StoredMessage:
    """One message as a stream keeps it: headers, payload and when it was stored."""

    headers: dict[str, str]
    data: bytes
    time: datetime | None


@dataclass(frozen=True)
class ApprovalBucket:
    """A namespace's approvals bucket as the server lists it: ``last_sequence`` moves with
    every request written, so a bucket whose sequence did not move needs no read."""

    bucket: str
    namespace: str
    last_sequence: int


async def _approval_buckets(js: JetStreamContext) -> list[ApprovalBucket]:
    """Every approvals bucket on the server, read back from the stream names
    (``naming.stream_owner``), page by page."""
    found: list[ApprovalBucket] = []
    offset = 0
    while infos := await js.streams_info(offset):
        offset += len(infos)
        for info in infos:
            name = info.config.name or ""
            owner = naming.stream_owner(name)
            if owner is not None and owner.kind == "Namespace" and owner.name == "approvals":
                bucket = naming.approvals_bucket(owner.namespace)
                if naming.kv_stream(bucket) == name:
                    found.append(ApprovalBucket(bucket, owner.namespace, info.state.last_seq))
    return found


async def _chaos_namespaces(js: JetStreamContext) -> set[str]:
    """The namespaces with a chaos bucket on the server, read from the stream names."""
    found: set[str] = set()
    offset = 0
    while infos := await js.streams_info(offset):
        offset += len(infos)
        for info in infos:
            name = info.config.name or ""
            owner = naming.stream_owner(name)
            if (
                owner is not None
                and (owner.kind, owner.name) == ("Namespace", "chaos faults")
                and naming.kv_stream(naming.chaos_bucket(owner.namespace)) == name
            ):
                found.add(owner.namespace)
    return found


async def _changed_keys(
    js: JetStreamContext, bucket: str, after: int, last: int, most: int
) -> set[str] | None:
    """The keys written in sequences ``after``+1 … ``last`` (an overwritten one's sequence
    is gone, its later one is read); None when more than ``most`` sequences moved, for the
    caller to read every key instead."""
    if last - after > most:
        return None
    stream, prefix = naming.kv_stream(bucket), f"$KV.{bucket}."
    keys: set[str] = set()
    for sequence in range(after + 1, last + 1):
        try:
            message = await js.get_msg(stream, sequence)
        except NotFoundError:
            continue
        if message.subject and message.subject.startswith(prefix):
            keys.add(message.subject.removeprefix(prefix))
    return keys


async def _bucket_keys(js: JetStreamContext, bucket: str) -> set[str]:
    """Every key the bucket's subject index holds; none when it does not exist."""
    prefix = f"$KV.{bucket}."
    try:
        found = await _subject_counts(js, naming.kv_stream(bucket), f"{prefix}>")
    except NotFoundError:
        return set()
    return {subject.removeprefix(prefix) for subject in found}


async def _sync_directory(
    js: JetStreamContext,
    config: KeyValueConfig,
    key: str,
    decide: Callable[[bytes | None], bytes | None],
) -> bool:
    assert config.bucket is not None
    await ensure_bucket(js, config, ProvisionReport())
    value = decide(await _stored(js, config.bucket, key))
    if value is None:
        return False
    await (await js.key_value(config.bucket)).put(key, value)
    return True


async def _withdraw(js: JetStreamContext, bucket: str, key: str) -> list[str]:
    """Purge the key when it holds a value (the marker tells the gateway's watch)."""
    if await _stored(js, bucket, key) is None:
        return []
    await (await js.key_value(bucket)).purge(key)
    return [f"kv/{bucket}/{key}"]


async def _directory_keys(js: JetStreamContext, bucket: str, prefixes: Sequence[str]) -> list[str]:
    """The keys under ``prefixes`` the bucket's subject index holds (purged ones' markers
    included), in one request per prefix; none when the bucket does not exist."""
    subject = f"$KV.{bucket}."
    keys: list[str] = []
    try:
        for prefix in prefixes:
            found = await _subject_counts(js, naming.kv_stream(bucket), f"{subject}{prefix}>")
            keys += [s.removeprefix(subject) for s in found]
    except NotFoundError:
        return []
    return sorted(keys)


async def _forget(js: JetStreamContext, bucket: str, key: str) -> str | None:
    """A key no object owns: a value is purged (the marker tells the gateway's watch); a
    marker, seen by then, goes from the stream for good."""
    if await _stored(js, bucket, key) is not None:
        await (await js.key_value(bucket)).purge(key)
        return f"kv/{bucket}/{key}"
    await js.purge_stream(naming.kv_stream(bucket), subject=f"$KV.{bucket}.{key}")
    return None


async def _key_value(
    js: JetStreamContext, bucket: str, ttl: float | None, description: str
) -> KeyValue:
    """The bucket, created (history 1, file storage) when missing: whoever writes first
    creates it, and an existing bucket's settings are left as they are."""
    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        config = KeyValueConfig(
            bucket=bucket, history=1, storage=StorageType.FILE, ttl=ttl, description=description
        )
        try:
            return await js.create_key_value(config)
        except BadRequestError:  # made meanwhile by a gateway replica
            return await js.key_value(bucket)


async def _update_key(
    js: JetStreamContext,
    bucket: str,
    key: str,
    change: Callable[[bytes | None], bytes | None],
    description: str,
) -> bytes | None:
    """Compare-and-set: ``change`` of the stored value is written only over the revision it
    was computed from (created when absent); a concurrent writer makes it read again. None
    from ``change``: nothing to write."""
    kv = await _key_value(js, bucket, None, description)
    for _ in range(LEDGER_WRITE_ATTEMPTS):
        try:
            entry = await kv.get(key)
            stored, revision = entry.value or b"", entry.revision
        except NotFoundError:
            stored, revision = None, None
        value = change(stored)
        if value is None:
            return stored
        try:
            if revision is None:
                await kv.create(key, value)
            else:
                await kv.update(key, value, last=revision)
        except KeyWrongLastSequenceError:
            continue
        return value
    raise MessagingUnavailable(f"kv/{bucket}/{key} kept changing under the operator")


async def _file_task(
    js: JetStreamContext, bucket: str, key: str, record: bytes, ttl: float, description: str
) -> bool:
    """File a task record with KV create; False when one is filed under the key already."""
    kv = await _key_value(js, bucket, ttl, description)
    try:
        await kv.create(key, record)
    except KeyWrongLastSequenceError:
        return False
    return True


async def _ensure_subject_stream(
    js: JetStreamContext, stream: StreamConfig, consumer: ConsumerConfig
) -> ProvisionReport:
    assert stream.name is not None
    report = ProvisionReport()
    await ensure_stream(js, stream, report)
    await ensure_consumer(js, stream.name, consumer, report)
    return report


def _ssl_context(tls: TlsMaterial) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=tls.ca.decode())
    if tls.cert and tls.key:
        # load_cert_chain reads files only; the PEMs live no longer than this call.
        with tempfile.TemporaryDirectory() as directory:
            cert, key = Path(directory, "tls.crt"), Path(directory, "tls.key")
            cert.write_bytes(tls.cert)
            key.write_bytes(tls.key)
            context.load_cert_chain(cert, key)
    return context


async def _log_error(error: Exception) -> None:
    logger.warning("NATS connection error: %s", error or type(error).__name__)


@dataclass
class SubjectWatch:
    """A core-NATS subscription on one connection of the pool; it ends with the connection
    (the pool never reconnects), and the caller then subscribes again."""

    subscription: Subscription
    client: Client

    @property
    def alive(self) -> bool:
        return not self.client.is_closed

    async def close(self) -> None:
        if self.alive:
            try:
                await self.subscription.unsubscribe()
            except nats.errors.Error as error:
                logger.debug("unsubscribing failed: %s", error)


class NatsPool:
    """Connections by target, opened on first use and reopened once closed.

    Each target has a lock of its own, so one unreachable server (a connect waits up to
    ``CONNECT_TIMEOUT_SECONDS``) holds up only the passes that use it. Locks are weakly
    held: one lives while a caller holds or awaits it.
    """

    def __init__(self, default_credentials: Path | None = None) -> None:
        self._default_credentials = default_credentials
        self._connections: dict[NatsTarget, Client] = {}
        self._locks: weakref.WeakValueDictionary[NatsTarget, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    def _lock(self, target: NatsTarget) -> asyncio.Lock:
        return self._locks.setdefault(target, asyncio.Lock())

    async def _connect(self, target: NatsTarget) -> Client:
        credentials: RawCredentials | Path | None = self._default_credentials
        if target.credentials is not None:
            credentials = RawCredentials(target.credentials)
        # A dropped connection closes; the next pass opens a new one (to whichever server of
        # a cluster answers). Reconnect loops would hide an unreachable server from status
        # behind a hanging request.
        return await connect_without_retry(
            target.url,
            user_credentials=credentials,
            tls=_ssl_context(target.tls) if target.tls else None,
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            max_reconnect_attempts=1,
            reconnect_time_wait=1,
            error_cb=_log_error,
            name="troupe-operator",
        )

    async def jetstream(self, target: NatsTarget) -> JetStreamContext:
        key = target.connection
        async with self._lock(key):
            client = self._connections.get(key)
            if client is None or client.is_closed:
                client = await self._connect(key)
                self._connections[key] = client
        if not client.is_connected:
            raise MessagingUnavailable(f"disconnected from {target.url}, reconnecting")
        return ReplicatedJetStream(client, target.replicas, timeout=REQUEST_TIMEOUT_SECONDS)

    async def close(self) -> None:
        for target in list(self._connections):
            async with self._lock(target):
                client = self._connections.pop(target, None)
                if client is not None:
                    await client.close()

    async def _call(
        self, target: NatsTarget, action: Callable[[JetStreamContext], Awaitable[T]]
    ) -> T:
        """Run ``action``; NATS failing it is ``MessagingUnavailable``, but not at once.

        On a cluster, the server a connection was on may just have died (the connection
        closes) and the others take seconds to elect new leaders for its streams (requests
        time out meanwhile: nats-server's elections wait 4 to 9 s). So a failed action runs
        again, on a fresh connection to whichever server answers: once after any failure,
        and as long as each failure is a timeout, until ``RETRY_BUDGET_SECONDS`` have gone.
        A server that refuses connections fails the pass after the second try, as before.
        The actions are level-based or idempotent (publishes carry ids), so running one
        again is harmless; an Agent on a cluster that lost a server thus stays Ready."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + RETRY_BUDGET_SECONDS
        tries = 0
        while True:
            tries += 1
            try:
                return await self._attempt(target, action)
            except MessagingUnavailable as error:
                timed_out = isinstance(error.__cause__, TimeoutError | nats.errors.TimeoutError)
                if (tries > 1 and not timed_out) or loop.time() + RETRY_PAUSE_SECONDS > give_up:
                    raise
            await self._drop(target)
            await asyncio.sleep(RETRY_PAUSE_SECONDS)

    async def _attempt(
        self, target: NatsTarget, action: Callable[[JetStreamContext], Awaitable[T]]
    ) -> T:
        try:
            return await action(await self.jetstream(target))
        except MessagingUnavailable:
            raise
        except (nats.errors.Error, OSError, TimeoutError) as error:
            raise MessagingUnavailable(str(error) or type(error).__name__) from error

    async def _drop(self, target: NatsTarget) -> None:
        """Close the target's connection unless it is healthy, so the next use opens anew."""
        key = target.connection
        async with self._lock(key):
            client = self._connections.get(key)
            if client is not None and not client.is_connected:
                del self._connections[key]
                await client.close()

    async def _provision(
        self,
        target: NatsTarget,
        ensure: Callable[[JetStreamContext], Awaitable[ProvisionReport]],
        fields: SpecFields,
    ) -> ProvisionReport:
        """Run ``ensure``; a config JetStream refuses becomes ``SpecRejected`` naming its field."""

        async def provision(js: JetStreamContext) -> ProvisionReport:
            try:
                return await ensure(js)
            except ResourceRefused as refused:
                raise await _rejection(js, refused, fields) from refused

        return await self._call(target, provision)

    async def provision(
        self,
        target: NatsTarget,
        resources: AgentResources,
        fields: SpecFields,
        object_stores: Sequence[ObjectStoreConfig] = (),
    ) -> ProvisionReport:
        """Create or update the agent's streams, consumers and buckets to match ``resources``,
        and create its ``object_stores``; a refused config raises ``SpecRejected`` naming its
        field among ``fields``."""

        async def ensure(js: JetStreamContext) -> ProvisionReport:
            report = await ensure_agent_resources(js, resources)
            for store in object_stores:
                await _ensure_object_store(js, store, report)
            return report

        return await self._provision(target, ensure, fields)

    async def usage(self, target: NatsTarget, bucket: str, agent: str, now: datetime) -> AgentUsage:
        """The agent's tokens and cost over the hour before ``now``, from ``bucket``."""
        return await self._call(target, lambda js: _usage(js, bucket, agent, now))

    async def counts(self, target: NatsTarget, resources: AgentResources) -> Counts:
        """The consumers' pending, ack-pending and redelivered sums, and the dead-letter depth."""

        async def count(js: JetStreamContext) -> Counts:
            assert resources.inbox.name is not None
            consumers, last_active = await _consumer_counts(js, resources)
            depth = 0
            if resources.dead_letters is not None and resources.dead_letters.name is not None:
                depth = (await js.stream_info(resources.dead_letters.name)).state.messages
            return Counts(consumers, depth, last_active=last_active)

        return await self._call(target, count)

    async def backlog(self, target: NatsTarget, resources: AgentResources) -> Backlog:
        """The consumers' lag and last activity alone: what the autoscaler polls.

        Each ``consumer_info`` is a JetStream API request, answered by the consumer's
        leader with its current state, unlike a follower's monitoring endpoint."""

        async def read(js: JetStreamContext) -> Backlog:
            consumers, last_active = await _consumer_counts(js, resources)
            return Backlog(consumers.pending, consumers.ack_pending, last_active)

        return await self._call(target, read)

    async def watch_subject(
        self, target: NatsTarget, subject: str, wake: Callable[[], None]
    ) -> SubjectWatch:
        """Call ``wake`` whenever a message is published on ``subject`` (a core-NATS
        subscription; the message itself is never read: it stays in its stream)."""

        async def subscribe(_: JetStreamContext) -> SubjectWatch:
            client = self._connections[target]

            async def woken(_: Msg) -> None:
                wake()

            return SubjectWatch(await client.subscribe(subject, cb=woken), client)

        return await self._call(target, subscribe)

    async def delete(
        self, target: NatsTarget, resources: AgentResources, shared_streams: list[str]
    ) -> list[str]:
        """Delete the agent's own streams and the shared ones (KV buckets) nobody else uses."""

        async def delete(js: JetStreamContext) -> list[str]:
            return [
                *await delete_agent_resources(js, resources),
                *await _delete_streams(js, shared_streams),
            ]

        return await self._call(target, delete)

    async def provision_workflow(
        self, target: NatsTarget, resources: WorkflowResources, fields: SpecFields
    ) -> ProvisionReport:
        """Create or update a workflow's stream, engine consumers, runs bucket, dead letters;
        a refused config raises ``SpecRejected`` naming its field among ``fields``."""
        return await self._provision(
            target, lambda js: ensure_workflow_resources(js, resources), fields
        )

    async def runs(self, target: NatsTarget, config: EngineConfig) -> RunTally:
        """The workflow's runs by state and its latest run, in a few requests whatever the
        number of runs kept: unfinished runs are the ``active.<run>`` subjects, finished ones
        the messages on ``tally.<status>``; only the latest run's projection is read."""

        async def count(js: JetStreamContext) -> RunTally:
            stream = config.stream
            active = await _subject_counts(js, stream, config.subject("active"))
            tallies = await _subject_counts(js, stream, config.subject("tally"))
            # The newest unfinished run; with none, the run that finished last.
            latest = await _last_message(js, stream, config.subject("active"))
            if latest is None:
                finished = [
                    await _last_message(js, stream, config.tally_subject(status))
                    for status in TERMINAL_STATUSES
                ]
                latest = max((found for found in finished if found), default=None)
            return RunTally(
                running=len(active),
                succeeded=tallies.get(config.tally_subject("Succeeded"), 0),
                failed=tallies.get(config.tally_subject("Failed"), 0),
                budget_exceeded=tallies.get(config.tally_subject("BudgetExceeded"), 0),
                cancelled=tallies.get(config.tally_subject("Cancelled"), 0),
                last=await _projection(js, config, latest[1]) if latest else None,
            )

        return await self._call(target, count)

    async def delete_streams(self, target: NatsTarget, streams: list[str]) -> list[str]:
        """Delete the named streams (a KV bucket's is ``naming.kv_stream(bucket)``); return
        those that existed."""
        return await self._call(target, lambda js: _delete_streams(js, streams))

    async def sync_budget(
        self,
        target: NatsTarget,
        namespace: str,
        definition: BudgetDefinition,
        encoded: bytes,
        stale: Callable[[bytes | None], bool],
        wanted: Callable[[list[str]], list[str]],
    ) -> BudgetRead:
        """Ensure the namespace's budget bucket, write ``encoded`` as the definition when
        ``stale`` says the stored value must change, list the budget's ledgers and read
        those ``wanted`` picks."""
        return await self._call(
            target, lambda js: _sync_budget(js, namespace, definition, encoded, stale, wanted)
        )

    async def prune_ledgers(
        self, target: NatsTarget, namespace: str, budget: str, windows: list[str]
    ) -> None:
        """Remove the ledgers of ``windows`` (ended ones), leaving no tombstone."""
        bucket = naming.budget_bucket(namespace)
        await self._call(target, lambda js: _prune_ledgers(js, bucket, budget, windows))

    async def defined_budgets(self, target: NatsTarget, namespace: str) -> list[str]:
        """The budgets whose definition key the namespace's bucket holds or held."""
        return await self._call(target, lambda js: _defined_budgets(js, namespace))

    async def delete_budget(self, target: NatsTarget, namespace: str, budget: str) -> list[str]:
        """Remove a Budget's definition and ledgers; return what was removed."""
        return await self._call(target, lambda js: _delete_budget(js, namespace, budget))

    async def sync_directory(
        self,
        target: NatsTarget,
        config: KeyValueConfig,
        key: str,
        decide: Callable[[bytes | None], bytes | None],
    ) -> bool:
        """Ensure the directory bucket ``config``, then put what ``decide`` makes of the
        key's stored value (None: nothing); return whether it wrote."""
        return await self._call(target, lambda js: _sync_directory(js, config, key, decide))

    async def withdraw(self, target: NatsTarget, bucket: str, key: str) -> list[str]:
        """Purge ``key`` of ``bucket`` when it holds a value; return what was removed."""
        return await self._call(target, lambda js: _withdraw(js, bucket, key))

    async def directory_keys(
        self, target: NatsTarget, bucket: str, prefixes: Sequence[str]
    ) -> list[str]:
        """The keys under ``prefixes`` in ``bucket``, markers of purged ones included."""
        return await self._call(target, lambda js: _directory_keys(js, bucket, prefixes))

    async def forget(self, target: NatsTarget, bucket: str, key: str) -> str | None:
        """Remove a key no object owns, its purge marker first; what was purged, if a value."""
        return await self._call(target, lambda js: _forget(js, bucket, key))

    async def read_key(self, target: NatsTarget, bucket: str, key: str) -> bytes | None:
        """The key's value; None when it or the bucket does not exist."""
        return await self._call(target, lambda js: _stored(js, bucket, key))

    async def update_key(
        self,
        target: NatsTarget,
        bucket: str,
        key: str,
        change: Callable[[bytes | None], bytes | None],
        description: str,
    ) -> bytes | None:
        """Write ``change`` of the stored value with a revision check (the bucket created
        when missing); returns the value now stored."""
        return await self._call(
            target, lambda js: _update_key(js, bucket, key, change, description)
        )

    async def file_task(
        self,
        target: NatsTarget,
        bucket: str,
        key: str,
        record: bytes,
        ttl: float,
        description: str,
    ) -> bool:
        """KV create of a task record; False when the key holds one already."""
        return await self._call(
            target, lambda js: _file_task(js, bucket, key, record, ttl, description)
        )

    async def publish(
        self, target: NatsTarget, subject: str, headers: dict[str, str], payload: bytes
    ) -> None:
        """Publish and wait until a stream stored it (``publish.NoStream`` when none will)."""

        async def send(js: JetStreamContext) -> None:
            await publish_stored(js, subject, payload, headers)

        await self._call(target, send)

    async def approval_buckets(self, target: NatsTarget) -> list[ApprovalBucket]:
        """Every namespace's approvals bucket on ``target``, with its last sequence."""
        return await self._call(target, _approval_buckets)

    async def chaos_namespaces(self, target: NatsTarget) -> set[str]:
        """Every namespace with a chaos bucket on ``target``."""
        return await self._call(target, _chaos_namespaces)

    async def changed_keys(
        self, target: NatsTarget, bucket: str, after: int, last: int, most: int
    ) -> set[str] | None:
        """Keys written after sequence ``after``, up to ``last``; None past ``most``."""
        return await self._call(target, lambda js: _changed_keys(js, bucket, after, last, most))

    async def bucket_keys(self, target: NatsTarget, bucket: str) -> set[str]:
        """Every key of ``bucket``."""
        return await self._call(target, lambda js: _bucket_keys(js, bucket))

    async def provision_subject_stream(
        self, target: NatsTarget, stream: StreamConfig, consumer: ConsumerConfig, field: str
    ) -> ProvisionReport:
        """Create or update a subject Trigger's stream and relay consumer; a refusal (the
        subject stored by another stream) raises ``SpecRejected`` naming ``field``."""
        assert stream.name is not None
        fields = SpecFields(
            resources={}, subjects=dict.fromkeys(stream.subjects or [], field), default=field
        )
        return await self._provision(
            target, lambda js: _ensure_subject_stream(js, stream, consumer), fields
        )

    async def last_messages(
        self, target: NatsTarget, stream: str, subjects: Sequence[str]
    ) -> dict[str, StoredMessage]:
        """The last message ``stream`` holds on each of ``subjects`` (those it holds one on):
        a ChaosExperiment's probe answers."""

        async def read(js: JetStreamContext) -> dict[str, StoredMessage]:
            found: dict[str, StoredMessage] = {}
            for subject in subjects:
                try:
                    message = await js.get_last_msg(stream, subject)
                except NotFoundError:
                    continue
                found[subject] = StoredMessage(
                    dict(message.headers or {}), message.data or b"", message.time
                )
            return found

        return await self._call(target, read)

    async def stream_messages(self, target: NatsTarget, stream: str) -> int:
        """How many messages ``stream`` holds; 0 when it does not exist."""

        async def count(js: JetStreamContext) -> int:
            try:
                return int((await js.stream_info(stream)).state.messages)
            except NotFoundError:
                return 0

        return await self._call(target, count)
