"""ChaosExperiments (pure): when a run starts and ends, what is due in it, the figures, the
abort check, the verdict and the status.

A pass (``reconcilers.chaos``) calls ``advance`` (the lifecycle before any I/O: start a
run, end it, abort it), does what the advanced status asks (faults written or removed,
probes sent, pods killed, answers and dead letters read), then ``judge`` (abort thresholds
while running, the verdict once every probe is resolved or the grace is over) and
``conditions``. Everything a later pass needs is in status (the run id, its start and end,
the probes sent, the kill rounds done), so an operator that restarts mid-run resumes the
same run and never starts a second: a run starts only when status names no run, or an
older one, for the window due.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from troupe_operator.api.chaos import (
    Abort,
    ChaosExperimentSpec,
    ChaosExperimentStatus,
    ChaosFigures,
    ChaosTargets,
    SteadyState,
)
from troupe_operator.api.status import Condition
from troupe_operator.builders.spending import resolve_agents
from troupe_operator.builders.status import (
    SPEC_VALID,
    SPEC_VALID_OK,
    Observation,
    merge_conditions,
    timestamp,
)
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.chaos import OPT_IN_LABEL, OPT_IN_VALUE, PROBE_HEADER, AgentFaults
from troupe_runtime.contract.durations import format_duration, parse_duration
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.limits import MAX_JSON_DEPTH
from troupe_runtime.contract.triggers import CronSource, due_fires, next_fire

ONCE = "once"
"""The run id of an experiment without a schedule: it runs once."""
PROBE_SOURCE = "troupe-operator/chaos"
PROBE_TYPE = "troupe.chaos.probe"
ACTIVE = ("Running", "Evaluating")

OPTED_IN = "NamespaceOptedIn"
TARGETS_FOUND = "TargetsFound"
RUN_SETTLED = "RunSettled"
MESSAGING_READY = "MessagingReady"
STEADY_STATE = "SteadyStateHeld"
"""True: the last run's verdict is Passed; False: Failed or Aborted; Unknown before any."""
SUBCONDITIONS = (SPEC_VALID, OPTED_IN, TARGETS_FOUND, MESSAGING_READY, RUN_SETTLED)
ADVISORIES = (STEADY_STATE,)


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def opted_in(namespace: Mapping[str, Any] | None) -> bool:
    """Whether the Namespace (as the API server returns it) carries the opt-in label."""
    labels = ((namespace or {}).get("metadata") or {}).get("labels") or {}
    return bool(labels.get(OPT_IN_LABEL) == OPT_IN_VALUE)


def resolve_targets(
    spec: ChaosExperimentSpec,
    agents: Sequence[Mapping[str, Any]],
    workflows: Sequence[Mapping[str, Any]],
) -> ChaosTargets:
    """The Agents and Workflows the selector picks (none being deleted), sorted."""
    chosen = spec.selector
    return ChaosTargets(
        agents=resolve_agents(chosen.agents, agents) if chosen.agents is not None else [],
        workflows=(
            resolve_agents(chosen.workflows, workflows) if chosen.workflows is not None else []
        ),
    )


def _cron(spec: ChaosExperimentSpec) -> CronSource | None:
    if spec.schedule is None:
        return None
    return CronSource(schedule=spec.schedule, time_zone=spec.time_zone)


def window_id(scheduled: datetime) -> str:
    return "s" + scheduled.astimezone(UTC).strftime("%Y%m%dt%H%M%Sz")


def due_run(
    spec: ChaosExperimentSpec, previous: ChaosExperimentStatus, created: datetime, now: datetime
) -> str | None:
    """The id of the run that should start now, or None.

    Without a schedule: ``ONCE``, when no run has been. With one: the latest window due
    since the last run's start (else the creation), unless it is older than ``duration``:
    a window missed while the operator was away is skipped, not run late.
    """
    cron = _cron(spec)
    if cron is None:
        return ONCE if not previous.run else None
    since = parse_time(previous.started_at) or created
    due = due_fires(cron, since, now, limit=1)
    if not due or now - due[-1] > spec.duration:
        return None
    run = window_id(due[-1])
    return run if run != previous.run else None


def _fresh_run(
    previous: ChaosExperimentStatus,
    run: str,
    generation: int,
    now: datetime,
    spec: ChaosExperimentSpec,
    targets: ChaosTargets,
) -> ChaosExperimentStatus:
    return previous.model_copy(
        update={
            "phase": "Running",
            "run": run,
            "run_generation": generation,
            "started_at": timestamp(now),
            "ends_at": timestamp(now + spec.duration),
            "finished_at": None,
            "probe_rounds": 0,
            "kill_rounds": 0,
            "targets": targets,
            "figures": ChaosFigures(),
            "verdict": None,
            "verdict_reason": "",
        }
    )


def finished(
    status: ChaosExperimentStatus, verdict: str, reason: str, now: datetime
) -> ChaosExperimentStatus:
    """``status`` with its run ended in ``verdict``."""
    return status.model_copy(
        update={
            "phase": verdict,
            "verdict": verdict,
            "verdict_reason": reason,
            "finished_at": timestamp(now),
            "runs": status.runs + 1,
        }
    )


def advance(
    previous: ChaosExperimentStatus,
    spec: ChaosExperimentSpec,
    generation: int,
    created: datetime,
    now: datetime,
    allowed: bool,
    targets: ChaosTargets,
) -> ChaosExperimentStatus:
    """The lifecycle step of one pass, before any I/O.

    A running run is aborted when the experiment is suspended or its Namespace opts out,
    and moves to Evaluating at its end. With no run active, a run starts when one is due,
    the Namespace opts in, the experiment is not suspended and the selector picks a target.
    """
    status = previous
    ends = parse_time(previous.ends_at)
    if previous.phase == "Running":
        if spec.suspend:
            return finished(status, "Aborted", "the experiment was suspended mid-run", now)
        if not allowed:
            return finished(
                status,
                "Aborted",
                f"the Namespace no longer carries {OPT_IN_LABEL}={OPT_IN_VALUE}",
                now,
            )
        if ends is None or now >= ends:
            status = status.model_copy(update={"phase": "Evaluating"})
        return status
    if previous.phase == "Evaluating":
        return status
    cron = _cron(spec)
    update: dict[str, Any] = {"next_run_at": timestamp(next_fire(cron, now)) if cron else None}
    status = status.model_copy(update=update)
    run = due_run(spec, previous, created, now)
    if run is None or spec.suspend or not allowed or not (targets.agents or targets.workflows):
        return status
    return _fresh_run(status, run, generation, now, spec, targets)


# What is due in a run.


def probes_due(status: ChaosExperimentStatus, spec: ChaosExperimentSpec, now: datetime) -> int:
    """How many probes each target Agent should have been sent by ``now``: one at the start
    and one every ``probe.every`` up to the run's end."""
    start, ends = parse_time(status.started_at), parse_time(status.ends_at)
    if start is None or ends is None or now < start:
        return 0
    every = spec.steady_state.probe.every
    last = min(now, ends - timedelta(milliseconds=1))
    return min(int((last - start) / every) + 1, math.ceil(spec.duration / every))


def kill_rounds_due(status: ChaosExperimentStatus, spec: ChaosExperimentSpec, now: datetime) -> int:
    """Pod-kill rounds due by ``now``: the first ``podKills.every`` after the start (the
    probes see the team whole first), then one each ``every``, none at or past the end."""
    kills = spec.faults.pod_kills
    start, ends = parse_time(status.started_at), parse_time(status.ends_at)
    if kills is None or start is None or ends is None:
        return 0
    last = min(now, ends - timedelta(milliseconds=1))
    return max(int((last - start) / kills.every), 0)


def probe_id(experiment: str, run: str, agent: str, index: int) -> str:
    """One probe's id (its message id too: a probe sent again after a restart is one)."""
    return f"chaos-{experiment}-{run}-{agent}-{index}"


def probe_reply_subject(namespace: str, experiment: str, probe: str) -> str:
    """Where the Agent answers a probe: an agent call's reply subject on the namespace's
    event log (the runtime replies only there or to engines and gateways), stored, so an
    answer given while the operator was away is found after it."""
    return naming.agent_call_reply_subject(namespace, f"chaos-{experiment}", probe)


def probe_message(
    namespace: str, experiment: str, spec: ChaosExperimentSpec, probe: str, now: datetime
) -> tuple[dict[str, str], bytes]:
    """The headers and payload of one probe: a binary CloudEvent with the probe header and
    the probe id as message id."""
    probed = spec.steady_state.probe
    data: Any = probed.payload
    if envelope.is_json(probed.content_type):
        data = envelope.decode_json(probed.payload.encode(), MAX_JSON_DEPTH, "payload")
    elif not envelope.is_text(probed.content_type):
        data = probed.payload.encode()
    event = CloudEvent(
        id=probe,
        source=PROBE_SOURCE,
        type=PROBE_TYPE,
        time=now,
        datacontenttype=probed.content_type,
        correlationid=probe,
        replyto=probe_reply_subject(namespace, experiment, probe),
        data=data,
    )
    headers, payload = envelope.to_binary(event)
    headers["Nats-Msg-Id"] = probe
    headers[PROBE_HEADER] = experiment
    return headers, payload


def agent_faults(
    experiment: str, status: ChaosExperimentStatus, spec: ChaosExperimentSpec
) -> AgentFaults | None:
    """What each targeted Agent's key holds during the run (None: no runtime fault)."""
    ends = parse_time(status.ends_at)
    faults = spec.faults.runtime()
    if ends is None or faults.empty:
        return None
    return AgentFaults(experiment=experiment, run=status.run, until=ends, faults=faults)


def encode_faults(faults: AgentFaults) -> bytes:
    return faults.model_dump_json(by_alias=True, exclude_none=True).encode()


def faults_to_write(wanted: bytes, stored: bytes | None) -> bytes | None:
    """The value to write, or None when the key holds it already (an idle pass writes
    nothing)."""
    return None if stored == wanted else wanted


def pod_to_kill(pods: Sequence[Mapping[str, Any]], max_unavailable: int) -> str | None:
    """The pod one kill round deletes from a target: the oldest running one not being
    deleted; none while ``max_unavailable`` pods are already down (not ready, terminating)."""
    alive, down = [], 0
    for pod in pods:
        meta = pod.get("metadata") or {}
        status = pod.get("status") or {}
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or []
        )
        if "deletionTimestamp" in meta or not ready:
            down += 1
        else:
            alive.append((str(meta.get("creationTimestamp") or ""), str(meta.get("name"))))
    if down >= max_unavailable or not alive:
        return None
    return sorted(alive)[0][1]


# Figures, abort and verdict.


@dataclass(frozen=True)
class Answer:
    """A probe's answer as read from the event log: success or failure, and its latency."""

    ok: bool
    latency: timedelta


def p95(latencies: Sequence[timedelta]) -> timedelta | None:
    """The nearest-rank 95th percentile; None without any."""
    if not latencies:
        return None
    ordered = sorted(latencies)
    return ordered[max(math.ceil(0.95 * len(ordered)) - 1, 0)]


def figures(
    previous: ChaosFigures,
    sent: int,
    answers: Sequence[Answer],
    dead_letters: int | None,
    killed: int,
    expired: bool,
) -> ChaosFigures:
    """The run's figures from the answers read; ``expired``: the grace is over, so an
    unanswered probe is lost. ``dead_letters`` None (unread) keeps the figure shown."""
    answered = sum(1 for a in answers if a.ok)
    failed = len(answers) - answered
    pending = max(sent - len(answers), 0)
    lost = pending if expired else 0
    judged = answered + failed + lost
    latency = p95([a.latency for a in answers if a.ok])
    return previous.model_copy(
        update={
            "probes_sent": sent,
            "probes_answered": answered,
            "probes_failed": failed,
            "probes_pending": 0 if expired else pending,
            "probes_lost": lost,
            "success_ratio": round(answered / judged, 4) if judged else None,
            "p95_latency": format_duration(latency) if latency is not None else None,
            "dead_letters_after": (
                dead_letters if dead_letters is not None else previous.dead_letters_after
            ),
            "pods_killed": previous.pods_killed + killed,
        }
    )


def growth(found: ChaosFigures) -> int:
    return max(found.dead_letters_after - found.dead_letters_before, 0)


def abort_reason(abort: Abort, found: ChaosFigures) -> str | None:
    """Why a running run must stop now, or None: a threshold of ``abort`` breached."""
    resolved = found.probes_answered + found.probes_failed
    if abort.min_success_ratio is not None and resolved >= abort.min_probes:
        ratio = found.probes_answered / resolved
        if ratio < abort.min_success_ratio:
            return (
                f"success ratio {ratio:.4g} fell below abort.minSuccessRatio "
                f"{abort.min_success_ratio:g} after {resolved} probes"
            )
    if abort.max_dead_letters is not None and growth(found) > abort.max_dead_letters:
        return (
            f"dead letters grew by {growth(found)}, past abort.maxDeadLetters "
            f"{abort.max_dead_letters}"
        )
    return None


def breaches(steady: SteadyState, found: ChaosFigures) -> list[str]:
    """Every way the figures break the hypothesis (none: it held)."""
    broken = []
    if found.probes_lost:
        broken.append(f"{found.probes_lost} probes lost (neither answered nor failed)")
    if found.success_ratio is not None and found.success_ratio < steady.min_success_ratio:
        broken.append(
            f"success ratio {found.success_ratio:g} below steadyState.minSuccessRatio "
            f"{steady.min_success_ratio:g}"
        )
    limit = steady.max_p95_latency
    if limit is not None and found.p95_latency and parse_duration(found.p95_latency) > limit:
        broken.append(
            f"p95 latency {found.p95_latency} above steadyState.maxP95Latency "
            f"{format_duration(limit)}"
        )
    if steady.max_dead_letters is not None and growth(found) > steady.max_dead_letters:
        broken.append(
            f"dead letters grew by {growth(found)}, past steadyState.maxDeadLetters "
            f"{steady.max_dead_letters}"
        )
    return broken


def verdict(steady: SteadyState, found: ChaosFigures) -> tuple[str, str]:
    """Passed or Failed, and why."""
    broken = breaches(steady, found)
    if broken:
        return "Failed", "; ".join(broken)
    ratio = "n/a" if found.success_ratio is None else f"{found.success_ratio:g}"
    return "Passed", (
        f"the steady state held: {found.probes_answered}/{found.probes_sent} probes answered "
        f"(success ratio {ratio}), p95 {found.p95_latency or 'n/a'}, 0 lost, dead letters "
        f"+{growth(found)}, {found.pods_killed} pods killed"
    )


def judge(
    status: ChaosExperimentStatus, spec: ChaosExperimentSpec, found: ChaosFigures, now: datetime
) -> ChaosExperimentStatus:
    """The status once the run's figures are read: aborted when a threshold is breached
    while running, given its verdict when evaluation is over (nothing pending, or the grace
    after the end passed)."""
    status = status.model_copy(update={"figures": found})
    if status.phase == "Running":
        reason = abort_reason(spec.abort, found)
        return finished(status, "Aborted", reason, now) if reason else status
    if status.phase == "Evaluating":
        ends = parse_time(status.ends_at) or now
        if found.probes_pending == 0 or now >= ends + spec.steady_state.probe.grace:
            said, reason = verdict(spec.steady_state, found)
            return finished(status, said, reason, now)
    return status


def expired(status: ChaosExperimentStatus, spec: ChaosExperimentSpec, now: datetime) -> bool:
    """Whether the grace after the run is over (unanswered probes are then lost)."""
    ends = parse_time(status.ends_at)
    return (
        status.phase == "Evaluating"
        and ends is not None
        and now >= ends + spec.steady_state.probe.grace
    )


# Conditions.


def _observations(
    status: ChaosExperimentStatus,
    spec: ChaosExperimentSpec,
    allowed: bool,
    targets: ChaosTargets,
    messaging_error: str | None,
    namespace: str,
) -> list[Observation]:
    observed = [SPEC_VALID_OK]
    if allowed:
        observed.append(
            Observation(OPTED_IN, True, "OptedIn", f"{OPT_IN_LABEL}={OPT_IN_VALUE} is set")
        )
    else:
        observed.append(
            Observation(
                OPTED_IN,
                False,
                "NamespaceNotOptedIn",
                f"Namespace {namespace} does not carry the label {OPT_IN_LABEL}="
                f"{OPT_IN_VALUE}: label it to let ChaosExperiments target its Agents",
                stalled=True,
            )
        )
    if status.phase in ACTIVE or targets.agents or targets.workflows:
        shown = status.targets if status.phase in ACTIVE else targets
        picked = ", ".join([*shown.agents, *(f"workflow/{w}" for w in shown.workflows)])
        observed.append(Observation(TARGETS_FOUND, True, "TargetsFound", picked))
    else:
        observed.append(
            Observation(
                TARGETS_FOUND,
                False,
                "NoTargets",
                "spec.selector picks no Agent or Workflow of this namespace",
                stalled=True,
            )
        )
    if messaging_error is None:
        observed.append(Observation(MESSAGING_READY, True, "Reachable", "NATS answers"))
    else:
        observed.append(
            Observation(MESSAGING_READY, False, "MessagingUnavailable", messaging_error)
        )
    if status.phase in ACTIVE:
        observed.append(
            Observation(
                RUN_SETTLED,
                False,
                status.phase,
                f"run {status.run} is {status.phase.lower()} until {status.ends_at}",
                stalled=False,
            )
        )
    else:
        said = f"the last run was {status.phase}" if status.verdict else "no run in progress"
        observed.append(Observation(RUN_SETTLED, True, "Settled", said))
    if status.verdict is not None:
        observed.append(
            Observation(
                STEADY_STATE,
                status.verdict == "Passed",
                status.verdict,
                status.verdict_reason,
                stalled=False,
            )
        )
    return observed


def conditions(
    previous: list[Condition],
    status: ChaosExperimentStatus,
    spec: ChaosExperimentSpec,
    generation: int,
    now: datetime,
    allowed: bool,
    targets: ChaosTargets,
    messaging_error: str | None,
    namespace: str,
) -> list[Condition]:
    """Ready (True once a run ended or while waiting for the schedule, with the verdict as
    its reason), Reconciling while a run is in progress, Stalled when the Namespace does not
    opt in or the selector picks nothing; SteadyStateHeld reports the verdict."""
    observed = _observations(status, spec, allowed, targets, messaging_error, namespace)
    ready = status.verdict or ("Suspended" if spec.suspend else "Waiting")
    return merge_conditions(
        previous, observed, SUBCONDITIONS, generation, now, ADVISORIES, ready_reason=ready
    )


def spec_invalid_status(
    previous: ChaosExperimentStatus, generation: int, now: datetime, message: str
) -> ChaosExperimentStatus:
    """A spec the models refuse: Stalled naming the field; a run in progress is aborted
    (its faults are removed by the pass)."""
    status = previous
    if status.phase == "Running":
        status = finished(status, "Aborted", f"the spec became invalid: {message}", now)
    if status.phase == "Evaluating":
        status = finished(status, "Aborted", f"the spec became invalid: {message}", now)
    observed = Observation(SPEC_VALID, False, "SpecInvalid", message, stalled=True)
    merged = merge_conditions(
        status.conditions, [observed], SUBCONDITIONS, generation, now, ADVISORIES
    )
    return status.model_copy(update={"observed_generation": generation, "conditions": merged})
