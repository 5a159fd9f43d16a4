"""Chaos faults: what a ChaosExperiment asks the runtime to inject, and how one roll decides.

A ``ChaosExperiment`` names Agents (by selector, in namespaces that opt in with the
``OPT_IN_LABEL`` label) and the faults to inject into them. Pod kills are the operator's own
work; everything that happens inside a pod is the runtime's, so the operator writes one
``AgentFaults`` per targeted Agent into the namespace's chaos KV bucket
(``naming.chaos_bucket``, key ``naming.chaos_faults_key``), and each runtime replica watches
its own key. Nothing about an experiment changes a Deployment: starting or ending one rolls
no pod.

Faults are safe by construction:

- every ``AgentFaults`` carries ``until``; a runtime ignores faults past it, so an operator
  that dies mid-experiment leaves no agent faulty for longer than the experiment's duration;
- an entry the runtime cannot parse injects nothing (it is logged), never a crash;
- errors are injected as the ordinary failure of the call they replace (a model call's
  retryable error, a tool's error result, a handler exception), so they take the same
  retries, dead letters and fallbacks a real failure takes: the experiment measures those.

The functions here are pure: the runtime hands them a random number in [0, 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from pydantic import AwareDatetime, Field, model_validator

from troupe_runtime.contract.durations import Delay, Duration
from troupe_runtime.contract.policies import WireModel

OPT_IN_LABEL = "troupe.dev/chaos"
"""The Namespace label that lets ChaosExperiments target its Agents and Workflows."""
OPT_IN_VALUE = "enabled"
"""The one value of ``OPT_IN_LABEL`` that opts a namespace in."""
PROBE_HEADER = "Troupe-Chaos-Probe"
"""Marks a probe message of an experiment (its value: the experiment's name), so a handler
or a dashboard can tell probes from real traffic."""
MAX_DELAY = timedelta(minutes=10)
"""The longest latency one fault may add: longer would only look like a wedge."""
LONGEST_RUN = timedelta(hours=24)
"""The longest a ChaosExperiment's run may last (its CRD refuses more): an entry's ``until``
is the run's end, so it is never further ahead than this."""
CLOCK_SKEW = timedelta(minutes=5)
"""How far the operator's clock may run ahead of an agent's."""
INJECTED_ERROR = "chaos: injected fault"
"""The message of every injected error, so logs and dead letters say what caused them."""

Point = Literal["model", "tools", "handler"]
"""Where a call fault is injected: an LLM agent's model calls, its tool calls, or the
handler of each message (for every handler type)."""


class CallFault(WireModel):
    """Latency and errors added to one kind of call."""

    latency: Delay = Field(
        default=timedelta(0),
        description="How long to wait before the call: a duration such as 200ms or 2s; "
        "default 0ms.",
    )
    latency_ratio: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="The share of calls that wait latency, from 0 to 1; default 1.",
    )
    error_ratio: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="The share of calls that fail instead of running, from 0 to 1; default 0.",
    )

    @model_validator(mode="after")
    def _bounded(self) -> CallFault:
        if self.latency > MAX_DELAY:
            raise ValueError(f"latency may be at most {int(MAX_DELAY.total_seconds() // 60)}m")
        return self


class MessageFault(WireModel):
    """Duplication and delay of the messages an agent receives."""

    duplicate_ratio: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="The share of messages delivered a second time (the same id, as a "
        "redelivery would be), from 0 to 1; default 0. Idempotent delivery must absorb them.",
    )
    delay: Delay = Field(
        default=timedelta(0),
        description="How long a message waits before its handler runs: a duration such as "
        "500ms; default 0ms.",
    )
    delay_ratio: float = Field(
        default=1.0, ge=0, le=1, description="The share of messages delayed; default 1."
    )

    @model_validator(mode="after")
    def _bounded(self) -> MessageFault:
        if self.delay > MAX_DELAY:
            raise ValueError(f"delay may be at most {int(MAX_DELAY.total_seconds() // 60)}m")
        return self


class ConnectionFault(WireModel):
    """Dropped NATS connections: the runtime closes its socket, as a network cut would."""

    drop_every: Duration = Field(
        description="How often each replica drops its NATS connection: a duration such as 20s."
    )


class Faults(WireModel):
    """The faults the runtime injects, as a ChaosExperiment declares them."""

    model: CallFault | None = Field(
        default=None, description="Latency and errors in an LLM agent's model calls."
    )
    tools: CallFault | None = Field(
        default=None, description="Latency and errors in an LLM agent's tool calls."
    )
    handler: CallFault | None = Field(
        default=None, description="Latency and errors in the handler of each message."
    )
    messages: MessageFault | None = Field(
        default=None, description="Duplicated and delayed messages."
    )
    connection: ConnectionFault | None = Field(
        default=None, description="Dropped NATS connections."
    )

    @property
    def empty(self) -> bool:
        """Whether these faults inject nothing (the runtime then skips every roll)."""
        return all(
            part is None
            for part in (self.model, self.tools, self.handler, self.messages, self.connection)
        )

    def call(self, point: Point) -> CallFault | None:
        """The fault of one injection point."""
        fault: CallFault | None = getattr(self, point)
        return fault


class AgentFaults(WireModel):
    """What the operator writes for one targeted Agent: the faults and when they end."""

    experiment: str = Field(max_length=63, description="The ChaosExperiment's name.")
    run: str = Field(max_length=64, description="Which run of the experiment set them.")
    until: AwareDatetime = Field(description="When the faults end, even if nobody says so.")
    faults: Faults = Field(description="What to inject.")

    def active(self, now: datetime) -> bool:
        """Whether the faults apply at ``now``: not expired, not empty, and ending within
        ``LONGEST_RUN`` (plus ``CLOCK_SKEW``). No run the operator writes for ends later, so
        an entry that does (anyone who may write the bucket, a year-9999 ``until``) would
        only make the agent faulty for good: it injects nothing."""
        return now < self.until <= now + LONGEST_RUN + CLOCK_SKEW and not self.faults.empty


@dataclass(frozen=True)
class Roll:
    """What one call or message gets: a wait first, then (maybe) a failure instead."""

    delay: timedelta = timedelta(0)
    fail: bool = False

    @property
    def harmless(self) -> bool:
        return not self.fail and self.delay <= timedelta(0)


CALM = Roll()


def roll_call(fault: CallFault | None, latency_draw: float, error_draw: float) -> Roll:
    """Decide one call's fate from two uniform draws in [0, 1): a draw below a ratio hits."""
    if fault is None:
        return CALM
    delay = fault.latency if latency_draw < fault.latency_ratio else timedelta(0)
    return Roll(delay=delay, fail=error_draw < fault.error_ratio)


def roll_message(fault: MessageFault | None, delay_draw: float, duplicate_draw: float) -> Roll:
    """Decide one message's delay; ``fail`` here means "deliver it a second time"."""
    if fault is None:
        return CALM
    delay = fault.delay if delay_draw < fault.delay_ratio else timedelta(0)
    return Roll(delay=delay, fail=duplicate_draw < fault.duplicate_ratio)


def parse_entry(raw: bytes, now: datetime) -> AgentFaults | None:
    """An entry of the chaos bucket, or None when it is not (or no longer) in force.

    A malformed entry is treated as none: a bad write by anyone must not break the agent.
    """
    try:
        entry = AgentFaults.model_validate_json(raw)
    except ValueError:
        return None
    return entry if entry.active(now) else None
