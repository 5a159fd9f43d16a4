"""The runtime's configuration: what the operator writes into an agent's ConfigMap.

It embeds the Agent's declared policies (``troupe_runtime.contract.policies``) and adds
what the operator resolved: NATS names, credentials paths, the health port.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from pydantic import Field

from troupe_runtime.contract import naming
from troupe_runtime.contract.durations import Duration
from troupe_runtime.contract.llm import LlmRuntime
from troupe_runtime.contract.nats_servers import MAX_REPLICAS
from troupe_runtime.contract.pod import DEFAULT_HEALTH_PORT
from troupe_runtime.contract.policies import (
    Contract,
    DeadLetterPolicy,
    Handler,
    Messaging,
    RateLimit,
    RetryPolicy,
    StateBucket,
    WireModel,
)


class NatsSettings(WireModel):
    """How the runtime reaches NATS, and how many servers store what it creates."""

    url: str = "nats://nats:4222"
    """One server URL or, comma-separated, every server of a cluster (``nats_servers``)."""
    credentials_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    replicas: int = Field(default=1, ge=1, le=MAX_REPLICAS)
    """The replicas of every stream and bucket the runtime creates (``nats.replicas``)."""


class RuntimeConfig(WireModel):
    """Everything one agent's runtime needs to run, resolved by the operator."""

    agent: str
    namespace: str
    role: str = ""
    handler: Handler = Field(default_factory=Handler)
    contract: Contract = Field(default_factory=Contract)
    messaging: Messaging = Field(default_factory=Messaging)
    rate_limit: RateLimit | None = None
    timeout: Duration = Field(default=timedelta(seconds=60))
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    dead_letter: DeadLetterPolicy = Field(default_factory=DeadLetterPolicy)
    state: list[StateBucket] = Field(default_factory=list)
    nats: NatsSettings = Field(default_factory=NatsSettings)
    health_port: int = Field(default=DEFAULT_HEALTH_PORT, ge=1, le=65535)
    llm: LlmRuntime | None = None
    """The LLM agent (``spec.llm``), resolved; None for every other handler."""

    @property
    def inbox_stream(self) -> str:
        return naming.inbox_stream(self.namespace, self.agent)

    @property
    def dead_letter_stream(self) -> str:
        return naming.dead_letter_stream(self.namespace, self.agent)

    @property
    def dead_letter_subject(self) -> str:
        return naming.dead_letter_subject(self.namespace, self.agent)

    def inbox_subject(self, priority: int) -> str:
        return naming.inbox_subject(self.namespace, self.agent, priority)

    def consumer_name(self, priority: int) -> str:
        return naming.consumer_name(self.agent, priority)

    def bucket(self, name: str) -> str:
        return naming.kv_bucket(self.namespace, name)

    def to_json(self) -> str:
        """The ConfigMap payload: compact camelCase JSON (a ConfigMap holds 1 MiB),
        defaults included, so nothing is implicit."""
        return self.model_dump_json(by_alias=True)
