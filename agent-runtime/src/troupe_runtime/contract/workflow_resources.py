"""Pure builders: a workflow's engine config → the JetStream resources it needs.

One stream holds the trigger subject (plus ``…workflows.<name>.start.<run>``, which
``troupe run`` publishes to without knowing the user's trigger subject), every
run's event log, the agents' replies and the results, the engine's lease, one
``active.<run>`` marker per unfinished run and the tallies of finished runs; two
durable consumers feed the engine triggers and replies; a KV bucket keeps each
run's projection. ``retention.maxAge`` bounds the stream and the bucket alike.

A workflow with an approval step also needs its namespace's approvals bucket
(``approvals.approvals_bucket_config``): provisioned with the workflow's resources, but
the namespace's, shared by every requester in it, so deleting the workflow leaves it.
Decisions come back on ``approve.<run>``, which the stream keeps and the replies consumer
takes, like cancels.
"""

from __future__ import annotations

from dataclasses import dataclass

from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from troupe_runtime.contract import approvals, naming
from troupe_runtime.contract.agent_resources import DUPLICATE_WINDOW_SECONDS
from troupe_runtime.contract.engine_config import EngineConfig

# Handling a trigger or a reply takes milliseconds; a crashed engine's messages
# come back to its successor this soon.
ENGINE_ACK_WAIT_SECONDS = 5.0


@dataclass(frozen=True)
class WorkflowResources:
    stream: StreamConfig
    consumers: list[ConsumerConfig]
    runs: KeyValueConfig
    dead_letters: StreamConfig | None
    approvals: KeyValueConfig | None = None
    """The namespace's approvals bucket, when a step waits for people; never deleted with
    the workflow."""


def build_workflow_stream(config: EngineConfig) -> StreamConfig:
    return StreamConfig(
        name=config.stream,
        subjects=[
            config.trigger_subject,
            config.subject("start"),
            config.subject("events"),
            config.subject("replies"),
            config.subject("results"),
            config.subject("lease"),
            config.subject("active"),
            config.subject("tally"),
            config.subject("cancel"),
            config.subject("approve"),
        ],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=config.retention.max_age.total_seconds(),
        # The server refuses a duplicate window longer than the stream's max age.
        duplicate_window=min(DUPLICATE_WINDOW_SECONDS, config.retention.max_age.total_seconds()),
        description=f"Runs of workflow {config.namespace}/{config.workflow}",
    )


def build_engine_consumers(config: EngineConfig) -> list[ConsumerConfig]:
    def consumer(name: str, subjects: list[str], max_ack_pending: int) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=name,
            filter_subjects=subjects,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ENGINE_ACK_WAIT_SECONDS,
            max_ack_pending=max_ack_pending,
        )

    return [
        # At most maxConcurrentRuns triggers are taken but not yet started.
        consumer(
            naming.TRIGGERS_CONSUMER,
            [config.trigger_subject, config.subject("start")],
            config.max_concurrent_runs,
        ),
        # Cancels and approval decisions come with the replies: never held back by a full
        # triggers consumer, and an existing consumer's filter is updated in place
        # (provision.ensure_consumer).
        consumer(
            naming.REPLIES_CONSUMER,
            [config.subject("replies"), config.subject("cancel"), config.subject("approve")],
            10_000,
        ),
    ]


def build_runs_bucket(config: EngineConfig) -> KeyValueConfig:
    return KeyValueConfig(
        bucket=config.runs_bucket,
        history=1,
        storage=StorageType.FILE,
        ttl=config.retention.max_age.total_seconds(),
    )


def build_workflow_dead_letters(config: EngineConfig) -> StreamConfig | None:
    if not config.dead_letter.enabled:
        return None
    return StreamConfig(
        name=config.dead_letter_stream,
        subjects=[config.subject("failed")],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=config.dead_letter.retention.total_seconds(),
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
    )


def build_workflow_resources(config: EngineConfig) -> WorkflowResources:
    return WorkflowResources(
        stream=build_workflow_stream(config),
        consumers=build_engine_consumers(config),
        runs=build_runs_bucket(config),
        dead_letters=build_workflow_dead_letters(config),
        approvals=approvals.approvals_bucket_config(config.namespace)
        if config.has_approvals
        else None,
    )
