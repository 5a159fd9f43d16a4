"""The ChaosExperiment API: faults injected into a team's Agents for a while, and a verdict.

An experiment targets the Agents (and Workflows, whose engine pods may be killed) of its own
namespace that ``selector`` picks, and only when that Namespace opts in with the label
``troupe.dev/chaos: enabled`` (``contract.chaos.OPT_IN_LABEL``): a person who may create
objects in a namespace may not break another team's. There is no cross-namespace selector.

A run lasts ``duration``: once on creation, or at each window of ``schedule``. During a run
the operator writes the contract's ``Faults`` for each targeted Agent (the runtime injects
them), kills pods at ``faults.podKills`` and sends probe messages; after it, the
``steadyState`` hypothesis (Chaos Toolkit's term) is judged on what the probes and the
dead-letter streams showed: Passed or Failed. ``abort`` thresholds stop a run at once
(Aborted), as do suspending the experiment or the Namespace opting out.

``faults`` embeds the runtime contract's ``Faults`` unchanged (the operator copies it into
each ``AgentFaults``), plus ``podKills``, which is the operator's own work.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Literal

from pydantic import Field, field_validator, model_validator

from troupe_operator.api.common import ApiModel, rule
from troupe_operator.api.status import ObjectStatus
from troupe_runtime.contract import envelope
from troupe_runtime.contract.budget import LabelSelector
from troupe_runtime.contract.chaos import LONGEST_RUN, Faults
from troupe_runtime.contract.durations import Duration, format_duration
from troupe_runtime.contract.triggers import (
    SCHEDULE_MAX,
    TIME_ZONE_MAX,
    schedule_problem,
    time_zone_problem,
)

MAX_RUN = LONGEST_RUN
"""The longest run: faults that last longer are an outage, not an experiment (the runtime
ignores an entry ending later than this after it reads it)."""
MAX_PROBES = 2000
"""Probes one run may send per Agent (duration / probe.every): each is looked up after it."""
MAX_PAYLOAD = 16 * 1024
"""Characters of a probe's payload."""

Phase = Literal["Pending", "Running", "Evaluating", "Passed", "Failed", "Aborted"]
Verdict = Literal["Passed", "Failed", "Aborted"]

CHAOS_RULES = [
    rule(
        "has(self.spec.selector.agents) || has(self.spec.selector.workflows)",
        "selector needs agents or workflows",
        ".spec.selector",
    ),
    rule(
        "duration(self.spec.duration) <= duration('24h')",
        "duration may be at most 24h",
        ".spec.duration",
    ),
]
"""What the models' validators refuse that CEL can say; a cron expression, a time zone, a
JSON payload and the probe count (CEL cannot divide durations) the operator reports
(Stalled, reason SpecInvalid), as Triggers do."""


class ChaosSelector(ApiModel):
    """What the experiment targets, in its own namespace: Agents and Workflows by label."""

    agents: LabelSelector | None = Field(
        default=None,
        description="Agents to inject faults into, kill pods of and probe; {} selects every "
        "Agent of the namespace.",
    )
    workflows: LabelSelector | None = Field(
        default=None,
        description="Workflows whose engine pods podKills kills (a Workflow has no faults "
        "or probes of its own: its steps' Agents do); {} selects every Workflow.",
    )


class PodKills(ApiModel):
    """Pod kills: every ``every``, one pod of each target's Deployment is deleted."""

    every: Duration = Field(
        description="How often each target loses a pod: a duration such as 10s."
    )
    graceful: bool = Field(
        default=True,
        description="true: the pod's own grace period (the runtime drains); false: "
        "gracePeriodSeconds 0, as a node crash. Default true.",
    )
    max_unavailable: int = Field(
        default=1,
        ge=1,
        le=100,
        description="A target with this many pods not ready or terminating is spared until "
        "they recover; default 1.",
    )


class ChaosFaults(Faults):
    """The runtime's faults (contract ``Faults``) and the operator's pod kills."""

    pod_kills: PodKills | None = Field(
        default=None, description="Pods of the targeted Agents' and Workflows' Deployments."
    )

    def runtime(self) -> Faults:
        """What the runtime injects: these faults without the pod kills."""
        return Faults.model_validate(self.model_dump(exclude={"pod_kills"}))


class Probe(ApiModel):
    """The messages the operator sends each targeted Agent during a run, marked with the
    ``Troupe-Chaos-Probe`` header, each answered on a reply subject of its own."""

    every: Duration = Field(
        default=timedelta(seconds=1),
        description="One probe per Agent this often: a duration such as 500ms; default 1s.",
    )
    payload: str = Field(
        default="{}",
        max_length=MAX_PAYLOAD,
        description="The probe's data, as text; default {}. JSON when contentType is JSON.",
    )
    content_type: str = Field(
        default=envelope.JSON_CONTENT_TYPE,
        max_length=128,
        pattern=r"^[!-~]+(; ?[!-~]+)*$",
        description="The probe's datacontenttype; default application/json.",
    )
    grace: Duration = Field(
        default=timedelta(seconds=15),
        description="How long after the run a probe may still be answered, a duration such "
        "as 30s; after it, an unanswered probe is lost; default 15s.",
    )

    @model_validator(mode="after")
    def _payload(self) -> Probe:
        if envelope.is_json(self.content_type):
            try:
                json.loads(self.payload)
            except ValueError as error:
                raise ValueError(
                    f"payload is not JSON ({error}); fix it or set contentType"
                ) from error
        return self


class SteadyState(ApiModel):
    """The hypothesis a run must keep: judged on the probes and the dead letters after the
    run. Lost probes (neither answered nor failed within the grace) always fail it."""

    min_success_ratio: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="The share of probes answered successfully, from 0 to 1; default 1.",
    )
    max_p95_latency: Duration | None = Field(
        default=None,
        description="The most the answered probes' 95th percentile latency may be: a "
        "duration such as 2s; unset: not judged.",
    )
    max_dead_letters: int | None = Field(
        default=None,
        ge=0,
        description="How many messages the targeted Agents' dead-letter streams may gain "
        "during the run; unset: not judged.",
    )
    probe: Probe = Field(default_factory=Probe, description="The probe messages.")


class Abort(ApiModel):
    """Thresholds that end a run at once (faults removed, verdict Aborted), checked while it
    runs once ``minProbes`` probes have been resolved."""

    min_success_ratio: float | None = Field(
        default=None, ge=0, le=1, description="Abort below this success ratio; unset: never."
    )
    max_dead_letters: int | None = Field(
        default=None, ge=0, description="Abort past this dead-letter growth; unset: never."
    )
    min_probes: int = Field(
        default=5,
        ge=1,
        description="Resolved probes needed before the success ratio is judged; default 5.",
    )


class ChaosExperimentSpec(ApiModel):
    """Which targets, when, which faults, and what must hold."""

    selector: ChaosSelector = Field(description="The targets, in this namespace only.")
    schedule: str | None = Field(
        default=None,
        max_length=SCHEDULE_MAX,
        description="A cron expression (5 fields, or 6 with seconds last): a run at each "
        "window; unset: one run, when the experiment is created.",
    )
    time_zone: str = Field(
        default="UTC",
        max_length=TIME_ZONE_MAX,
        description="The schedule's IANA time zone, such as Europe/Paris; default UTC.",
    )
    duration: Duration = Field(
        description="How long each run injects faults: a duration such as 30s."
    )
    faults: ChaosFaults = Field(default_factory=ChaosFaults, description="What to inject.")
    steady_state: SteadyState = Field(
        default_factory=SteadyState, description="What must hold for the verdict Passed."
    )
    abort: Abort = Field(default_factory=Abort, description="What stops a run at once.")
    suspend: bool = Field(
        default=False,
        description="true: no run starts, and a run in progress is aborted. Default false.",
    )

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        if value is not None and (problem := schedule_problem(value)):
            raise ValueError(problem)
        return value

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, value: str) -> str:
        if problem := time_zone_problem(value):
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _bounded(self) -> ChaosExperimentSpec:
        if self.selector.agents is None and self.selector.workflows is None:
            raise ValueError("selector needs agents or workflows")
        if self.duration > MAX_RUN:
            raise ValueError(f"duration may be at most {format_duration(MAX_RUN)}")
        if self.duration / self.steady_state.probe.every > MAX_PROBES:
            raise ValueError(
                f"duration / steadyState.probe.every may be at most {MAX_PROBES} probes"
            )
        return self


class ChaosTargets(ApiModel):
    """What the current run targets, resolved from the selector when it started."""

    agents: list[str] = Field(default_factory=list, description="Agents, sorted.")
    workflows: list[str] = Field(default_factory=list, description="Workflows, sorted.")


class ChaosFigures(ApiModel):
    """What the current (or last) run observed."""

    probes_sent: int = Field(default=0, description="Probes published.")
    probes_answered: int = Field(default=0, description="Answered successfully.")
    probes_failed: int = Field(
        default=0, description="Answered with a failure (the runtime's error reply)."
    )
    probes_pending: int = Field(default=0, description="Not answered yet.")
    probes_lost: int = Field(
        default=0, description="Not answered within steadyState.probe.grace after the run."
    )
    success_ratio: float | None = Field(
        default=None, description="answered / (answered + failed + lost); unset before any."
    )
    p95_latency: str | None = Field(
        default=None, description="The answered probes' 95th percentile latency, such as 120ms."
    )
    dead_letters_before: int = Field(
        default=0, description="Messages in the targets' dead-letter streams at the start."
    )
    dead_letters_after: int = Field(default=0, description="The same, last read.")
    pods_killed: int = Field(default=0, description="Pods deleted by the run.")


class ChaosExperimentStatus(ObjectStatus):
    """The run in progress (or the last one) and its verdict."""

    phase: Phase = Field(
        default="Pending",
        description="Pending (no run yet, or the next scheduled), Running, Evaluating (the "
        "faults are off, late answers are awaited), then Passed, Failed or Aborted.",
    )
    run: str = Field(default="", description="The current (or last) run's id.")
    run_generation: int = Field(
        default=0, description="The metadata.generation the run started at."
    )
    started_at: str | None = Field(default=None, description="RFC 3339: the run's start.")
    ends_at: str | None = Field(
        default=None, description="RFC 3339: when its faults end (start + duration)."
    )
    finished_at: str | None = Field(default=None, description="RFC 3339: the verdict's time.")
    probe_rounds: int = Field(
        default=0, description="Probes sent to each targeted Agent in the run."
    )
    kill_rounds: int = Field(
        default=0, description="Pod-kill rounds done in the run (one per podKills.every)."
    )
    targets: ChaosTargets = Field(default_factory=ChaosTargets)
    figures: ChaosFigures = Field(default_factory=ChaosFigures)
    verdict: Verdict | None = Field(
        default=None, description="Passed, Failed or Aborted; unset until the run ends."
    )
    verdict_reason: str = Field(default="", description="Why: the figure and its threshold.")
    runs: int = Field(default=0, description="Runs ended so far.")
    next_run_at: str | None = Field(
        default=None, description="RFC 3339: the next scheduled run; schedule only."
    )


__all__ = ["CHAOS_RULES", "ChaosExperimentSpec", "ChaosExperimentStatus"]
