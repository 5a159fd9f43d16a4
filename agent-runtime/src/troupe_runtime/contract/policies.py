"""The policies an Agent declares and the runtime enforces.

These models are the one contract between operator and runtime: the Agent
CRD's spec is built from them, and the operator writes them, unchanged, into
the runtime's config. Field names are camelCase on the wire, as in every
Kubernetes API.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from fractions import Fraction
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from troupe_runtime.contract import grammar
from troupe_runtime.contract.durations import Delay, Duration

NAME_PATTERN = grammar.DNS_LABEL_PATTERN


class WireModel(BaseModel):
    """Base of every contract model: camelCase aliases, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class RateLimit(WireModel):
    """A token bucket: ``rate`` messages per second with bursts of ``burst``."""

    rate: float = Field(gt=0, description="Messages per second, such as 0.5 or 20.")
    burst: int = Field(
        default=1, ge=1, description="Messages allowed at once above the rate; default 1."
    )
    scope: Literal["replica", "global"] = Field(
        default="replica",
        description="replica: each replica has its own bucket; global: all replicas share one "
        "(kept in NATS KV). Default replica.",
    )


class RetryPolicy(WireModel):
    """How often a failed message is tried, and how long to wait between tries."""

    max_attempts: int = Field(
        default=3, ge=1, le=100, description="Attempts before dead-lettering; default 3."
    )
    backoff: list[Delay] = Field(
        default_factory=lambda: [timedelta(seconds=1), timedelta(seconds=5)],
        max_length=100,
        description="Delay before each redelivery, each a duration such as 500ms, 5s or 1m "
        "(0s retries at once); the last entry repeats; default [1s, 5s].",
    )

    def delay(self, attempt: int) -> timedelta:
        """How long to wait before the attempt after ``attempt``."""
        return timedelta(seconds=retry_delay([d.total_seconds() for d in self.backoff], attempt))


def retry_delay(backoff: Sequence[float], attempt: int) -> float:
    """Seconds before attempt ``attempt + 1``; the last entry repeats, none means 0."""
    if not backoff:
        return 0.0
    return backoff[min(attempt, len(backoff)) - 1]


class DeadLetterPolicy(WireModel):
    """Where messages go when they cannot be processed."""

    enabled: bool = Field(
        default=True,
        description="Keep messages that cannot be processed in a dead-letter stream; default "
        "true. When false they are dropped after the last attempt.",
    )
    retention: Duration = Field(
        default=timedelta(days=7),
        description="How long dead letters are kept: a duration such as 24h or 168h; "
        "default 168h (7 days).",
    )


class StateBucket(WireModel):
    """A JetStream KV bucket the agent reads or writes, and how write conflicts resolve."""

    name: str = Field(
        pattern=NAME_PATTERN,
        max_length=grammar.DNS_LABEL_MAX,
        description="The bucket's name (a DNS label), shared by every declarer in the namespace.",
    )
    access: Literal["ReadOnly", "ReadWrite"] = Field(
        default="ReadWrite", description="Whether handlers may write; default ReadWrite."
    )
    conflict_policy: Literal["retry", "fail", "lastWriterWins", "merge", "lock"] = Field(
        default="retry",
        description="What a write that lost a race does: retry (re-read and re-apply), fail, "
        "lastWriterWins, merge (JSON merge) or lock; default retry.",
    )
    history: int = Field(default=1, ge=1, le=64, description="Revisions kept per key; default 1.")


PROGRESS_SHARE = Fraction(3, 10)
"""While a message waits (for a rate-limit token), the runtime reports it in progress every
this share of ackWait."""
PUBLISH_TIMEOUT = timedelta(seconds=5)
"""How long the runtime waits for JetStream to store one publish."""
SETTLE_PUBLISHES = 2
"""Publishes between the handler's end and the acknowledgement: its result, then the reply."""
SETTLE_ALLOWANCE = SETTLE_PUBLISHES * PUBLISH_TIMEOUT


def fits_ack_wait(timeout: timedelta, ack_wait: timedelta) -> bool:
    """Whether a message is always acknowledged before JetStream would redeliver it.

    JetStream redelivers a message ackWait after its last delivery or in-progress report.
    The last report before the handler starts may be up to ``PROGRESS_SHARE`` of ackWait old
    (a rate-limited message), the handler then runs for up to ``timeout`` (each
    ``ctx.progress()`` reports and restarts both clocks), and its result and reply are stored
    within ``SETTLE_ALLOWANCE``. So ``timeout + SETTLE_ALLOWANCE`` must fit into
    ``(1 - PROGRESS_SHARE) * ackWait``. Computed in whole milliseconds, as the CRD's CEL rule
    computes it.
    """
    millisecond = timedelta(milliseconds=1)
    share = PROGRESS_SHARE
    budget = (timeout + SETTLE_ALLOWANCE) // millisecond * share.denominator
    return budget <= ack_wait // millisecond * (share.denominator - share.numerator)


class Messaging(WireModel):
    """Flow control between JetStream and the handler."""

    max_in_flight: int = Field(
        default=1, ge=1, le=10_000, description="Messages handled at once per replica; default 1."
    )
    ack_wait: Duration = Field(
        default=timedelta(minutes=2),
        description="JetStream redelivers a message not acknowledged within this: a duration "
        "such as 45s or 2m; default 2m. timeout + 10s must fit into 70% of it.",
    )
    priority_levels: int = Field(
        default=1,
        ge=1,
        le=10,
        description="Priorities 0 (lowest) to priorityLevels-1, one inbox subject each; default 1.",
    )


class ErrorState(WireModel):
    """A named way the agent can fail, part of its contract."""

    name: str = Field(
        min_length=1,
        max_length=grammar.DNS_SUBDOMAIN_MAX,
        description="What a handler raises AgentError with; unique within the contract.",
    )
    description: str = Field(
        default="", max_length=4096, description="What the state means, for people."
    )
    retryable: bool = Field(
        default=True,
        description="Whether a message failing so is tried again (else dead-lettered at once); "
        "default true.",
    )


OutputSubject = Annotated[
    str, Field(pattern=grammar.OUTPUT_SUBJECT_PATTERN, max_length=grammar.SUBJECT_MAX)
]
"""A subject an agent publishes to: literal, no wildcards, whitespace, empty tokens or ``$``."""


class Contract(WireModel):
    """What the agent accepts and produces."""

    input_schema: dict[str, Any] | None = Field(
        default=None,
        description="JSON Schema of the input event's data; messages that do not match are "
        "dead-lettered. Unset: any data.",
    )
    output_schema: dict[str, Any] | None = Field(
        default=None,
        description="JSON Schema of the output event's data; unset: any data.",
    )
    output_subjects: list[OutputSubject] = Field(
        default_factory=list,
        max_length=64,
        description="Subjects the agent publishes its results to (another agent's inbox "
        "chains them): literal subjects, no wildcards, no leading $, never the agent's own "
        "inbox.",
    )
    error_states: list[ErrorState] = Field(
        default_factory=list,
        max_length=64,
        description="The named ways the agent can fail, each name at most once.",
    )

    @model_validator(mode="after")
    def _unique_error_states(self) -> Contract:
        names = [state.name for state in self.error_states]
        if len(set(names)) != len(names):
            raise ValueError("error state names must be unique")
        return self


class Handler(WireModel):
    """What processes each message: a Python callable, a built-in, or a sidecar endpoint."""

    type: Literal["python", "echo", "http", "llm"] = Field(
        default="echo",
        description="python: a function of yours; echo: returns its input; http: POSTs each "
        "event to url; llm: asks an OpenAI-compatible model. Default echo.",
    )
    entrypoint: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$",
        max_length=512,
        description="module:function, for type python (required there).",
    )
    url: str | None = Field(
        default=None,
        pattern=grammar.HTTP_URL_PATTERN,
        max_length=grammar.URL_MAX,
        description="An http:// or https:// endpoint to POST events to, for type http "
        "(required there).",
    )
    model: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Model name, for type llm; default the Secret's model key.",
    )
    secret_name: str | None = Field(
        default=None,
        pattern=NAME_PATTERN,
        max_length=grammar.DNS_SUBDOMAIN_MAX,
        description="Secret with baseUrl, apiKey (and optionally model), for type llm "
        "(required there).",
    )
