"""Observations → status, following kstatus: Ready plus the sub-conditions behind it.

A condition's ``lastTransitionTime`` changes only when its status changes, and
Ready's reason is that of the first sub-condition that is not True, so the
Ready and Reason printer columns say what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from troupe_operator.api import AgentStatus, Condition, WorkflowStatus
from troupe_operator.api.status import ConsumerCounts, LastRun, RunCounts
from troupe_runtime.contract.run_state import RunState

READY = "Ready"
SECRETS_RESOLVED = "SecretsResolved"
MESSAGING_READY = "MessagingReady"
WORKLOAD_AVAILABLE = "WorkloadAvailable"
AGENT_SUBCONDITIONS = (SECRETS_RESOLVED, MESSAGING_READY, WORKLOAD_AVAILABLE)
DAG_VALID = "DagValid"
AGENTS_FOUND = "AgentsFound"
DAG_CONDITIONS = (DAG_VALID, AGENTS_FOUND)
WORKFLOW_SUBCONDITIONS = (
    DAG_VALID,
    AGENTS_FOUND,
    SECRETS_RESOLVED,
    MESSAGING_READY,
    WORKLOAD_AVAILABLE,
)
BUDGETS_FIT = "BudgetsFit"
WORKFLOW_ADVISORIES = (BUDGETS_FIT,)
"""Reported after the sub-conditions, without holding Ready back: the workflow runs."""


def timestamp(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Observation:
    """One sub-condition as observed now: True when ``reason`` is the good one."""

    type: str
    ok: bool
    reason: str
    message: str


@dataclass(frozen=True)
class WorkloadObservation:
    """What the Deployment reports."""

    desired: int
    ready: int
    updated: int
    current_generation: bool
    exists: bool = True

    def condition(self) -> Observation:
        if not self.exists:
            return Observation(WORKLOAD_AVAILABLE, False, "DeploymentMissing", "not created yet")
        progress = f"{self.ready}/{self.desired} replicas ready"
        if not self.current_generation or self.updated < self.desired:
            return Observation(WORKLOAD_AVAILABLE, False, "RolloutInProgress", progress)
        if self.ready < self.desired:
            return Observation(WORKLOAD_AVAILABLE, False, "ReplicasNotReady", progress)
        return Observation(WORKLOAD_AVAILABLE, True, "ReplicasReady", progress)


@dataclass(frozen=True)
class MessagingObservation:
    """JetStream as provisioned and counted in this pass; ``error`` when NATS failed us."""

    url: str
    error: str | None = None
    counts: ConsumerCounts = field(default_factory=ConsumerCounts)
    dead_letters: int = 0

    def condition(self) -> Observation:
        if self.error is not None:
            return Observation(
                MESSAGING_READY,
                False,
                "MessagingUnavailable",
                f"NATS at {self.url}: {self.error}; retrying with backoff",
            )
        return Observation(
            MESSAGING_READY, True, "Provisioned", "streams, consumers and KV buckets in place"
        )


def secrets_condition(missing: list[str]) -> Observation:
    """``missing`` holds one human sentence per absent Secret or key."""
    if missing:
        return Observation(SECRETS_RESOLVED, False, "SecretNotFound", "; ".join(missing))
    return Observation(SECRETS_RESOLVED, True, "SecretsFound", "every referenced Secret exists")


def merge_conditions(
    previous: list[Condition],
    observed: list[Observation],
    order: tuple[str, ...],
    generation: int,
    now: datetime,
    advisories: tuple[str, ...] = (),
) -> list[Condition]:
    """Ready first, then the sub-conditions in ``order``, then ``advisories``; unobserved
    ones are kept as they were.

    Ready is False with the reason of the first sub-condition (in ``order``) that is not
    True; advisories never hold it back.
    """
    by_type = {c.type: c for c in previous}

    def updated(obs: Observation) -> Condition:
        status: Literal["True", "False"] = "True" if obs.ok else "False"
        old = by_type.get(obs.type)
        return Condition(
            type=obs.type,
            status=status,
            reason=obs.reason,
            message=obs.message,
            last_transition_time=(
                old.last_transition_time
                if old is not None and old.status == status
                else timestamp(now)
            ),
            observed_generation=generation,
        )

    for obs in observed:
        by_type[obs.type] = updated(obs)
    subconditions = [by_type[t] for t in order if t in by_type]
    failing = next((c for c in subconditions if c.status != "True"), None)
    if failing is None:
        ready = Observation(READY, True, "Ready", "; ".join(c.message for c in subconditions))
    else:
        ready = Observation(READY, False, failing.reason, failing.message)
    return [updated(ready), *subconditions, *(by_type[t] for t in advisories if t in by_type)]


def agent_status(
    previous: AgentStatus,
    generation: int,
    now: datetime,
    workload: WorkloadObservation,
    messaging: MessagingObservation | None = None,
    missing_secrets: list[str] | None = None,
    config_hash: str | None = None,
) -> AgentStatus:
    """The next status; what this pass did not observe (``None``) is carried over."""
    observed = [workload.condition()]
    if missing_secrets is not None:
        observed.append(secrets_condition(missing_secrets))
    counts, dead_letters = previous.consumers, previous.dead_letters
    if messaging is not None:
        observed.append(messaging.condition())
        if messaging.error is None:
            counts, dead_letters = messaging.counts, messaging.dead_letters
    return AgentStatus(
        observed_generation=generation,
        conditions=merge_conditions(
            previous.conditions, observed, AGENT_SUBCONDITIONS, generation, now
        ),
        replicas=workload.desired,
        ready_replicas=workload.ready,
        config_hash=config_hash if config_hash is not None else previous.config_hash,
        consumers=counts,
        lag=counts.pending + counts.ack_pending,
        dead_letters=dead_letters,
    )


@dataclass(frozen=True)
class DagObservation:
    """The workflow's graph: ``cycles`` lists each cycle's steps; ``unknown_agents`` maps
    an absent agent to what names it."""

    steps: int
    cycles: list[list[str]] = field(default_factory=list)
    unknown_agents: dict[str, list[str]] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        """Whether an engine can run it."""
        return not self.cycles and not self.unknown_agents

    def conditions(self) -> list[Observation]:
        if self.cycles:
            described = "; ".join(" -> ".join([*cycle, cycle[0]]) for cycle in self.cycles)
            dag = Observation(DAG_VALID, False, "CycleDetected", f"steps form a cycle: {described}")
        else:
            dag = Observation(DAG_VALID, True, "Acyclic", f"{self.steps} steps form a DAG")
        if self.unknown_agents:
            described = ", ".join(
                f"{agent} (step {', '.join(names)})"
                for agent, names in sorted(self.unknown_agents.items())
            )
            agents = Observation(
                AGENTS_FOUND, False, "AgentNotFound", f"no such Agent in the namespace: {described}"
            )
        else:
            agents = Observation(AGENTS_FOUND, True, "AgentsFound", "every agentRef names an Agent")
        return [dag, agents]


ENGINE_STOPPED = Observation(
    WORKLOAD_AVAILABLE,
    False,
    "EngineStopped",
    "no engine runs while the workflow is invalid; runs resume once it is fixed",
)


def budgets_condition(problems: list[str]) -> Observation:
    """``problems`` holds one sentence per nested time budget that does not fit."""
    if problems:
        return Observation(BUDGETS_FIT, False, "StepTimeoutTooShort", "; ".join(problems))
    return Observation(
        BUDGETS_FIT, True, "WithinBudgets", "every step's timeout covers its agent's retries"
    )


@dataclass(frozen=True)
class RunObservation:
    """The runs the workflow's stream keeps, by state, and the latest one."""

    counts: RunCounts
    last: LastRun | None


def last_run(run: RunState | None) -> LastRun | None:
    if run is None:
        return None
    return LastRun(
        id=run.run_id,
        status=run.status,
        started_at=timestamp(run.started_at),
        finished_at=timestamp(run.finished_at) if run.finished_at else None,
    )


def workflow_status(
    previous: WorkflowStatus,
    generation: int,
    now: datetime,
    dag: DagObservation | None = None,
    workload: WorkloadObservation | Observation | None = None,
    messaging: MessagingObservation | None = None,
    missing_secrets: list[str] | None = None,
    runs: RunObservation | None = None,
    budgets: list[str] | None = None,
) -> WorkflowStatus:
    """The next status; what this pass did not observe (``None``) is carried over.

    ``workload`` is the engine's Deployment, or ``ENGINE_STOPPED`` for an invalid workflow.
    """
    observed = dag.conditions() if dag is not None else []
    if missing_secrets is not None:
        observed.append(secrets_condition(missing_secrets))
    if messaging is not None:
        observed.append(messaging.condition())
    if workload is not None:
        observed.append(workload if isinstance(workload, Observation) else workload.condition())
    if budgets is not None:
        observed.append(budgets_condition(budgets))
    return WorkflowStatus(
        observed_generation=generation,
        conditions=merge_conditions(
            previous.conditions,
            observed,
            WORKFLOW_SUBCONDITIONS,
            generation,
            now,
            WORKFLOW_ADVISORIES,
        ),
        steps=dag.steps if dag is not None else previous.steps,
        runs=runs.counts if runs is not None else previous.runs,
        last_run=runs.last if runs is not None else previous.last_run,
    )


def merge_patch(previous: dict[str, Any], desired: dict[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns ``previous`` into ``desired``: keys gone
    from ``desired``, at any depth, are set to null so the API server drops them."""
    patch: dict[str, Any] = {key: None for key in previous if key not in desired}
    for key, value in desired.items():
        old = previous.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            patch[key] = merge_patch(old, value)
        else:
            patch[key] = value
    return patch


def observe_deployment(deployment: dict[str, Any] | None) -> WorkloadObservation:
    """Read a Deployment manifest (as the API server returns it) into an observation."""
    if deployment is None:
        return WorkloadObservation(0, 0, 0, current_generation=False, exists=False)
    status = deployment.get("status") or {}
    return WorkloadObservation(
        desired=int(deployment["spec"].get("replicas", 1)),
        ready=int(status.get("readyReplicas", 0)),
        updated=int(status.get("updatedReplicas", 0)),
        current_generation=status.get("observedGeneration", 0)
        >= deployment["metadata"].get("generation", 0),
    )
