"""Apply an agent's JetStream resources idempotently, correcting drift.

Level-based, like a Kubernetes controller: read what exists, compare it with
what ``troupe_runtime.contract.agent_resources`` builds, and create or update only what
differs. Running it twice changes nothing the second time.

Replicas come from the context (``troupe_runtime.nats.replicas``): a stream or bucket with
fewer than it asks for is raised to it, one with more is left alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, KeyValueConfig, StorageType, StreamConfig
from nats.js.errors import APIError, NotFoundError

from troupe_runtime.contract import naming
from troupe_runtime.contract.agent_resources import AgentResources
from troupe_runtime.contract.workflow_resources import WorkflowResources
from troupe_runtime.nats.replicas import replicas_of


@dataclass
class ProvisionReport:
    """What one pass created or updated, by name."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated)


# JetStream errors that say the server cannot serve now, whatever the config (besides
# every 503): no peers for placement while a cluster forms, no meta leader, a RAFT error.
UNAVAILABLE_ERROR_CODES = frozenset({10005, 10009, 10041})


def refuses_config(error: APIError) -> bool:
    """Whether the server refused the config itself (a person must change it), as opposed
    to being unable to serve the request now."""
    return (
        error.err_code is not None
        and error.code != 503
        and error.err_code not in UNAVAILABLE_ERROR_CODES
    )


class ResourceRefused(Exception):
    """JetStream refused the config of one resource (``stream/NAME``, ``consumer/STREAM/NAME``,
    ``bucket/NAME``): retrying the same config cannot help."""

    def __init__(self, resource: str, subjects: list[str], error: APIError) -> None:
        super().__init__(f"{resource}: {error.description} (JetStream error {error.err_code})")
        self.resource = resource
        self.subjects = subjects
        self.error = error


@asynccontextmanager
async def _refusal_of(resource: str, subjects: list[str] | None = None) -> AsyncIterator[None]:
    try:
        yield
    except APIError as error:
        if not refuses_config(error):
            raise
        raise ResourceRefused(resource, subjects or [], error) from error


def drifted(desired: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """The keys whose desired value (when set) differs from the server's."""
    return sorted(
        key for key, value in desired.items() if value is not None and actual.get(key) != value
    )


async def ensure_stream(
    js: JetStreamContext, config: StreamConfig, report: ProvisionReport
) -> None:
    assert config.name is not None
    resource = f"stream/{config.name}"
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        async with _refusal_of(resource, config.subjects):
            await js.add_stream(config)
        report.created.append(resource)
        return
    if drifted(config.as_dict(), info.config.as_dict()) or too_few_replicas(js, info.config):
        # Never fewer replicas than the stream has (see the module's docstring).
        kept = config.evolve(
            num_replicas=max(info.config.num_replicas or 1, config.num_replicas or 1)
        )
        async with _refusal_of(resource, config.subjects):
            await js.update_stream(kept)
        report.updated.append(resource)


def too_few_replicas(js: JetStreamContext, actual: StreamConfig) -> bool:
    """Whether a stream has fewer replicas than the context gives what it creates."""
    return (actual.num_replicas or 1) < replicas_of(js)


async def ensure_consumer(
    js: JetStreamContext, stream: str, config: ConsumerConfig, report: ProvisionReport
) -> None:
    assert config.durable_name is not None
    resource = f"consumer/{stream}/{config.durable_name}"
    try:
        info = await js.consumer_info(stream, config.durable_name)
    except NotFoundError:
        async with _refusal_of(resource):
            await js.add_consumer(stream, config)
        report.created.append(resource)
        return
    if drifted(config.as_dict(), info.config.as_dict()):
        # Creating a durable consumer that exists updates its editable settings.
        async with _refusal_of(resource):
            await js.add_consumer(stream, config)
        report.updated.append(resource)


async def ensure_bucket(
    js: JetStreamContext, config: KeyValueConfig, report: ProvisionReport
) -> None:
    stream = naming.kv_stream(config.bucket)
    resource = f"bucket/{config.bucket}"
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        async with _refusal_of(resource):
            await js.create_key_value(config)
        report.created.append(resource)
        return
    # A bucket's TTL is its stream's max age (0: none).
    max_age = config.ttl or 0.0
    actual_age = info.config.max_age or 0.0
    if (
        info.config.max_msgs_per_subject != config.history
        or actual_age != max_age
        or too_few_replicas(js, info.config)
    ):
        changed = {"max_msgs_per_subject": config.history, "max_age": int(max_age * 1e9)}
        async with _refusal_of(resource):
            await js.update_stream(StreamConfig.from_response({**info.config.as_dict(), **changed}))
        report.updated.append(resource)


def budget_bucket_config(namespace: str) -> KeyValueConfig:
    """The one config of a namespace's budget bucket, for the operator (which provisions it)
    and the runtimes (which create it if it is missing, so they can watch it): history 1
    (a ledger's past values are of no use), file storage (a restart loses nothing), no TTL
    (a month's ledger must outlive the month's last call)."""
    return KeyValueConfig(
        bucket=naming.budget_bucket(namespace), history=1, storage=StorageType.FILE
    )


def chaos_bucket_config(namespace: str) -> KeyValueConfig:
    """The one config of a namespace's chaos bucket, for the operator (which writes faults)
    and the runtimes (which create it if missing, so they can watch it): history 1, file
    storage; each entry also carries its own ``until``, so a stale one injects nothing."""
    return KeyValueConfig(
        bucket=naming.chaos_bucket(namespace), history=1, storage=StorageType.FILE
    )


async def ensure_agent_resources(
    js: JetStreamContext, resources: AgentResources
) -> ProvisionReport:
    """Create or update every resource of one agent; return what changed."""
    report = ProvisionReport()
    await ensure_stream(js, resources.inbox, report)
    assert resources.inbox.name is not None
    for consumer in resources.consumers:
        await ensure_consumer(js, resources.inbox.name, consumer, report)
    await ensure_stream(js, resources.advisories, report)
    assert resources.advisories.name is not None
    await ensure_consumer(js, resources.advisories.name, resources.rescuer, report)
    if resources.dead_letters is not None:
        await ensure_stream(js, resources.dead_letters, report)
    await ensure_stream(js, resources.event_log, report)
    for bucket in resources.buckets:
        await ensure_bucket(js, bucket, report)
    if resources.sessions is not None:
        await ensure_bucket(js, resources.sessions, report)
    return report


async def delete_agent_resources(js: JetStreamContext, resources: AgentResources) -> list[str]:
    """Remove an agent's own streams (inbox, advisories, dead letters) and its session
    bucket; shared buckets and logs stay."""
    names = [
        stream.name
        for stream in (resources.inbox, resources.advisories, resources.dead_letters)
        if stream is not None and stream.name is not None
    ]
    if resources.sessions is not None:
        names.append(naming.kv_stream(resources.sessions.bucket))
    deleted = []
    for name in names:
        try:
            await js.delete_stream(name)
        except NotFoundError:
            continue
        deleted.append(f"stream/{name}")
    return deleted


async def ensure_workflow_resources(
    js: JetStreamContext, resources: WorkflowResources
) -> ProvisionReport:
    """Create or update every resource of one workflow's engine; return what changed."""
    report = ProvisionReport()
    await ensure_stream(js, resources.stream, report)
    assert resources.stream.name is not None
    for consumer in resources.consumers:
        await ensure_consumer(js, resources.stream.name, consumer, report)
    await ensure_bucket(js, resources.runs, report)
    if resources.dead_letters is not None:
        await ensure_stream(js, resources.dead_letters, report)
    if resources.approvals is not None:
        await ensure_bucket(js, resources.approvals, report)
    return report
