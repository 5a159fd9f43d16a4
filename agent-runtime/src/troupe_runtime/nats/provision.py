"""Apply an agent's JetStream resources idempotently, correcting drift.

Level-based, like a Kubernetes controller: read what exists, compare it with
what ``troupe_runtime.contract.agent_resources`` builds, and create or update only what
differs. Running it twice changes nothing the second time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, KeyValueConfig, StreamConfig
from nats.js.errors import NotFoundError

from troupe_runtime.contract import naming
from troupe_runtime.contract.agent_resources import AgentResources
from troupe_runtime.contract.workflow_resources import WorkflowResources


@dataclass
class ProvisionReport:
    """What one pass created or updated, by name."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated)


def drifted(desired: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """The keys whose desired value (when set) differs from the server's."""
    return sorted(
        key for key, value in desired.items() if value is not None and actual.get(key) != value
    )


async def ensure_stream(
    js: JetStreamContext, config: StreamConfig, report: ProvisionReport
) -> None:
    assert config.name is not None
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)
        report.created.append(f"stream/{config.name}")
        return
    if drifted(config.as_dict(), info.config.as_dict()):
        await js.update_stream(config)
        report.updated.append(f"stream/{config.name}")


async def ensure_consumer(
    js: JetStreamContext, stream: str, config: ConsumerConfig, report: ProvisionReport
) -> None:
    assert config.durable_name is not None
    try:
        info = await js.consumer_info(stream, config.durable_name)
    except NotFoundError:
        await js.add_consumer(stream, config)
        report.created.append(f"consumer/{stream}/{config.durable_name}")
        return
    if drifted(config.as_dict(), info.config.as_dict()):
        # Creating a durable consumer that exists updates its editable settings.
        await js.add_consumer(stream, config)
        report.updated.append(f"consumer/{stream}/{config.durable_name}")


async def ensure_bucket(
    js: JetStreamContext, config: KeyValueConfig, report: ProvisionReport
) -> None:
    stream = naming.kv_stream(config.bucket)
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        await js.create_key_value(config)
        report.created.append(f"bucket/{config.bucket}")
        return
    # A bucket's TTL is its stream's max age (0: none).
    max_age = config.ttl or 0.0
    actual_age = info.config.max_age or 0.0
    if info.config.max_msgs_per_subject != config.history or actual_age != max_age:
        changed = {"max_msgs_per_subject": config.history, "max_age": int(max_age * 1e9)}
        await js.update_stream(StreamConfig.from_response({**info.config.as_dict(), **changed}))
        report.updated.append(f"bucket/{config.bucket}")


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
    return report


async def delete_agent_resources(js: JetStreamContext, resources: AgentResources) -> list[str]:
    """Remove an agent's own streams (inbox, advisories, dead letters); shared buckets
    and logs stay."""
    deleted = []
    for stream in (resources.inbox, resources.advisories, resources.dead_letters):
        if stream is None or stream.name is None:
            continue
        try:
            await js.delete_stream(stream.name)
        except NotFoundError:
            continue
        deleted.append(f"stream/{stream.name}")
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
    return report
