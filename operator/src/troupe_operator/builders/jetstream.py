"""Pure JetStream decisions of the operator: shared settings, orphans, and which spec field
a JetStream resource's settings come from.

KV buckets are per namespace and shared by every Agent declaring the same name
(``troupe_runtime.contract.naming.kv_bucket``), as are the namespace's event log and its
global rate-limit bucket. A shared bucket's settings are the namespace's, not one Agent's:
every declarer provisions it alike (``shared_buckets``), so two Agents never undo each
other on resync; each shared resource goes only with the last Agent that uses it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nats.js.api import KeyValueConfig, ObjectStoreConfig, StorageType

from troupe_operator.api import AgentSpec
from troupe_runtime.contract import naming
from troupe_runtime.contract.agent_resources import AgentResources, rate_limit_bucket_config
from troupe_runtime.contract.workflow_resources import WorkflowResources

USAGE_TTL_SECONDS = 2 * 3600.0
"""How long a minute's usage record lives: the Agent status sums the last hour."""
OBJECT_STORE_PREFIX = "OBJ_"
"""The stream JetStream keeps an Object Store bucket in."""


def _uses_global_rate_limit(spec: AgentSpec) -> bool:
    return spec.rate_limit is not None and spec.rate_limit.scope == "global"


def _is_llm_agent(spec: AgentSpec) -> bool:
    return spec.llm is not None


def _uses_rate_limit_bucket(spec: AgentSpec) -> bool:
    """A global rate limit, or an LLM agent: its providers' rpm/tpm limits are kept there,
    shared by every agent using the provider (without the bucket each replica would keep
    its own, and N agents would spend N times the provider's limit)."""
    return _uses_global_rate_limit(spec) or _is_llm_agent(spec)


def usage_bucket(namespace: str) -> KeyValueConfig:
    """The namespace's LLM usage counters, one key per agent, provider, model and minute."""
    return KeyValueConfig(
        bucket=naming.usage_bucket(namespace), ttl=USAGE_TTL_SECONDS, storage=StorageType.FILE
    )


def llm_object_stores(namespace: str, spec: AgentSpec) -> list[ObjectStoreConfig]:
    """The Object Store an LLM agent offloads large tool results to (shared per namespace)."""
    if not _is_llm_agent(spec):
        return []
    return [
        ObjectStoreConfig(
            bucket=naming.llm_object_store(namespace),
            description=f"Large tool results of the LLM agents of namespace {namespace}",
            storage=StorageType.FILE,
        )
    ]


def with_llm(resources: AgentResources, namespace: str, spec: AgentSpec) -> AgentResources:
    """An LLM agent's resources: the namespace's usage bucket too, which it writes to, and
    its rate-limit bucket, where the providers' limits are shared. (Its inbox consumers'
    extra deliveries for 429 deferrals are the contract's,
    ``agent_resources.max_deliveries``.)"""
    if not _is_llm_agent(spec):
        return resources
    limits = rate_limit_bucket_config(namespace)
    buckets = [b for b in resources.buckets if b.bucket != limits.bucket]
    return dataclasses.replace(resources, buckets=[*buckets, limits, usage_bucket(namespace)])


def orphaned_streams(
    namespace: str, spec: AgentSpec, others: Sequence[AgentSpec], budgets_staying: bool = False
) -> list[str]:
    """Streams of shared resources ``spec`` uses that none of ``others`` (staying Agents) use.

    The budget bucket, which every LLM agent's runtime watches (and creates if it must),
    goes with the last LLM agent unless a Budget stays (``budgets_staying``); the last
    Budget's deletion takes it when no LLM agent stays (``reconcilers.budget``). The chaos
    bucket, which every runtime watches (and creates if it must, ``agent.chaos``), goes with
    the namespace's last Agent: nothing is left to inject faults into, and the operator
    makes it again when an experiment next writes (``reconcilers.chaos``)."""
    kept = {bucket.name for other in others for bucket in other.state}
    streams = [
        naming.kv_stream(naming.kv_bucket(namespace, bucket.name))
        for bucket in spec.state
        if bucket.name not in kept
    ]
    if _uses_rate_limit_bucket(spec) and not any(map(_uses_rate_limit_bucket, others)):
        streams.append(naming.kv_stream(naming.rate_limit_bucket(namespace)))
    if _is_llm_agent(spec) and not any(map(_is_llm_agent, others)):
        streams.append(naming.kv_stream(naming.usage_bucket(namespace)))
        streams.append(OBJECT_STORE_PREFIX + naming.llm_object_store(namespace))
        if not budgets_staying:
            streams.append(naming.kv_stream(naming.budget_bucket(namespace)))
    if not others:
        streams.append(naming.kv_stream(naming.chaos_bucket(namespace)))
        streams.append(naming.event_log_stream(namespace))
    return streams


def shared_buckets(namespace: str, declarers: Sequence[AgentSpec]) -> dict[str, KeyValueConfig]:
    """The namespace's config of each state bucket, by bucket name: the most history any
    declarer asks for, whatever the order the Agents are listed in."""
    history: dict[str, int] = {}
    for spec in declarers:
        for bucket in spec.state:
            history[bucket.name] = max(history.get(bucket.name, 1), bucket.history)
    return {
        name: KeyValueConfig(
            bucket=naming.kv_bucket(namespace, name), history=kept, storage=StorageType.FILE
        )
        for name, kept in history.items()
    }


def with_shared_buckets(
    resources: AgentResources, namespace: str, spec: AgentSpec, others: Sequence[AgentSpec]
) -> AgentResources:
    """The agent's resources with its state buckets configured as the namespace shares them
    with ``others`` (the namespace's other Agents)."""
    shared = {
        config.bucket: config for config in shared_buckets(namespace, [spec, *others]).values()
    }
    return dataclasses.replace(
        resources, buckets=[shared.get(bucket.bucket, bucket) for bucket in resources.buckets]
    )


@dataclass(frozen=True)
class SpecFields:
    """Which spec field a JetStream resource's settings come from, so that a refusal names
    what to change. ``resources`` maps ``stream/NAME``, ``consumer/STREAM/NAME`` or
    ``bucket/NAME`` to the field of each config key the server may name in its error
    (``""``: any other key); ``subjects`` maps each subject to its field."""

    resources: Mapping[str, Mapping[str, str]]
    subjects: Mapping[str, str]
    default: str

    def of_subject(self, subject: str) -> str:
        return self.subjects.get(subject, self.default)

    def of_refusal(self, resource: str, description: str) -> str:
        """The field behind the server's refusal ``description`` of ``resource``."""
        fields = self.resources.get(resource, {})
        for key, field in fields.items():
            if key and key in description:
                return field
        return fields.get("", self.default)


def agent_spec_fields(namespace: str, resources: AgentResources, spec: AgentSpec) -> SpecFields:
    """Where each of an Agent's JetStream settings comes from in its spec."""
    consumer_fields = {
        "ack_wait": "spec.messaging.ackWait",
        "max_deliver": "spec.retry.maxAttempts",
        "max_ack_pending": "spec.messaging.maxInFlight",
        "": "spec.messaging",
    }
    inbox = resources.inbox.name
    retention = {"max_age": "spec.deadLetter.retention", "": "spec.deadLetter"}
    fields: dict[str, Mapping[str, str]] = {
        f"stream/{inbox}": {"": "spec.messaging.priorityLevels"},
        f"stream/{resources.advisories.name}": retention,
        f"consumer/{resources.advisories.name}/{resources.rescuer.durable_name}": {
            "": "spec.messaging.ackWait"
        },
        f"stream/{resources.event_log.name}": {"": "metadata.namespace"},
    }
    for consumer in resources.consumers:
        fields[f"consumer/{inbox}/{consumer.durable_name}"] = consumer_fields
    if resources.dead_letters is not None:
        fields[f"stream/{resources.dead_letters.name}"] = retention
    for index, bucket in enumerate(spec.state):
        bucket_field = f"spec.state[{index}]"
        fields.setdefault(
            f"bucket/{naming.kv_bucket(namespace, bucket.name)}",
            {"history": f"{bucket_field}.history", "": f"{bucket_field}.name"},
        )
    fields[f"bucket/{naming.rate_limit_bucket(namespace)}"] = {"": "spec.rateLimit.scope"}
    fields[f"bucket/{naming.usage_bucket(namespace)}"] = {"": "spec.llm"}
    fields[f"objects/{naming.llm_object_store(namespace)}"] = {"": "spec.llm"}
    if resources.sessions is not None:
        fields[f"bucket/{resources.sessions.bucket}"] = {"": "spec.llm.session.retention"}

    return SpecFields(fields, {}, "metadata.name")


def workflow_spec_fields(resources: WorkflowResources) -> SpecFields:
    """Where each of a Workflow's JetStream settings comes from in its spec: the trigger
    is the one subject a person chose; the others follow from the names."""
    retention = {
        "max_age": "spec.retention.maxAge",
        "duplicate_window": "spec.retention.maxAge",
        "subject": "spec.trigger.subject",
        "": "spec.trigger.subject",
    }
    stream = resources.stream.name
    fields: dict[str, Mapping[str, str]] = {
        f"stream/{stream}": retention,
        f"bucket/{resources.runs.bucket}": {"": "spec.retention.maxAge"},
    }
    for consumer in resources.consumers:
        fields[f"consumer/{stream}/{consumer.durable_name}"] = {
            "max_ack_pending": "spec.maxConcurrentRuns",
            "": "spec.trigger.subject",
        }
    if resources.dead_letters is not None:
        fields[f"stream/{resources.dead_letters.name}"] = {"": "spec.deadLetter.retention"}
    if resources.approvals is not None:
        fields[f"bucket/{resources.approvals.bucket}"] = {"": "spec.steps"}
    subjects = resources.stream.subjects or []
    return SpecFields(fields, dict.fromkeys(subjects[:1], "spec.trigger.subject"), "metadata.name")
