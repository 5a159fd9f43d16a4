"""The policies an Agent declares and the runtime enforces.

These models are the one contract between operator and runtime: the Agent
CRD's spec is built from them, and the operator writes them, unchanged, into
the runtime's config. Field names are camelCase on the wire, as in every
Kubernetes API.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from troupe_runtime.contract.durations import Duration

NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class WireModel(BaseModel):
    """Base of every contract model: camelCase aliases, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class RateLimit(WireModel):
    """A token bucket: ``rate`` messages per second with bursts of ``burst``."""

    rate: float = Field(gt=0, description="Messages per second.")
    burst: int = Field(default=1, ge=1, description="Messages allowed at once above the rate.")
    scope: Literal["replica", "global"] = Field(
        default="replica",
        description="replica: each replica has its own bucket; global: all replicas share one.",
    )


class RetryPolicy(WireModel):
    """How often a failed message is tried, and how long to wait between tries."""

    max_attempts: int = Field(
        default=3, ge=1, le=100, description="Attempts before dead-lettering."
    )
    backoff: list[Duration] = Field(
        default_factory=lambda: [timedelta(seconds=1), timedelta(seconds=5)],
        max_length=100,
        description="Delay before each redelivery; the last entry repeats.",
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

    enabled: bool = True
    retention: Duration = Field(
        default=timedelta(days=7), description="How long dead letters are kept."
    )


class StateBucket(WireModel):
    """A JetStream KV bucket the agent reads or writes, and how write conflicts resolve."""

    name: str = Field(pattern=NAME_PATTERN, max_length=63)
    access: Literal["ReadOnly", "ReadWrite"] = "ReadWrite"
    conflict_policy: Literal["retry", "fail", "lastWriterWins", "merge", "lock"] = "retry"
    history: int = Field(default=1, ge=1, le=64, description="Revisions kept per key.")


class Messaging(WireModel):
    """Flow control between JetStream and the handler."""

    max_in_flight: int = Field(default=1, ge=1, le=10_000, description="Concurrent messages.")
    ack_wait: Duration = Field(
        default=timedelta(seconds=30), description="Redeliver if not acknowledged within this."
    )
    priority_levels: int = Field(
        default=1, ge=1, le=10, description="Priorities 0 (lowest) to priorityLevels-1."
    )


class ErrorState(WireModel):
    """A named way the agent can fail, part of its contract."""

    name: str = Field(min_length=1)
    description: str = ""
    retryable: bool = True


class Contract(WireModel):
    """What the agent accepts and produces."""

    input_schema: dict[str, Any] | None = Field(
        default=None, description="JSON Schema of the input event's data."
    )
    output_schema: dict[str, Any] | None = Field(
        default=None, description="JSON Schema of the output event's data."
    )
    output_subjects: list[str] = Field(
        default_factory=list, description="Subjects the agent may publish results to."
    )
    error_states: list[ErrorState] = Field(default_factory=list)


class Handler(WireModel):
    """What processes each message: a Python callable, a built-in, or a sidecar endpoint."""

    type: Literal["python", "echo", "http", "llm"] = "echo"
    entrypoint: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$",
        description="module:function, for type python.",
    )
    url: str | None = Field(default=None, description="Endpoint to POST events to, for type http.")
    model: str | None = Field(default=None, description="Model name, for type llm.")
    secret_name: str | None = Field(
        default=None,
        description="Secret with baseUrl, apiKey (and optionally model), for type llm.",
    )
