"""Observations → status, following kstatus: Ready, Reconciling and Stalled, then the
sub-conditions behind them.

Every failing observation either *stalls* (a person must act: retrying cannot help) or is
*progressing* (the operator keeps at it). Ready is False with the reason and message of the
first failing sub-condition; Stalled (when that one stalls) or Reconciling (otherwise) is
True with the same reason, so kstatus reads Failed or InProgress and the Ready and Reason
printer columns say what is wrong. A condition's ``lastTransitionTime`` changes only when
its status does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from troupe_operator.api import AgentStatus, Condition, WorkflowStatus
from troupe_operator.api.status import ConsumerCounts, LastRun, ObjectStatus, RunCounts
from troupe_operator.builders.problems import Problem
from troupe_runtime.contract.redact import redact
from troupe_runtime.contract.run_state import RunState, run_usage

READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"
SPEC_VALID = "SpecValid"
SECRETS_RESOLVED = "SecretsResolved"
MESSAGING_READY = "MessagingReady"
WORKLOAD_AVAILABLE = "WorkloadAvailable"
LLM_RESOLVED = "LlmResolved"
"""LLM agents only: the ModelProviders, models and agent tools ``spec.llm`` names exist."""
AGENT_SUBCONDITIONS = (
    SPEC_VALID,
    LLM_RESOLVED,
    SECRETS_RESOLVED,
    MESSAGING_READY,
    WORKLOAD_AVAILABLE,
)
ENDPOINT_REACHABLE = "EndpointReachable"
"""ModelProviders: the endpoint answered the probe with a model list."""
PROVIDER_SUBCONDITIONS = (SPEC_VALID, SECRETS_RESOLVED, ENDPOINT_REACHABLE)
DAG_VALID = "DagValid"
AGENTS_FOUND = "AgentsFound"
DAG_CONDITIONS = (DAG_VALID, AGENTS_FOUND)
WORKFLOW_SUBCONDITIONS = (
    SPEC_VALID,
    DAG_VALID,
    AGENTS_FOUND,
    SECRETS_RESOLVED,
    MESSAGING_READY,
    WORKLOAD_AVAILABLE,
)
BUDGETS_FIT = "BudgetsFit"
AUTOSCALED = "Autoscaled"
"""Agents with runtime.autoscale, or scaled by an HPA: who sets replicas, and why. Advisory:
an agent at zero replicas by design is Ready."""
AGENT_ADVISORIES: tuple[str, ...] = (AUTOSCALED,)
WORKFLOW_ADVISORIES = (BUDGETS_FIT,)
"""Reported after the sub-conditions, without holding Ready back: the workflow runs."""

SPEC_INVALID = "SpecInvalid"
RECONCILE_FAILED = "ReconcileFailed"
OBJECT_CONFLICT = "ObjectConflict"
OBJECT_REJECTED = "ObjectRejected"
PODS_CRASHING = "PodsCrashing"
SECRET_NOT_FOUND = "SecretNotFound"
SECRET_KEY_MISSING = "SecretKeyMissing"
CONFIG_MAP_NOT_FOUND = "ConfigMapNotFound"
CONFIG_MAP_KEY_MISSING = "ConfigMapKeyMissing"
PROGRESSING_REASONS = frozenset(
    {
        "DeploymentMissing",
        "RolloutInProgress",
        "ReplicasNotReady",
        "MessagingUnavailable",
        "EngineStopped",
        "ObjectLeaving",
        "Unreachable",
        RECONCILE_FAILED,
    }
)
"""The failures the operator works through by itself. Any other reason of a failing
condition stalls: the open set is that of ``Problem`` reasons, which only a person fixes."""

PROBLEM_CONDITIONS = {
    SECRET_NOT_FOUND: SECRETS_RESOLVED,
    SECRET_KEY_MISSING: SECRETS_RESOLVED,
    CONFIG_MAP_NOT_FOUND: SECRETS_RESOLVED,
    CONFIG_MAP_KEY_MISSING: SECRETS_RESOLVED,
    "SubjectConflict": MESSAGING_READY,
    "StreamRejected": MESSAGING_READY,
    OBJECT_CONFLICT: WORKLOAD_AVAILABLE,
    OBJECT_REJECTED: WORKLOAD_AVAILABLE,
    PODS_CRASHING: WORKLOAD_AVAILABLE,
    "CycleDetected": DAG_VALID,
    "AgentNotFound": AGENTS_FOUND,
    "ProviderMissing": LLM_RESOLVED,
    "ProviderInvalid": LLM_RESOLVED,
    "ModelNotServed": LLM_RESOLVED,
    "AgentToolMissing": LLM_RESOLVED,
}
"""The sub-condition a problem of each reason is reported on; any other reason: SpecValid."""

COST_DIGITS = 6
"""Dollars in status are rounded to a millionth: the same runs always give the same status."""
MESSAGE_LIMIT = 1024
"""Characters of a condition message: the reason must fit a ``kubectl describe`` screen."""

StatusT = TypeVar("StatusT", bound=ObjectStatus)


def timestamp(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def truncate(text: str, limit: int = MESSAGE_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class Observation:
    """One sub-condition as observed now: True when ``reason`` is the good one."""

    type: str
    ok: bool
    reason: str
    message: str
    stalled: bool | None = None
    """Whether a failure needs a person; None: judged by ``reason`` (``stalls``)."""

    @property
    def stalls(self) -> bool:
        if self.ok:
            return False
        return self.stalled if self.stalled is not None else stalls(self.reason)


def stalls(reason: str) -> bool:
    """Whether a failing condition of ``reason`` waits for a person."""
    return reason not in PROGRESSING_REASONS


def problem_condition(problem: Problem) -> str:
    return PROBLEM_CONDITIONS.get(problem.reason, SPEC_VALID)


def problem_observations(
    problems: Sequence[Problem], clear: Iterable[str] = ()
) -> list[Observation]:
    """Stalled observations for ``problems``, one per sub-condition they fall on (the first
    problem's reason, every sentence); each of ``clear`` with no problem is observed good."""
    by_type: dict[str, list[Problem]] = {}
    for problem in problems:
        by_type.setdefault(problem_condition(problem), []).append(problem)
    observed = [
        Observation(
            type,
            False,
            found[0].reason,
            "; ".join(p.sentence() for p in found),
            stalled=True,
        )
        for type, found in by_type.items()
    ]
    return [*observed, *(GOOD[t] for t in clear if t not in by_type and t in GOOD)]


def spec_invalid(message: str) -> Observation:
    """The models refuse the stored spec: ``message`` names the field."""
    return Observation(SPEC_VALID, False, SPEC_INVALID, message, stalled=True)


def reconcile_failed(type: str, message: str) -> Observation:
    """An unexpected failure of a pass, on the sub-condition of the step that failed."""
    return Observation(type, False, RECONCILE_FAILED, f"{message}; retrying with backoff")


SPEC_VALID_OK = Observation(SPEC_VALID, True, "SpecValid", "the spec is valid")
LLM_RESOLVED_OK = Observation(
    LLM_RESOLVED,
    True,
    "Resolved",
    "every ModelProvider, model and agent tool spec.llm names exists",
)
SECRETS_OK = Observation(
    SECRETS_RESOLVED, True, "SecretsFound", "every referenced Secret and ConfigMap exists"
)
GOOD = {SPEC_VALID: SPEC_VALID_OK, SECRETS_RESOLVED: SECRETS_OK}
"""The good observation of the sub-conditions a problem-free pass always observes."""


@dataclass(frozen=True)
class PodCrash:
    """A pod of the workload whose container keeps failing."""

    pod: str
    container: str
    reason: str
    message: str
    exit_code: int | None = None

    def sentence(self) -> str:
        code = f" (exit code {self.exit_code})" if self.exit_code is not None else ""
        said = f": {self.message}" if self.message else ""
        return f"pod {self.pod} container {self.container}: {self.reason}{code}{said}"


@dataclass(frozen=True)
class WorkloadObservation:
    """What the Deployment reports, and its crashing pods."""

    desired: int
    ready: int
    updated: int
    current_generation: bool
    exists: bool = True
    crashes: tuple[PodCrash, ...] = ()

    def condition(self) -> Observation:
        if not self.exists:
            return Observation(WORKLOAD_AVAILABLE, False, "DeploymentMissing", "not created yet")
        progress = f"{self.ready}/{self.desired} replicas ready"
        if self.crashes and self.ready < self.desired:
            crash = self.crashes[0]
            more = f" (and {len(self.crashes) - 1} more)" if len(self.crashes) > 1 else ""
            return Observation(
                WORKLOAD_AVAILABLE,
                False,
                PODS_CRASHING,
                f"{progress}; {crash.sentence()}{more}",
                stalled=True,
            )
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


def secrets_condition(missing: Sequence[Problem]) -> Observation:
    """``missing`` holds one problem per absent Secret, ConfigMap or key."""
    if missing:
        return Observation(
            SECRETS_RESOLVED,
            False,
            missing[0].reason,
            "; ".join(p.sentence() for p in missing),
            stalled=True,
        )
    return SECRETS_OK


def _failing_stalls(condition: Condition, previous_stalled: Condition | None) -> bool:
    """Whether a carried-over failing condition stalls: by its reason, or because the last
    pass said so (a stalled reason this module does not know)."""
    said_so = (
        previous_stalled is not None
        and previous_stalled.status == "True"
        and previous_stalled.reason == condition.reason
    )
    return said_so or stalls(condition.reason)


def merge_conditions(
    previous: list[Condition],
    observed: list[Observation],
    order: tuple[str, ...],
    generation: int,
    now: datetime,
    advisories: tuple[str, ...] = (),
    ready_reason: str = READY,
) -> list[Condition]:
    """Ready, Reconciling and Stalled, then the sub-conditions in ``order``, then
    ``advisories``; unobserved ones are kept as they were. A Ready True has ``ready_reason``.

    Ready is False with the reason of the first sub-condition (in ``order``) that is not
    True, and so is Stalled (that one stalls) or Reconciling (it does not); advisories
    never hold Ready back. Messages are redacted and truncated.
    """
    by_type = {c.type: c for c in previous}
    stalled_by_type = {obs.type: obs.stalls for obs in observed}

    def updated(obs: Observation) -> Condition:
        status: Literal["True", "False"] = "True" if obs.ok else "False"
        old = by_type.get(obs.type)
        return Condition(
            type=obs.type,
            status=status,
            reason=obs.reason,
            message=truncate(redact(obs.message)),
            last_transition_time=(
                old.last_transition_time
                if old is not None and old.status == status
                else timestamp(now)
            ),
            observed_generation=generation,
        )

    previous_stalled = by_type.get(STALLED)
    for obs in observed:
        by_type[obs.type] = updated(obs)
    subconditions = [by_type[t] for t in order if t in by_type]
    failing = next((c for c in subconditions if c.status != "True"), None)
    if failing is None:
        message = "; ".join(c.message for c in subconditions)
        top = [
            Observation(READY, True, ready_reason, message),
            Observation(RECONCILING, False, "Reconciled", "nothing left to do"),
            Observation(STALLED, False, "Reconciled", "nothing left to do"),
        ]
    else:
        stalled = stalled_by_type.get(failing.type)
        if stalled is None:
            stalled = _failing_stalls(failing, previous_stalled)
        reason, message = failing.reason, failing.message
        waiting = "waiting for the spec or the objects it names to be fixed"
        top = [
            Observation(READY, False, reason, message),
            (
                Observation(RECONCILING, False, "Stalled", waiting)
                if stalled
                else Observation(RECONCILING, True, reason, message)
            ),
            (
                Observation(STALLED, True, reason, message)
                if stalled
                else Observation(STALLED, False, "Progressing", "the operator keeps trying")
            ),
        ]
    return [
        *(updated(obs) for obs in top),
        *subconditions,
        *(by_type[t] for t in advisories if t in by_type),
    ]


def with_observations(
    previous: StatusT,
    observed: list[Observation],
    order: tuple[str, ...],
    generation: int,
    now: datetime,
    advisories: tuple[str, ...] = (),
    ready_reason: str = READY,
) -> StatusT:
    """``previous`` with ``observed`` merged in and everything else kept: the status of a
    pass that got no further (a spec the models refuse, a problem, a failure)."""
    conditions = merge_conditions(
        previous.conditions, observed, order, generation, now, advisories, ready_reason
    )
    return previous.model_copy(update={"observed_generation": generation, "conditions": conditions})


def keep_transition_times(
    previous: list[Condition], conditions: list[Condition]
) -> list[Condition]:
    """``conditions`` whose status did not change since ``previous`` keep its transition
    time: for a status computed in more than one merge."""
    by_type = {c.type: c for c in previous}
    kept = []
    for condition in conditions:
        old = by_type.get(condition.type)
        if old is not None and old.status == condition.status:
            condition = condition.model_copy(
                update={"last_transition_time": old.last_transition_time}
            )
        kept.append(condition)
    return kept


@dataclass(frozen=True)
class Transition:
    """A condition that changed in a pass, for an Event: Warning when it turned bad."""

    type: str
    status: str
    reason: str
    message: str
    warning: bool


BAD_STATUS = {READY: "False", RECONCILING: "True", STALLED: "True"}
"""The bad status of the top conditions; a sub-condition's is False."""


def transitions(previous: list[Condition], current: list[Condition]) -> list[Transition]:
    """The conditions whose status changed, or that stayed bad for another reason, in
    order; one that appears counts when it appears bad (or is Ready), so a new object's
    good sub-conditions stay quiet.

    Reconciling=True is progress, not a fault: only Stalled, Ready and sub-conditions warn.
    """
    by_type = {c.type: c for c in previous}
    changed = []
    for condition in current:
        old = by_type.get(condition.type)
        bad = condition.status == BAD_STATUS.get(condition.type, "False")
        if old is None:
            if not bad and condition.type != READY:
                continue
        elif old.status == condition.status and (not bad or old.reason == condition.reason):
            continue
        warning = bad and condition.type != RECONCILING
        changed.append(
            Transition(
                condition.type, condition.status, condition.reason, condition.message, warning
            )
        )
    return changed


def agent_status(
    previous: AgentStatus,
    generation: int,
    now: datetime,
    workload: WorkloadObservation,
    messaging: MessagingObservation | None = None,
    missing_secrets: Sequence[Problem] | None = None,
    config_hash: str | None = None,
    llm_resolved: bool = False,
    autoscaling: Observation | None = None,
) -> AgentStatus:
    """The next status; what this pass did not observe (``None``) is carried over.
    ``llm_resolved``: an LLM agent whose ``spec.llm`` resolved (``LlmResolved`` True);
    ``autoscaling``: the ``Autoscaled`` advisory."""
    observed = [workload.condition()]
    if autoscaling is not None:
        observed.append(autoscaling)
    if llm_resolved:
        observed.append(LLM_RESOLVED_OK)
    if missing_secrets is not None:
        observed.append(secrets_condition(missing_secrets))
    counts, dead_letters = previous.consumers, previous.dead_letters
    if messaging is not None:
        observed.append(messaging.condition())
        if messaging.error is None:
            counts, dead_letters = messaging.counts, messaging.dead_letters
    # A copy: fields this module does not compute (set by the kind) are carried over.
    return previous.model_copy(
        update={
            "observed_generation": generation,
            "conditions": merge_conditions(
                previous.conditions,
                observed,
                AGENT_SUBCONDITIONS,
                generation,
                now,
                AGENT_ADVISORIES,
            ),
            "replicas": workload.desired,
            "ready_replicas": workload.ready,
            "config_hash": config_hash if config_hash is not None else previous.config_hash,
            "consumers": counts,
            "lag": counts.pending + counts.ack_pending,
            "dead_letters": dead_letters,
        }
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
    used = run_usage(run)
    return LastRun(
        id=run.run_id,
        status=run.status,
        started_at=timestamp(run.started_at),
        finished_at=timestamp(run.finished_at) if run.finished_at else None,
        tokens_in=used.tokens_in,
        tokens_out=used.tokens_out,
        cost_usd=round(used.cost_usd, COST_DIGITS),
    )


def workflow_status(
    previous: WorkflowStatus,
    generation: int,
    now: datetime,
    dag: DagObservation | None = None,
    workload: WorkloadObservation | Observation | None = None,
    messaging: MessagingObservation | None = None,
    missing_secrets: Sequence[Problem] | None = None,
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
    return previous.model_copy(
        update={
            "observed_generation": generation,
            "conditions": merge_conditions(
                previous.conditions,
                observed,
                WORKFLOW_SUBCONDITIONS,
                generation,
                now,
                WORKFLOW_ADVISORIES,
            ),
            "steps": dag.steps if dag is not None else previous.steps,
            "runs": runs.counts if runs is not None else previous.runs,
            "last_run": runs.last if runs is not None else previous.last_run,
        }
    )


def without_condition(previous: StatusT, type: str) -> StatusT:
    """``previous`` without the condition ``type``: one that no longer applies (an Agent
    that dropped ``spec.llm`` has nothing to resolve)."""
    kept = [c for c in previous.conditions if c.type != type]
    return (
        previous
        if len(kept) == len(previous.conditions)
        else previous.model_copy(update={"conditions": kept})
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


CRASH_MESSAGE_LIMIT = 300
"""Characters of a termination message kept: its tail, where the error usually is."""


def observe_deployment(
    deployment: dict[str, Any] | None, pods: Sequence[dict[str, Any]] = ()
) -> WorkloadObservation:
    """Read a Deployment manifest (as the API server returns it), and its pods, into an
    observation."""
    if deployment is None:
        return WorkloadObservation(0, 0, 0, current_generation=False, exists=False)
    status = deployment.get("status") or {}
    return WorkloadObservation(
        desired=int(deployment["spec"].get("replicas", 1)),
        ready=int(status.get("readyReplicas", 0)),
        updated=int(status.get("updatedReplicas", 0)),
        current_generation=status.get("observedGeneration", 0)
        >= deployment["metadata"].get("generation", 0),
        crashes=tuple(crash for pod in pods for crash in pod_crashes(pod)),
    )


def pod_crashes(pod: dict[str, Any]) -> list[PodCrash]:
    """The pod's containers that are not ready and keep failing, as a kubelet reports them:
    waiting in CrashLoopBackOff, or last terminated with a non-zero exit code."""
    name = str((pod.get("metadata") or {}).get("name", "?"))
    crashes = []
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        if container.get("ready"):
            continue
        state = container.get("state") or {}
        waiting = state.get("waiting") or {}
        terminated = state.get("terminated") or (container.get("lastState") or {}).get("terminated")
        code = terminated.get("exitCode") if terminated else None
        crashing = waiting.get("reason") == "CrashLoopBackOff"
        if not crashing and not (isinstance(code, int) and code != 0):
            continue
        said = str((terminated or {}).get("message") or waiting.get("message") or "").strip()
        if len(said) > CRASH_MESSAGE_LIMIT:
            said = "…" + said[-CRASH_MESSAGE_LIMIT:]
        reason = str(
            (waiting.get("reason") if crashing else None)
            or (terminated or {}).get("reason")
            or "Error"
        )
        crashes.append(
            PodCrash(
                name,
                str(container.get("name", "?")),
                reason,
                redact(said),
                code if isinstance(code, int) else None,
            )
        )
    return crashes
