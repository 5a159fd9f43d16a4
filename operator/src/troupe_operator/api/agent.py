"""The Agent API: one AI agent, its contract, its runtime and its messaging policies.

The policies are the runtime's own models (``troupe_runtime.contract.policies``), embedded
unchanged, so the CRD, the operator and the runtime share one set of field names.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, WithJsonSchema, model_validator

from troupe_operator.api.common import (
    CEL_KEY,
    RETRY_BACKOFF_RULE,
    ApiModel,
    cel,
    cel_list,
    rule,
    schema_problem,
    unique_rule,
)
from troupe_runtime.contract import grammar, naming, version
from troupe_runtime.contract.durations import Duration, cel_matches
from troupe_runtime.contract.llm_policy import A2A_NAMES_MESSAGE, LlmPolicy
from troupe_runtime.contract.nats_servers import MAX_REPLICAS, NATS_URLS_PATTERN
from troupe_runtime.contract.policies import (
    NAME_PATTERN,
    PROGRESS_SHARE,
    SETTLE_ALLOWANCE,
    Contract,
    DeadLetterPolicy,
    Handler,
    Messaging,
    RateLimit,
    RetryPolicy,
    StateBucket,
    fits_ack_wait,
)
from troupe_runtime.contract.tool_approvals import (
    MAX_TOOL_TIMEOUT,
    NEEDS_APPROVERS_MESSAGE,
    NEEDS_COST_MESSAGE,
    TIMEOUT_BOUND_MESSAGE,
    TOOL_NAMES_MESSAGE,
)

DEFAULT_RUNTIME_IMAGE = version.DEFAULT_RUNTIME_IMAGE
MAX_SIDECARS = 16


def _quantity(value: int | str) -> int | str:
    if isinstance(value, int) and value < 0:
        raise ValueError("a quantity may not be negative")
    if isinstance(value, str) and not (
        len(value) <= grammar.QUANTITY_MAX and grammar.matches(grammar.QUANTITY_PATTERN, value)
    ):
        raise ValueError(f"{value!r} is not a quantity such as 500m, 2, 1Gi or 1.5")
    return value


def _resource_name(name: str) -> str:
    if len(name) > grammar.RESOURCE_NAME_MAX or not grammar.is_resource_name(name):
        raise ValueError(
            f"{name!r} is not a container resource: cpu, memory, ephemeral-storage, "
            "hugepages-<size> or <domain>/<name>"
        )
    return name


Quantity = Annotated[
    int | str,
    AfterValidator(_quantity),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "description": "A quantity such as 500m, 2, 1Gi or 1.5 (an integer or a string).",
            "minimum": 0,
            "maxLength": grammar.QUANTITY_MAX,
            "pattern": grammar.QUANTITY_PATTERN,
        }
    ),
]
"""A Kubernetes resource quantity (500m, 1Gi or a plain number), never negative."""

ResourceName = Annotated[str, AfterValidator(_resource_name)]

RESOURCE_NAMES_RULE = rule(
    f"self.all(k, k.matches(r'{grammar.RESOURCE_NAME_PATTERN}')"
    f" && !k.contains('{grammar.NATIVE_DOMAIN}') && !k.startsWith('{grammar.QUOTA_PREFIX}'))",
    "resource names are cpu, memory, ephemeral-storage, hugepages-<size> or an extended "
    "resource <domain>/<name> (not under kubernetes.io)",
)


def _string(description: str, pattern: str, max_length: int) -> dict[str, Any]:
    return {
        "type": "string",
        "description": description,
        "maxLength": max_length,
        "pattern": pattern,
    }


def _checked_against(
    schema: dict[str, Any], *rules: Callable[[dict[str, Any]], str | None]
) -> AfterValidator:
    """For a structure handed to the pod verbatim: check it against ``schema`` (which the CRD
    carries) and ``rules`` (the models' copy of its CEL rules)."""

    def check(value: dict[str, Any]) -> dict[str, Any]:
        for problem in (schema_problem(schema, value), *(r(value) for r in rules)):
            if problem is not None:
                raise ValueError(problem)
        return value

    return AfterValidator(check)


def _exactly_one(keys: tuple[str, ...], message: str) -> tuple[dict[str, str], Any]:
    """A CEL rule that exactly one of ``keys`` is set, and its check for the models."""
    expression = "[" + ", ".join(f"has(self.{key})" for key in keys) + "]"
    cel_rule = rule(f"{expression}.filter(x, x).size() == 1", message)

    def check(value: dict[str, Any]) -> str | None:
        return None if sum(key in value for key in keys) == 1 else message

    return cel_rule, check


_OBJECT_NAME = "a DNS subdomain"
_REF_NAME = _string(
    f"The object's name ({_OBJECT_NAME}).", grammar.DNS_SUBDOMAIN_PATTERN, grammar.DNS_SUBDOMAIN_MAX
)
_OPTIONAL = {"type": "boolean", "description": "Start the pod even if it does not exist."}


def _reference(what: str, keyed: bool) -> dict[str, Any]:
    key = _string(f"The {what}'s key.", grammar.CONFIG_KEY_PATTERN, grammar.DNS_SUBDOMAIN_MAX)
    return {
        "type": "object",
        "description": f"A {what} in the Agent's namespace"
        + (", and one key of it." if keyed else "."),
        "required": ["name", "key"] if keyed else ["name"],
        "properties": {"name": _REF_NAME, **({"key": key} if keyed else {}), "optional": _OPTIONAL},
    }


SIDECAR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A container, as in a pod spec, beside the runtime container.",
    "x-kubernetes-preserve-unknown-fields": True,
    "required": ["name", "image"],
    "properties": {
        "name": _string(
            "The container's name: a DNS label, unique in the pod, never "
            f"{grammar.RUNTIME_CONTAINER}.",
            grammar.DNS_LABEL_PATTERN,
            grammar.DNS_LABEL_MAX,
        ),
        "image": _string(
            "The container's image, without whitespace.", grammar.IMAGE_PATTERN, grammar.IMAGE_MAX
        ),
    },
}
Sidecar = Annotated[
    dict[str, Any], _checked_against(SIDECAR_SCHEMA), WithJsonSchema(SIDECAR_SCHEMA)
]
"""A sidecar container: passed through verbatim but for the name and image the CRD checks."""

_ENV_SOURCES = ("configMapRef", "secretRef")
ENV_FROM_RULE, _env_from_check = _exactly_one(
    _ENV_SOURCES, "an envFrom entry names exactly one of configMapRef and secretRef"
)
ENV_FROM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Every key of a ConfigMap or Secret as an environment variable.",
    "properties": {
        "prefix": _string(
            "Put before each key's name: printable ASCII without =.",
            grammar.ENV_PREFIX_PATTERN,
            grammar.ENV_NAME_MAX,
        ),
        "configMapRef": _reference("ConfigMap", keyed=False),
        "secretRef": _reference("Secret", keyed=False),
    },
    CEL_KEY: [ENV_FROM_RULE],
}
EnvFromSource = Annotated[
    dict[str, Any],
    _checked_against(ENV_FROM_SCHEMA, _env_from_check),
    WithJsonSchema(ENV_FROM_SCHEMA),
]

_VALUE_SOURCES = ("fieldRef", "resourceFieldRef", "configMapKeyRef", "secretKeyRef")
VALUE_FROM_RULE, _value_from_check = _exactly_one(
    _VALUE_SOURCES,
    "valueFrom names exactly one of fieldRef, resourceFieldRef, configMapKeyRef and secretKeyRef",
)
VALUE_FROM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A source for the value, as in a pod spec: exactly one of secretKeyRef, "
    "configMapKeyRef, fieldRef or resourceFieldRef.",
    "properties": {
        "fieldRef": {
            "type": "object",
            "description": "A field of the pod, such as metadata.namespace or status.podIP.",
            "required": ["fieldPath"],
            "properties": {
                "fieldPath": _string("The field's path.", grammar.FIELD_PATH_PATTERN, 256),
                "apiVersion": _string("Its schema version; default v1.", r"^[a-z0-9./]+$", 64),
            },
        },
        "resourceFieldRef": {
            "type": "object",
            "description": "A resource request or limit of a container, such as limits.memory.",
            "required": ["resource"],
            "properties": {
                "resource": _string("Such as limits.cpu.", grammar.FIELD_PATH_PATTERN, 256),
                "containerName": _string(
                    "The container; default this one.",
                    grammar.DNS_LABEL_PATTERN,
                    grammar.DNS_LABEL_MAX,
                ),
                "divisor": {
                    "x-kubernetes-int-or-string": True,
                    "description": "The unit to divide by, such as 1Mi; default 1.",
                    "minimum": 0,
                    "maxLength": grammar.QUANTITY_MAX,
                    "pattern": grammar.QUANTITY_PATTERN,
                },
            },
        },
        "configMapKeyRef": _reference("ConfigMap", keyed=True),
        "secretKeyRef": _reference("Secret", keyed=True),
    },
    CEL_KEY: [VALUE_FROM_RULE],
}
ValueFrom = Annotated[
    dict[str, Any],
    _checked_against(VALUE_FROM_SCHEMA, _value_from_check),
    WithJsonSchema(VALUE_FROM_SCHEMA),
]

LABEL_KEYS_RULE = rule(
    f"self.all(k, k.matches(r'{grammar.QUALIFIED_NAME_PATTERN}'))",
    "node label keys are qualified names such as kubernetes.io/arch or example.com/pool",
)


def _label_key(name: str) -> str:
    if len(name) > grammar.QUALIFIED_NAME_MAX or not grammar.matches(
        grammar.QUALIFIED_NAME_PATTERN, name
    ):
        raise ValueError(LABEL_KEYS_RULE["message"])
    return name


LabelKey = Annotated[str, AfterValidator(_label_key)]
LabelValue = Annotated[
    str, Field(pattern=grammar.LABEL_VALUE_PATTERN, max_length=grammar.LABEL_VALUE_MAX)
]


def _q(value: str) -> str:
    return f"quantity(string({value}))"


RESOURCE_RULES = (
    rule(
        "!has(self.requests) || !has(self.limits) || self.requests.all(k, !(k in self.limits)"
        f" || {_q('self.requests[k]')}.compareTo({_q('self.limits[k]')}) <= 0)",
        "a request may not exceed its limit",
        ".requests",
    ),
    rule(
        "!has(self.requests) || self.requests.all(k, !k.contains('/') || has(self.limits)"
        f" && k in self.limits && {_q('self.requests[k]')}.compareTo({_q('self.limits[k]')}) == 0)",
        "an extended resource (<domain>/<name>) cannot be overcommitted: its request needs an "
        "equal limit",
        ".requests",
    ),
    rule(
        "!has(self.limits) || self.limits.all(k, !k.contains('/')"
        f" || {_q('self.limits[k]')}.isInteger())",
        "an extended resource (<domain>/<name>) is counted in whole units",
        ".limits",
    ),
)


def _resource_problem(requests: dict[str, int | str], limits: dict[str, int | str]) -> str | None:
    """What ``RESOURCE_RULES`` refuse, for the models."""
    value = grammar.quantity_value
    if any(name in limits and value(q) > value(limits[name]) for name, q in requests.items()):
        return RESOURCE_RULES[0]["message"]
    if any(
        grammar.is_extended_resource(name)
        and (name not in limits or value(q) != value(limits[name]))
        for name, q in requests.items()
    ):
        return RESOURCE_RULES[1]["message"]
    if any(
        grammar.is_extended_resource(name) and value(q).denominator != 1
        for name, q in limits.items()
    ):
        return RESOURCE_RULES[2]["message"]
    return None


class ResourceRequirements(ApiModel):
    """CPU and memory for the runtime container, as in a pod spec."""

    model_config = ApiModel.model_config | {"json_schema_extra": cel(*RESOURCE_RULES)}

    requests: dict[ResourceName, Quantity] = Field(
        default_factory=dict,
        max_length=16,
        json_schema_extra=cel(RESOURCE_NAMES_RULE),
        description="What the scheduler reserves, such as {cpu: 100m, memory: 128Mi}.",
    )
    limits: dict[ResourceName, Quantity] = Field(
        default_factory=dict,
        max_length=16,
        json_schema_extra=cel(RESOURCE_NAMES_RULE),
        description="The most the container may use, such as {memory: 256Mi}.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ResourceRequirements:
        if (problem := _resource_problem(self.requests, self.limits)) is not None:
            raise ValueError(problem)
        return self


TOLERATION_RULES = (
    rule(
        "self.operator != 'Exists' || !has(self.value) || self.value == ''",
        "an Exists toleration matches every value: leave value unset",
        ".value",
    ),
    rule(
        "has(self.key) || self.operator == 'Exists'",
        "a toleration without a key must use operator Exists",
        ".key",
    ),
    rule(
        "!has(self.tolerationSeconds) || has(self.effect) && self.effect == 'NoExecute'",
        "tolerationSeconds needs effect NoExecute",
        ".tolerationSeconds",
    ),
)


class Toleration(ApiModel):
    """A pod toleration, so agents can be placed on tainted nodes."""

    model_config = ApiModel.model_config | {"json_schema_extra": cel(*TOLERATION_RULES)}

    key: str | None = Field(
        default=None,
        pattern=grammar.QUALIFIED_NAME_PATTERN,
        max_length=grammar.QUALIFIED_NAME_MAX,
        description="The taint key to tolerate; unset (with operator Exists) tolerates all.",
    )
    operator: Literal["Exists", "Equal"] = Field(
        default="Equal",
        description="Equal matches the taint's value; Exists any value. Default Equal.",
    )
    value: str | None = Field(
        default=None,
        pattern=grammar.LABEL_VALUE_PATTERN,
        max_length=grammar.LABEL_VALUE_MAX,
        description="The taint value to match, for operator Equal.",
    )
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="The taint effect to tolerate; unset: every effect."
    )
    toleration_seconds: int | None = Field(
        default=None,
        description="For NoExecute: how long the pod stays bound after the taint appears; "
        "unset: forever.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("an Exists toleration matches every value: leave value unset")
        if self.key is None and self.operator != "Exists":
            raise ValueError("a toleration without a key must use operator Exists")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds needs effect NoExecute")
        return self


RESERVED_ENV_RULE = rule(
    f"!self.startsWith('{grammar.RESERVED_ENV_PREFIX}')"
    f" && !(self in {cel_list(grammar.RESERVED_ENV_NAMES)})",
    f"the operator sets this variable itself: names starting with "
    f"{grammar.RESERVED_ENV_PREFIX} and {', '.join(grammar.RESERVED_ENV_NAMES)} are reserved",
)


class EnvVar(ApiModel):
    """An environment variable of the runtime container: a value or a valueFrom source."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": cel(
            rule(
                "!has(self.valueFrom) || !has(self.value) || self.value == ''",
                "set either value or valueFrom, not both",
                ".valueFrom",
            )
        )
    }

    name: str = Field(
        pattern=grammar.ENV_NAME_PATTERN,
        max_length=grammar.ENV_NAME_MAX,
        json_schema_extra=cel(RESERVED_ENV_RULE),
        description="The variable's name: printable ASCII without =, not reserved (TROUPE_*, "
        f"{', '.join(grammar.RESERVED_ENV_NAMES)}, and {grammar.CODE_ENV} when code is set).",
    )
    value: str | None = Field(default=None, description="The value; unset: empty or valueFrom.")
    value_from: ValueFrom | None = Field(default=None)

    @model_validator(mode="after")
    def _allowed(self) -> EnvVar:
        if grammar.is_reserved_env(self.name):
            raise ValueError(RESERVED_ENV_RULE["message"])
        if self.value and self.value_from is not None:
            raise ValueError("set either value or valueFrom, not both")
        return self


class HandlerCode(ApiModel):
    """Python modules shipped in a ConfigMap, so a handler needs no custom image."""

    config_map: str = Field(
        pattern=NAME_PATTERN,
        max_length=253,
        description="The ConfigMap's name, in the Agent's namespace.",
    )


HANDLER_RULES = (
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
)


def _handler_problem(handler: Handler) -> str | None:
    """What ``HANDLER_RULES`` refuse, for the models."""
    if handler.type == "python" and handler.entrypoint is None:
        return HANDLER_RULES[0]["message"]
    if handler.type == "http" and handler.url is None:
        return HANDLER_RULES[1]["message"]
    return None


CODE_ENV_RULE = rule(
    f"!has(self.code) || !has(self.env) || !self.env.exists(e, e.name == '{grammar.CODE_ENV}')",
    f"with code set, the operator sets {grammar.CODE_ENV} itself: remove it from env",
    ".env",
)


AUTOSCALE_BOUNDS_RULE = rule(
    "!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
    "autoscale.minReplicas may not exceed maxReplicas",
    ".minReplicas",
)


class AgentAutoscale(ApiModel):
    """Replicas that follow the agent's backlog, down to zero when it is idle.

    The backlog (lag) is pending + ackPending summed over the agent's consumers (one per
    priority level), as the JetStream API answers it: a consumer's info comes from the
    consumer's leader, never from a follower's monitoring endpoint, whose numbers can be
    stale (the failure of kedacore/keda#7322). Desired replicas are
    ceil(lag / targetPending), kept within minReplicas and maxReplicas; with minReplicas 0
    an agent with no backlog and no delivery for scaleToZeroAfter goes to zero, and the
    first message brings one replica back. Scaling down (but to zero) waits
    scaleDownDelay after the last change, so a burst does not make pods flap.
    """

    model_config = ApiModel.model_config | {"json_schema_extra": cel(AUTOSCALE_BOUNDS_RULE)}

    engine: Literal["operator", "keda"] = Field(
        default="operator",
        description="Who scales: operator (Troupe itself, from the consumers' counts) or keda "
        "(a KEDA ScaledObject with nats-jetstream triggers, when the cluster has KEDA); "
        "default operator.",
    )
    min_replicas: int = Field(
        default=1,
        ge=0,
        le=1000,
        description="The fewest pods; 0 lets an idle agent scale to zero. Default 1.",
    )
    max_replicas: int = Field(default=10, ge=1, le=1000, description="The most pods; default 10.")
    target_pending: int = Field(
        default=10,
        ge=1,
        le=1_000_000,
        description="Lag (pending + ackPending messages) one replica is meant to carry: desired "
        "replicas = ceil(lag / targetPending). Default 10.",
    )
    scale_to_zero_after: Duration = Field(
        default=timedelta(minutes=5),
        description="With minReplicas 0: how long the agent must have no lag and no delivery "
        "before it goes to zero, a duration such as 30s or 10m; default 5m.",
    )
    scale_down_delay: Duration = Field(
        default=timedelta(minutes=1),
        description="How long after the last change replicas may go down again (not to zero, "
        "which scaleToZeroAfter governs), a duration such as 30s or 2m; default 1m. Scaling "
        "up never waits.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> AgentAutoscale:
        if self.min_replicas > self.max_replicas:
            raise ValueError(AUTOSCALE_BOUNDS_RULE["message"])
        return self


class AgentRuntime(ApiModel):
    """The pods that run the agent: image, handler, scale and placement."""

    model_config = ApiModel.model_config | {"json_schema_extra": cel(CODE_ENV_RULE)}

    image: str = Field(
        default=DEFAULT_RUNTIME_IMAGE,
        pattern=grammar.IMAGE_PATTERN,
        max_length=grammar.IMAGE_MAX,
        description=f"The runtime's image, without whitespace; default {DEFAULT_RUNTIME_IMAGE}.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="As in a pod spec; default IfNotPresent."
    )
    handler: Handler = Field(
        default_factory=Handler,
        json_schema_extra=cel(*HANDLER_RULES),
        description="What processes each message; default echo.",
    )
    code: HandlerCode | None = Field(
        default=None,
        description="A ConfigMap whose files are mounted at /opt/troupe/code and put on "
        "PYTHONPATH, so entrypoint modules can live there. Roll the pods after changing it.",
    )
    replicas: int = Field(
        default=1,
        ge=0,
        le=1000,
        description="Pods running the agent; default 1. Not applied with autoscale set.",
    )
    autoscale: AgentAutoscale | None = Field(
        default=None,
        description="Replicas that follow the backlog (min, max, lag per replica, scale to "
        "zero when idle) instead of replicas; unset: a fixed number of replicas.",
    )
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements,
        description="CPU and memory for the runtime container, as in a pod spec.",
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=256,
        # A list map: the API server refuses a second entry of one name, at no CEL cost.
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
        description="Extra environment variables of the runtime container, each name once.",
    )
    env_from: list[EnvFromSource] = Field(
        default_factory=list,
        max_length=64,
        description="Whole ConfigMaps or Secrets as environment variables, as in a pod spec "
        "(configMapRef, secretRef, prefix).",
    )
    sidecars: list[Sidecar] = Field(
        default_factory=list,
        max_length=MAX_SIDECARS,
        json_schema_extra=cel(
            unique_rule("name", "sidecar names must be unique"),
            rule(
                f"self.all(c, c.name != '{grammar.RUNTIME_CONTAINER}')",
                f"a sidecar may not be named {grammar.RUNTIME_CONTAINER}: "
                "that is the runtime's own container",
            ),
        ),
        description="Containers beside the runtime, e.g. the server of an http handler; each "
        "needs a unique name and an image.",
    )
    service_account_name: str | None = Field(
        default=None,
        pattern=NAME_PATTERN,
        max_length=63,
        description="The pods' ServiceAccount; unset: the namespace's default one (or the "
        "agent's name with createServiceAccount).",
    )
    create_service_account: bool = Field(
        default=False,
        description="Create the ServiceAccount (named serviceAccountName, else the agent); "
        "default false.",
    )
    node_selector: dict[LabelKey, LabelValue] = Field(
        default_factory=dict,
        max_length=64,
        json_schema_extra=cel(LABEL_KEYS_RULE),
        description="Node labels the pods must run on, as in a pod spec.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=64, description="Taints the pods tolerate."
    )

    @model_validator(mode="after")
    def _consistent(self) -> AgentRuntime:
        if (problem := _handler_problem(self.handler)) is not None:
            raise ValueError(problem)
        names = [variable.name for variable in self.env]
        if len(set(names)) != len(names):
            raise ValueError("env names must be unique")
        if self.code is not None and grammar.CODE_ENV in names:
            raise ValueError(CODE_ENV_RULE["message"])
        containers = [sidecar["name"] for sidecar in self.sidecars]
        if len(set(containers)) != len(containers):
            raise ValueError("sidecar names must be unique")
        if grammar.RUNTIME_CONTAINER in containers:
            raise ValueError(f"a sidecar may not be named {grammar.RUNTIME_CONTAINER}")
        return self


class SecretKeyReference(ApiModel):
    """A key of a Secret in the object's namespace."""

    name: str = Field(
        pattern=NAME_PATTERN, max_length=253, description="The Secret's name, in this namespace."
    )
    key: str = Field(
        default="nats.creds",
        min_length=1,
        max_length=253,
        description="The key holding the credentials file; default nats.creds.",
    )


class NatsTls(ApiModel):
    """TLS to NATS from a Secret with ca.crt (and tls.crt and tls.key for mutual TLS)."""

    secret_name: str = Field(
        pattern=NAME_PATTERN,
        max_length=253,
        description="The Secret with ca.crt (and tls.crt, tls.key), in this namespace.",
    )
    client_certificate: bool = Field(
        default=True, description="Present tls.crt and tls.key to the server; default true."
    )


class NatsConnection(ApiModel):
    """Which NATS to use; unset fields fall back to the operator's own settings."""

    url: str | None = Field(
        default=None,
        pattern=NATS_URLS_PATTERN,
        max_length=grammar.URL_MAX,
        description="Server URL such as nats://nats.troupe:4222, or every server of a "
        "cluster, comma-separated (nats://a:4222,nats://b:4222,nats://c:4222); unset: the "
        "operator's.",
    )
    replicas: int | None = Field(
        default=None,
        ge=1,
        le=MAX_REPLICAS,
        description="Servers that store each stream and bucket made for this object (its "
        "inbox, dead letters, state buckets, sessions): 1 on a single server, 3 on a "
        "three-server cluster; unset: the operator's (TROUPE_NATS_REPLICAS). Raising it "
        "raises existing streams; lowering it leaves them as they are.",
    )
    credentials_secret: SecretKeyReference | None = Field(
        default=None, description="A Secret key holding a NATS credentials (.creds) file."
    )
    tls: NatsTls | None = Field(default=None, description="TLS to the server.")


def _timeout_rule() -> dict[str, str]:
    """``fits_ack_wait`` in CEL: whole milliseconds, integer arithmetic only."""
    allowance = SETTLE_ALLOWANCE // timedelta(milliseconds=1)
    share = PROGRESS_SHARE
    return rule(
        "!has(self.timeout) || !has(self.messaging) || !has(self.messaging.ackWait)"
        f" || !{cel_matches('self.timeout')} || !{cel_matches('self.messaging.ackWait')}"
        f" || (duration(self.timeout).getMilliseconds() + {allowance}) * {share.denominator}"
        " <= duration(self.messaging.ackWait).getMilliseconds()"
        f" * {share.denominator - share.numerator}",
        TIMEOUT_MESSAGE,
        ".timeout",
    )


TIMEOUT_MESSAGE = (
    f"timeout + {SETTLE_ALLOWANCE.seconds}s must fit into "
    f"{100 - int(PROGRESS_SHARE * 100)}% of messaging.ackWait, or JetStream redelivers the "
    "message while the handler still runs: lower timeout or raise ackWait"
)


_LLM_HANDLER = (
    "has(self.runtime) && has(self.runtime.handler) && has(self.runtime.handler.type)"
    " && self.runtime.handler.type == 'llm'"
)
LLM_MESSAGE = (
    "an llm handler needs exactly one of runtime.handler.secretName (a Secret with baseUrl "
    "and apiKey: one call per message) and llm (a ModelProvider's model, a prompt and tools)"
)
LLM_ONLY_MESSAGE = "llm needs runtime.handler.type llm"
LLM_RULES = (
    rule(
        f"!({_LLM_HANDLER}) || has(self.runtime.handler.secretName) != has(self.llm)",
        LLM_MESSAGE,
        ".runtime.handler",
    ),
    rule(f"!has(self.llm) || ({_LLM_HANDLER})", LLM_ONLY_MESSAGE, ".llm"),
)
"""Which llm handler an Agent has: the legacy Secret or ``spec.llm``, never both."""

_DECIDABLE = (
    "(!has({rule}.approval) || {rule}.approval == 'never' || "
    "(has({rule}.approvers) && ((has({rule}.approvers.users) && size({rule}.approvers.users) > 0)"
    " || (has({rule}.approvers.groups) && size({rule}.approvers.groups) > 0))))"
)
"""A tool approval someone can decide: ``never``, or with an approver."""
_COSTED = (
    "(!has({rule}.approval) || {rule}.approval != 'costAbove' || "
    "(has({rule}.cost) && has({rule}.threshold)))"
)
"""A costAbove approval says how to estimate a call's cost and what is too much."""
_WITHIN_MAX = (
    "(!has({rule}.timeout) || duration({rule}.timeout) <= "
    f"duration('{int(MAX_TOOL_TIMEOUT.total_seconds()) // 3600}h'))"
)

LLM_POLICY_RULES = (
    rule(
        "!has(self.systemPrompt) || has(self.systemPrompt.text) != "
        "has(self.systemPrompt.configMapKeyRef)",
        "systemPrompt needs exactly one of text and configMapKeyRef",
        ".systemPrompt",
    ),
    rule(
        "!has(self.tools) || !has(self.tools.mcp) || self.tools.mcp.all(m, has(m.url) != "
        "has(m.service))",
        "an MCP server needs exactly one of url and service",
        ".tools.mcp",
    ),
    rule(
        "!has(self.tools) || !has(self.tools.a2a) || self.tools.a2a.all(a, "
        "self.tools.a2a.exists_one(b, b.name == a.name))",
        A2A_NAMES_MESSAGE,
        ".tools.a2a",
    ),
    rule(
        "!has(self.approvals) || !has(self.approvals.tools) || self.approvals.tools.all(a, "
        "self.approvals.tools.exists_one(b, b.tool == a.tool))",
        TOOL_NAMES_MESSAGE,
        ".approvals.tools",
    ),
    rule(
        "!has(self.approvals) || ((!has(self.approvals.default) || "
        f"{_DECIDABLE.format(rule='self.approvals.default')}) && "
        "(!has(self.approvals.tools) || self.approvals.tools.all(r, "
        f"{_DECIDABLE.format(rule='r')})))",
        NEEDS_APPROVERS_MESSAGE,
        ".approvals",
    ),
    rule(
        "!has(self.approvals) || ((!has(self.approvals.default) || "
        f"{_WITHIN_MAX.format(rule='self.approvals.default')}) && "
        "(!has(self.approvals.tools) || self.approvals.tools.all(r, "
        f"{_WITHIN_MAX.format(rule='r')})))",
        TIMEOUT_BOUND_MESSAGE,
        ".approvals",
    ),
    rule(
        "!has(self.approvals) || ((!has(self.approvals.default) || "
        f"{_COSTED.format(rule='self.approvals.default')}) && "
        "(!has(self.approvals.tools) || self.approvals.tools.all(r, "
        f"{_COSTED.format(rule='r')})))",
        NEEDS_COST_MESSAGE,
        ".approvals",
    ),
)
"""What the contract's ``LlmPolicy`` validators refuse, in CEL."""


class AgentSpec(ApiModel):
    """The desired state of one agent.

    The handler's timeout must fit into ackWait (``policies.fits_ack_wait``): JetStream
    redelivers a message ackWait after its last delivery or in-progress report. A message
    waiting for a rate-limit token is reported every 30% of ackWait, so the handler may start
    with 70% of it left; it then runs for up to timeout, and its result and reply take up to
    two 5 s publishes before the acknowledgement. So timeout + 10s <= 70% of ackWait, and no
    message is handed to a second replica while the first still works on it.
    """

    model_config = ApiModel.model_config | {"json_schema_extra": cel(_timeout_rule(), *LLM_RULES)}

    role: str = Field(min_length=1, max_length=256, description="What the agent does, briefly.")
    description: str = Field(
        default="", max_length=4096, description="More about the agent, for people."
    )
    contract: Contract = Field(
        default_factory=Contract,
        json_schema_extra=cel(
            rule(
                "!has(self.errorStates) || self.errorStates.all(a, "
                "self.errorStates.exists_one(b, b.name == a.name))",
                "error state names must be unique",
                ".errorStates",
            )
        ),
        description="What the agent accepts and produces: schemas, output subjects, errors.",
    )
    runtime: AgentRuntime = Field(
        default_factory=AgentRuntime,
        description="The pods that run the agent: image, handler, scale and placement.",
    )
    messaging: Messaging = Field(
        default_factory=Messaging,
        description="Flow control between JetStream and the handler.",
    )
    rate_limit: RateLimit | None = Field(
        default=None,
        description="A token bucket limiting messages per second; unset: no limit.",
    )
    timeout: Duration = Field(
        default=timedelta(seconds=60),
        description="How long the handler may take per message (ctx.progress() extends it): a "
        "duration such as 30s or 1h30m; default 1m. timeout + 10s must fit into 70% of "
        "messaging.ackWait.",
    )
    retry: RetryPolicy = Field(
        default_factory=RetryPolicy,
        json_schema_extra=cel(RETRY_BACKOFF_RULE),
        description="How often a failed message is tried, and the delays between tries.",
    )
    dead_letter: DeadLetterPolicy = Field(
        default_factory=DeadLetterPolicy,
        description="Where messages go when they cannot be processed.",
    )
    state: list[StateBucket] = Field(
        default_factory=list,
        max_length=32,
        json_schema_extra=cel(unique_rule("name", "state bucket names must be unique")),
        description="NATS KV buckets the handlers read or write, each name once.",
    )
    nats: NatsConnection = Field(
        default_factory=NatsConnection,
        description="Which NATS to use; unset fields fall back to the operator's settings.",
    )
    llm: LlmPolicy | None = Field(
        default=None,
        json_schema_extra=cel(*LLM_POLICY_RULES),
        description="An LLM agent (runtime.handler.type llm): a model of a ModelProvider in "
        "this namespace, fallbacks, a system prompt, sampling and tools (MCP servers, other "
        "Agents, Python functions). Unset: the llm handler's Secret, one call per message.",
    )
    deletion_policy: Literal["Delete", "Retain"] = Field(
        default="Delete",
        description="Whether deleting the Agent deletes its NATS resources (Delete) or keeps "
        "them (Retain); default Delete.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> AgentSpec:
        if not fits_ack_wait(self.timeout, self.messaging.ack_wait):
            raise ValueError(TIMEOUT_MESSAGE)
        buckets = [bucket.name for bucket in self.state]
        if len(set(buckets)) != len(buckets):
            raise ValueError("state bucket names must be unique")
        handler = self.runtime.handler
        if handler.type == "llm" and (handler.secret_name is None) == (self.llm is None):
            raise ValueError(LLM_MESSAGE)
        if handler.type != "llm" and self.llm is not None:
            raise ValueError(LLM_ONLY_MESSAGE)
        return self


def metadata_schema(kind: str) -> dict[str, Any]:
    """metadata.name is a DNS label: it becomes label values, object names and subject tokens.

    The API server lets a CRD say nothing else about metadata.
    """
    return {
        "type": "object",
        "properties": {
            "name": {
                "type": "string",
                "description": f"The {kind}'s name: a DNS label (lowercase letters, digits and "
                "-, at most 63, no dots), since it becomes a label value and a NATS subject "
                "token.",
                "maxLength": grammar.DNS_LABEL_MAX,
                "pattern": grammar.DNS_LABEL_PATTERN,
            }
        },
    }


_TOKENS = "s.split('.')"
AGENT_RULES = [
    rule(
        f"!self.metadata.name.endsWith('{naming.ENGINE_SUFFIX}')",
        f"an Agent's name may not end in {naming.ENGINE_SUFFIX}: a Workflow's engine objects "
        "are named so",
        ".metadata.name",
    ),
    rule(
        "!has(self.spec.contract) || !has(self.spec.contract.outputSubjects)"
        " || self.spec.contract.outputSubjects.all(s, !("
        f"s.startsWith('{grammar.TROUPE_ROOT}.') && {_TOKENS}.size() >= 5"
        f" && {_TOKENS}[2] == '{grammar.AGENTS_TOKEN}' && {_TOKENS}[3] == self.metadata.name"
        f" && {_TOKENS}[4] == 'in'))",
        "an output subject may not be the agent's own inbox "
        f"({grammar.TROUPE_ROOT}.<namespace>.{grammar.AGENTS_TOKEN}.<name>.in...): it would "
        "feed the agent its own results",
        ".spec.contract.outputSubjects",
    ),
]
"""Rules on the whole object, where CEL can read metadata.name (``grammar.own_inbox_pattern``
says the same as the second)."""
