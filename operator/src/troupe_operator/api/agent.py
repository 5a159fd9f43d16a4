"""The Agent API: one AI agent, its contract, its runtime and its messaging policies.

The policies are the runtime's own models (``troupe_runtime.contract.policies``), embedded
unchanged, so the CRD, the operator and the runtime share one set of field names.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import Field, WithJsonSchema

from troupe_operator.api.common import RETRY_BACKOFF_RULE, ApiModel, cel, rule
from troupe_runtime.contract import version
from troupe_runtime.contract.durations import Duration
from troupe_runtime.contract.policies import (
    NAME_PATTERN,
    Contract,
    DeadLetterPolicy,
    Handler,
    Messaging,
    RateLimit,
    RetryPolicy,
    StateBucket,
)

DEFAULT_RUNTIME_IMAGE = version.DEFAULT_RUNTIME_IMAGE

Quantity = Annotated[int | str, WithJsonSchema({"x-kubernetes-int-or-string": True})]
"""A Kubernetes resource quantity (``500m``, ``1Gi`` or a plain number)."""

KubeObject = Annotated[
    dict[str, Any],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]
"""A core Kubernetes structure passed through verbatim; the API server validates it in the pod."""


class ResourceRequirements(ApiModel):
    """CPU and memory for the runtime container, as in a pod spec."""

    requests: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, Quantity] = Field(default_factory=dict)


class Toleration(ApiModel):
    """A pod toleration, so agents can be placed on tainted nodes."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class EnvVar(ApiModel):
    """An environment variable of the runtime container: a value or a ``valueFrom`` source."""

    name: str = Field(min_length=1)
    value: str | None = None
    value_from: KubeObject | None = None


class HandlerCode(ApiModel):
    """Python modules shipped in a ConfigMap, so a handler needs no custom image."""

    config_map: str = Field(pattern=NAME_PATTERN, max_length=253)


class AgentRuntime(ApiModel):
    """The pods that run the agent: image, handler, scale and placement."""

    image: str = Field(default=DEFAULT_RUNTIME_IMAGE, min_length=1)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    handler: Handler = Field(
        default_factory=Handler,
        json_schema_extra=cel(
            rule(
                "!has(self.type) || self.type != 'python' || has(self.entrypoint)",
                "a python handler needs an entrypoint (module:function)",
                ".entrypoint",
            ),
            rule(
                "!has(self.type) || self.type != 'http' || has(self.url)",
                "an http handler needs a url",
                ".url",
            ),
        ),
    )
    code: HandlerCode | None = Field(
        default=None,
        description="A ConfigMap whose files are mounted at /opt/troupe/code and put on "
        "PYTHONPATH, so entrypoint modules can live there. Roll the pods after changing it.",
    )
    replicas: int = Field(default=1, ge=0, le=1000)
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    env: list[EnvVar] = Field(default_factory=list, max_length=256)
    env_from: list[KubeObject] = Field(default_factory=list, max_length=64)
    sidecars: list[KubeObject] = Field(
        default_factory=list,
        max_length=16,
        description="Containers beside the runtime, e.g. the server of an http handler.",
    )
    service_account_name: str | None = Field(default=None, pattern=NAME_PATTERN, max_length=63)
    create_service_account: bool = Field(
        default=False,
        description="Create the ServiceAccount (named serviceAccountName, else the agent).",
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64)


class SecretKeyReference(ApiModel):
    """A key of a Secret in the object's namespace."""

    name: str = Field(pattern=NAME_PATTERN, max_length=253)
    key: str = Field(default="nats.creds", min_length=1)


class NatsTls(ApiModel):
    """TLS to NATS from a Secret with ``ca.crt`` (and ``tls.crt``/``tls.key`` for mTLS)."""

    secret_name: str = Field(pattern=NAME_PATTERN, max_length=253)
    client_certificate: bool = Field(default=True, description="Present tls.crt and tls.key.")


class NatsConnection(ApiModel):
    """Which NATS to use; unset fields fall back to the operator's own settings."""

    url: str | None = Field(default=None, pattern=r"^(nats|tls|ws|wss)://.+$")
    credentials_secret: SecretKeyReference | None = None
    tls: NatsTls | None = None


class AgentSpec(ApiModel):
    """The desired state of one agent."""

    role: str = Field(min_length=1, max_length=256, description="What the agent does, briefly.")
    description: str = Field(default="", max_length=4096)
    contract: Contract = Field(default_factory=Contract)
    runtime: AgentRuntime = Field(default_factory=AgentRuntime)
    messaging: Messaging = Field(default_factory=Messaging)
    rate_limit: RateLimit | None = None
    timeout: Duration = Field(default=timedelta(seconds=60), description="Per message.")
    retry: RetryPolicy = Field(
        default_factory=RetryPolicy, json_schema_extra=cel(RETRY_BACKOFF_RULE)
    )
    dead_letter: DeadLetterPolicy = Field(default_factory=DeadLetterPolicy)
    state: list[StateBucket] = Field(
        default_factory=list,
        max_length=32,
        json_schema_extra=cel(
            rule(
                "self.all(a, self.exists_one(b, b.name == a.name))",
                "state bucket names must be unique",
            )
        ),
    )
    nats: NatsConnection = Field(default_factory=NatsConnection)
    deletion_policy: Literal["Delete", "Retain"] = Field(
        default="Delete", description="Whether deleting the Agent deletes its NATS resources."
    )
