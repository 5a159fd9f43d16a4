"""Pure builders: an agent's runtime config → the JetStream resources it needs.

The operator applies these (``troupe_runtime.nats.provision``); tests of the runtime
apply the very same ones, so both agree on every stream and consumer setting.
"""

from __future__ import annotations

from dataclasses import dataclass

from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from troupe_runtime.contract import naming
from troupe_runtime.contract.advisories import MAX_ADVISORY_BYTES
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.llm import MAX_DEFERRALS

DUPLICATE_WINDOW_SECONDS = 120.0
EVENT_LOG_MAX_AGE_SECONDS = 7 * 24 * 3600.0
# Advisories waiting to be rescued or looked at again; a flood pushes out the oldest.
ADVISORY_MAX_MSGS = 10_000


@dataclass(frozen=True)
class AgentResources:
    """Everything one agent needs in JetStream."""

    inbox: StreamConfig
    consumers: list[ConsumerConfig]
    advisories: StreamConfig
    rescuer: ConsumerConfig
    dead_letters: StreamConfig | None
    buckets: list[KeyValueConfig]
    event_log: StreamConfig
    sessions: KeyValueConfig | None = None
    """The Agent's own session bucket (``spec.llm.session``), deleted with it."""


def approvals_subjects(config: RuntimeConfig) -> list[str]:
    """An LLM agent's ``naming.agent_approvals_subject``, where the decisions on its tool
    calls arrive (whatever its approval rules say now: a call parked under an earlier rule
    still needs its decision); none for any other agent."""
    if config.llm is None:
        return []
    return [naming.agent_approvals_subject(config.namespace, config.agent)]


def inbox_subjects(config: RuntimeConfig) -> list[str]:
    """Exactly the declared priority levels (and an LLM agent's approvals subject): a
    publish to any other subject under the inbox gets "no responders" at once, instead of
    being stored where no consumer ever reads it."""
    levels = config.messaging.priority_levels
    return [config.inbox_subject(priority) for priority in range(levels)] + approvals_subjects(
        config
    )


def build_inbox_stream(config: RuntimeConfig) -> StreamConfig:
    """A work queue: a message leaves the inbox once a replica acknowledged it."""
    return StreamConfig(
        name=config.inbox_stream,
        subjects=inbox_subjects(config),
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
        description=f"Inbox of agent {config.namespace}/{config.agent}",
    )


def max_deferrals(config: RuntimeConfig) -> int:
    """429 deferrals a message may take: only an LLM agent defers (``DeferMessage``)."""
    return MAX_DEFERRALS if config.llm is not None else 0


def max_deliveries(config: RuntimeConfig) -> int:
    """The inbox consumers' ``max_deliver``: every attempt, every deferral, and one more,
    on which the replica that gets it dead-letters the message (its earlier deliveries
    crashed or hung), with no advisory needed."""
    return config.retry.max_attempts + max_deferrals(config) + 1


def build_consumer(config: RuntimeConfig, priority: int, replicas: int) -> ConsumerConfig:
    """The durable pull consumer for one priority level, shared by all replicas; an LLM
    agent's priority 0 takes its approvals subject too.

    The retry backoff is applied by the runtime (NAK with a delay), not by the
    server's ``backoff`` list: a server backoff replaces ``ack_wait`` even for
    the first delivery, which would cut slow handlers short. ``ack_wait`` stays
    the bound on how long a crashed replica holds a message.
    """
    subjects = [config.inbox_subject(priority)]
    if priority == 0:  # decisions resume conversations: they go first
        subjects += approvals_subjects(config)
    return ConsumerConfig(
        durable_name=config.consumer_name(priority),
        filter_subject=subjects[0] if len(subjects) == 1 else None,
        filter_subjects=subjects if len(subjects) > 1 else None,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=config.messaging.ack_wait.total_seconds(),
        max_deliver=max_deliveries(config),
        max_ack_pending=config.messaging.max_in_flight * max(replicas, 1),
        description=f"Priority {priority} of agent {config.namespace}/{config.agent}",
    )


def build_advisory_stream(config: RuntimeConfig) -> StreamConfig:
    """A work queue of the inbox's MAX_DELIVERIES advisories, kept until a replica
    rescues the message they name (the server publishes them only once).

    Anyone allowed to publish there can, so it is bounded: messages larger than an
    advisory are refused, and past ``ADVISORY_MAX_MSGS`` the oldest go first.
    """
    return StreamConfig(
        name=naming.advisory_stream(config.namespace, config.agent),
        subjects=[naming.max_deliveries_advisory(config.inbox_stream, "*")],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        max_msgs=ADVISORY_MAX_MSGS,
        max_bytes=ADVISORY_MAX_MSGS * MAX_ADVISORY_BYTES,
        max_msg_size=MAX_ADVISORY_BYTES,
        discard=DiscardPolicy.OLD,
        max_age=config.dead_letter.retention.total_seconds(),
        duplicate_window=DUPLICATE_WINDOW_SECONDS,  # the server's default, so no drift
        description=f"Undeliverable-message advisories of agent {config.namespace}/{config.agent}",
    )


def build_rescuer(config: RuntimeConfig) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=naming.RESCUER_CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=config.messaging.ack_wait.total_seconds(),
    )


def build_dead_letter_stream(config: RuntimeConfig) -> StreamConfig | None:
    if not config.dead_letter.enabled:
        return None
    return StreamConfig(
        name=config.dead_letter_stream,
        subjects=[config.dead_letter_subject],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=config.dead_letter.retention.total_seconds(),
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
        description=f"Dead letters of agent {config.namespace}/{config.agent}",
    )


def rate_limit_bucket_config(namespace: str) -> KeyValueConfig:
    """The namespace's shared rate-limit bucket: global agent limits and provider limits."""
    return KeyValueConfig(bucket=naming.rate_limit_bucket(namespace))


def build_buckets(config: RuntimeConfig) -> list[KeyValueConfig]:
    buckets = [
        KeyValueConfig(bucket=config.bucket(b.name), history=b.history, storage=StorageType.FILE)
        for b in config.state
    ]
    if config.rate_limit is not None and config.rate_limit.scope == "global":
        buckets.append(rate_limit_bucket_config(config.namespace))
    return buckets


def session_bucket_config(config: RuntimeConfig) -> KeyValueConfig | None:
    """The bucket of an LLM agent's sessions, when they are on: history 1 (a session's past
    values are of no use, and its writes are compare-and-set), TTL the retention (a session
    is forgotten that long after its last write), file storage (a restart loses nothing)."""
    policy = config.llm.policy.sessions() if config.llm is not None else None
    if policy is None:
        return None
    return KeyValueConfig(
        bucket=naming.session_bucket(config.namespace, config.agent),
        history=1,
        ttl=policy.retention.total_seconds(),
        storage=StorageType.FILE,
        description=f"Sessions of agent {config.namespace}/{config.agent}",
    )


def build_event_log_stream(namespace: str) -> StreamConfig:
    """Per-namespace append-only event logs, one subject per correlation id."""
    return StreamConfig(
        name=naming.event_log_stream(namespace),
        subjects=[naming.event_log_subject(namespace, "*")],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=EVENT_LOG_MAX_AGE_SECONDS,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
    )


def build_agent_resources(config: RuntimeConfig, replicas: int = 1) -> AgentResources:
    return AgentResources(
        inbox=build_inbox_stream(config),
        consumers=[
            build_consumer(config, priority, replicas)
            for priority in range(config.messaging.priority_levels)
        ],
        advisories=build_advisory_stream(config),
        rescuer=build_rescuer(config),
        dead_letters=build_dead_letter_stream(config),
        buckets=build_buckets(config),
        event_log=build_event_log_stream(config.namespace),
        sessions=session_bucket_config(config),
    )
