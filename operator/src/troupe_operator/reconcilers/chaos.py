"""ChaosExperiments: a pass starts, drives, ends and judges a run, level-based from status.

A pass reads the spec, the Namespace's opt-in label and the targets, advances the lifecycle
purely (``builders.chaos.advance``), then converges: while Running, each targeted Agent's
key in the namespace's chaos bucket holds the run's ``AgentFaults`` (written only when it
differs), the probes due are published to its inbox (``Nats-Msg-Id`` the probe id, so one
sent again after a restart is one message) and a pod of each target is deleted at each kill
round; while Running or Evaluating the answers are read from the event log and the
dead-letter streams are counted; when not Running the experiment's entries are removed.
``builders.chaos.judge`` then aborts or gives the verdict, and status is written (an idle
pass writes nothing). Probes, faults and answers live on the operator's NATS
(``TROUPE_NATS_URL``), as Budgets and Triggers do: the operator assumes its Agents use it.

Passes run on create, update and resume, and from ``chaos_forever`` on the operator's
leader: every ``TICK_SECONDS`` for the runs in progress, every ``RESCAN_SECONDS`` for the
others (a schedule's next window, a Namespace that opted in since). Deleting an experiment
removes its entries at once (``forget``, on the watch's DELETED event: there is no
finalizer, so nothing can block deletion); missed that, every entry ends by itself at its
``until``, and ``sweep`` removes the entries of experiments that no longer exist.

What the process remembers (``ProbeBook``: when each probe was sent, the answers read) is
a cache: after a restart the answers are read again from the event log, and a probe's
latency is measured from its scheduled time instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from troupe_operator import metrics
from troupe_operator.api.chaos import ChaosExperimentSpec, ChaosExperimentStatus
from troupe_operator.builders import chaos as builders
from troupe_operator.builders import status as status_builders
from troupe_operator.builders.engine import WORKFLOW_LABEL
from troupe_operator.builders.workload import AGENT_LABEL
from troupe_operator.clients.nats import MessagingUnavailable, NatsTarget
from troupe_operator.reconcilers.common import (
    Operator,
    announce,
    regarding,
    spec_problems,
    write_status,
)
from troupe_runtime.contract import naming
from troupe_runtime.contract.chaos import AgentFaults
from troupe_runtime.contract.durations import parse_duration
from troupe_runtime.contract.envelope import ERROR_TYPE
from troupe_runtime.contract.redact import redact
from troupe_runtime.nats.provision import chaos_bucket_config
from troupe_runtime.nats.publish import NoStream

KIND = "ChaosExperiment"
PLURAL = "chaosexperiments"
TICK_SECONDS = 0.5
"""How often a run in progress is driven: the resolution of probes and kill rounds."""
RESCAN_SECONDS = 5.0
"""How often an experiment with no run in progress is looked at."""
SWEEP_EVERY = 60
"""Ticks between sweeps for entries no experiment owns."""
PASS_CONCURRENCY = 8
LOOKUPS_PER_PASS = 256
"""Unanswered probes looked up in one pass at most (one request each): a target that never
answers must not make every tick a flood; the rest are looked up by the next passes, and
all of them once the grace is over, before any is counted lost."""
logger = logging.getLogger(__name__)


RunKey = tuple[str, str, str]
"""(namespace, experiment, run): whose probes a ``ProbeBook`` entry is."""


@dataclass
class ProbeBook:
    """This process's memory of probes: when each was sent, and the answers read already
    (an answer, once stored, does not change). A cache only: the event log is the truth.

    Kept per (namespace, experiment, run): probe ids name neither the namespace nor, without
    ambiguity, the experiment (``chaos-a-once-…`` could be experiment ``a`` or ``a-once``),
    so keying by id alone would let one experiment count another's answers."""

    sent_at: dict[RunKey, dict[str, datetime]] = field(default_factory=dict)
    answers: dict[RunKey, dict[str, builders.Answer]] = field(default_factory=dict)
    namespaces: set[str] = field(default_factory=set)
    """Namespaces this process wrote faults to: where ``sweep`` looks."""
    running: set[tuple[str, str]] = field(default_factory=set)
    """Experiments (namespace, name) whose last pass left a run in progress: while there
    are none, a tick between rescans lists nothing (an idle operator stays quiet)."""

    def sent(self, run: RunKey) -> dict[str, datetime]:
        return self.sent_at.setdefault(run, {})

    def answered(self, run: RunKey) -> dict[str, builders.Answer]:
        return self.answers.setdefault(run, {})

    def forget(self, namespace: str, experiment: str, run: str | None = None) -> None:
        """Drop what is kept of an experiment's probes: of ``run``, or of all its runs."""
        for kept in (self.sent_at, self.answers):
            for key in [k for k in kept if k[:2] == (namespace, experiment)]:
                if run is None or key[2] == run:
                    del kept[key]


def target(operator: Operator) -> NatsTarget:
    """Chaos lives on the operator's own NATS, with its own credentials."""
    return NatsTarget(operator.settings.nats_url, replicas=operator.settings.nats_replicas)


def _created(meta: Mapping[str, Any]) -> datetime:
    return builders.parse_time(str(meta.get("creationTimestamp") or "")) or datetime.now(UTC)


async def chaos_pass(operator: Operator, book: ProbeBook, body: Mapping[str, Any]) -> str | None:
    """One pass over one experiment, under its lock (read again there: one deleted while the
    pass waited does nothing); returns what blocks it (NATS unreachable), or None."""
    meta = body["metadata"]
    namespace, name = str(meta["namespace"]), str(meta["name"])
    async with operator.lock(KIND, namespace, name):
        fresh = await operator.kube.read_custom(PLURAL, namespace, name)
        if fresh is None or "deletionTimestamp" in fresh["metadata"]:
            return None
        with metrics.reconcile_timer(KIND):
            return await _chaos_pass(operator, book, fresh)


async def _write(
    operator: Operator, namespace: str, name: str, new: ChaosExperimentStatus
) -> ChaosExperimentStatus | None:
    """Write ``new`` (transition times kept), announcing conditions that changed; the
    status as it was before, or None when nothing was written."""
    found: list[ChaosExperimentStatus] = []

    async def compute(body: dict[str, Any]) -> ChaosExperimentStatus:
        previous = ChaosExperimentStatus.model_validate(body.get("status") or {})
        found.append(previous)
        conditions = status_builders.keep_transition_times(previous.conditions, new.conditions)
        return new.model_copy(update={"conditions": conditions})

    written = await write_status(operator.kube, PLURAL, namespace, name, compute)
    await announce(operator.kube, KIND, written)
    return found[-1] if written is not None and found else None


async def _chaos_pass(operator: Operator, book: ProbeBook, body: Mapping[str, Any]) -> str | None:
    meta = body["metadata"]
    namespace, name = str(meta["namespace"]), str(meta["name"])
    generation = int(meta.get("generation") or 1)
    previous = ChaosExperimentStatus.model_validate(body.get("status") or {})
    raw_spec = body.get("spec") or {}
    now = datetime.now(UTC)
    try:
        spec = ChaosExperimentSpec.model_validate(raw_spec)
    except ValidationError as error:
        said = "; ".join(p.sentence() for p in spec_problems(error, raw_spec))
        new = builders.spec_invalid_status(previous, generation, now, said)
        await _remove_faults(operator, namespace, name, previous.targets.agents)
        await _finish(operator, book, body, previous, new)
        return None
    allowed = builders.opted_in(await operator.kube.read_namespace(namespace))
    agents = await operator.kube.list_custom("agents", namespace)
    workflows = (
        await operator.kube.list_custom("workflows", namespace)
        if spec.selector.workflows is not None
        else []
    )
    targets = builders.resolve_targets(spec, agents, workflows)
    status = builders.advance(previous, spec, generation, _created(meta), now, allowed, targets)
    unreachable: str | None = None
    try:
        status = await _drive(operator, book, namespace, name, spec, previous, status, now)
    except MessagingUnavailable as unavailable:
        unreachable = redact(str(unavailable))
        logger.warning("%s %s/%s: NATS unavailable: %s", KIND, namespace, name, unreachable)
    conditions = builders.conditions(
        previous.conditions, status, spec, generation, now, allowed, targets, unreachable, namespace
    )
    new = status.model_copy(update={"observed_generation": generation, "conditions": conditions})
    await _finish(operator, book, body, previous, new)
    return f"NATS unavailable: {unreachable}" if unreachable is not None else None


async def _drive(
    operator: Operator,
    book: ProbeBook,
    namespace: str,
    name: str,
    spec: ChaosExperimentSpec,
    previous: ChaosExperimentStatus,
    status: ChaosExperimentStatus,
    now: datetime,
) -> ChaosExperimentStatus:
    """The I/O the advanced status asks for, then the judgement."""
    agents = status.targets.agents
    if status.phase not in builders.ACTIVE:
        await _remove_faults(operator, namespace, name, [*previous.targets.agents, *agents])
        return status
    if status.run != previous.run or previous.phase not in builders.ACTIVE:
        before = await _dead_letters(operator, namespace, agents)
        figures = status.figures.model_copy(
            update={"dead_letters_before": before, "dead_letters_after": before}
        )
        status = status.model_copy(update={"figures": figures})
        book.forget(namespace, name)
    killed = 0
    if status.phase == "Running":
        await _write_faults(operator, book, namespace, name, spec, status)
        status = await _send_probes(operator, book, namespace, name, spec, status, now)
        status, killed = await _kill_pods(operator, namespace, name, spec, status, now)
    elif previous.phase == "Running":
        # The run ended since the last pass: the probes due before its end that no pass
        # sent yet (a tick late, or the operator away) go now, so every run sends them all.
        await _remove_faults(operator, namespace, name, agents)
        status = await _send_probes(operator, book, namespace, name, spec, status, now)
    answers = await _answers(operator, book, namespace, name, spec, status, now)
    figures = builders.figures(
        status.figures,
        status.figures.probes_sent,
        answers,
        await _dead_letters(operator, namespace, agents),
        killed,
        builders.expired(status, spec, now),
    )
    judged = builders.judge(status, spec, figures, now)
    if judged.phase not in builders.ACTIVE:
        await _remove_faults(operator, namespace, name, agents)
    return judged


async def _write_faults(
    operator: Operator,
    book: ProbeBook,
    namespace: str,
    name: str,
    spec: ChaosExperimentSpec,
    status: ChaosExperimentStatus,
) -> None:
    wanted = builders.agent_faults(name, status, spec)
    if wanted is None:
        return
    value = builders.encode_faults(wanted)
    book.namespaces.add(namespace)
    for agent in status.targets.agents:
        written = await operator.nats.sync_directory(
            target(operator),
            chaos_bucket_config(namespace),
            naming.chaos_faults_key(agent),
            lambda stored: builders.faults_to_write(value, stored),
        )
        if written:
            logger.info("%s %s/%s: faults written for Agent %s", KIND, namespace, name, agent)


async def _remove_faults(operator: Operator, namespace: str, name: str, agents: list[str]) -> None:
    """Purge the keys of ``agents`` that hold an entry of this experiment (another
    experiment's entry is its own)."""
    bucket = naming.chaos_bucket(namespace)
    for agent in sorted(set(agents)):
        key = naming.chaos_faults_key(agent)
        stored = await operator.nats.read_key(target(operator), bucket, key)
        if not stored:
            continue
        try:
            entry = AgentFaults.model_validate_json(stored)
        except ValueError:
            continue
        if entry.experiment == name:
            await operator.nats.withdraw(target(operator), bucket, key)
            logger.info("%s %s/%s: faults removed from Agent %s", KIND, namespace, name, agent)


async def _send_probes(
    operator: Operator,
    book: ProbeBook,
    namespace: str,
    name: str,
    spec: ChaosExperimentSpec,
    status: ChaosExperimentStatus,
    now: datetime,
) -> ChaosExperimentStatus:
    """Publish the probes due; an Agent whose inbox no stream stores gets none (its probes
    stay unanswered, so lost: the verdict says so)."""
    due = builders.probes_due(status, spec, now)
    for index in range(status.probe_rounds, due):
        for agent in status.targets.agents:
            probe = builders.probe_id(name, status.run, agent, index)
            headers, payload = builders.probe_message(namespace, name, spec, probe, now)
            try:
                await operator.nats.publish(
                    target(operator), naming.inbox_subject(namespace, agent, 0), headers, payload
                )
            except NoStream as error:
                logger.warning(
                    "%s %s/%s: probe %s not sent: %s", KIND, namespace, name, probe, error
                )
                continue
            book.sent((namespace, name, status.run)).setdefault(probe, now)
    rounds = max(due, status.probe_rounds)
    figures = status.figures.model_copy(update={"probes_sent": rounds * len(status.targets.agents)})
    return status.model_copy(update={"probe_rounds": rounds, "figures": figures})


async def _kill_pods(
    operator: Operator,
    namespace: str,
    name: str,
    spec: ChaosExperimentSpec,
    status: ChaosExperimentStatus,
    now: datetime,
) -> tuple[ChaosExperimentStatus, int]:
    """One kill round when one is due (rounds missed while the operator was away are not
    made up: they would kill several pods of a target at once)."""
    kills = spec.faults.pod_kills
    due = builders.kill_rounds_due(status, spec, now)
    if kills is None or due <= status.kill_rounds:
        return status, 0
    killed = 0
    grace = None if kills.graceful else 0
    labelled = [(AGENT_LABEL, a) for a in status.targets.agents]
    labelled += [(WORKFLOW_LABEL, w) for w in status.targets.workflows]
    for label, owner in labelled:
        pods = await operator.kube.list_pods(namespace, {label: owner})
        pod = builders.pod_to_kill(pods, kills.max_unavailable)
        if pod is None:
            continue
        if await operator.kube.delete_pod(namespace, pod, grace):
            killed += 1
            logger.info("%s %s/%s: killed pod %s (%s)", KIND, namespace, name, pod, owner)
    return status.model_copy(update={"kill_rounds": due}), killed


def _answer(
    message_headers: Mapping[str, str], stored: datetime | None, sent: datetime
) -> builders.Answer:
    lowered = {k.lower(): v for k, v in message_headers.items()}
    latency = (stored - sent) if stored is not None else timedelta(0)
    return builders.Answer(
        ok=lowered.get("ce-type") != ERROR_TYPE, latency=max(latency, timedelta(0))
    )


async def _answers(
    operator: Operator,
    book: ProbeBook,
    namespace: str,
    name: str,
    spec: ChaosExperimentSpec,
    status: ChaosExperimentStatus,
    now: datetime,
) -> list[builders.Answer]:
    """The answers of the run's probes sent so far: those read before, and the rest looked
    up on the event log by their reply subjects."""
    start = builders.parse_time(status.started_at) or datetime.now(UTC)
    every = spec.steady_state.probe.every
    run = (namespace, name, status.run)
    sent_at, answered = book.sent(run), book.answered(run)
    wanted: dict[str, tuple[str, datetime]] = {}
    for index in range(status.probe_rounds):
        for agent in status.targets.agents:
            probe = builders.probe_id(name, status.run, agent, index)
            if probe not in answered:
                sent = sent_at.get(probe, start + every * index)
                subject = builders.probe_reply_subject(namespace, name, probe)
                wanted[subject] = (probe, sent)
    if not builders.expired(status, spec, now):
        wanted = dict(list(wanted.items())[:LOOKUPS_PER_PASS])
    if wanted:
        found = await operator.nats.last_messages(
            target(operator), naming.event_log_stream(namespace), list(wanted)
        )
        for subject, message in found.items():
            probe, sent = wanted[subject]
            answered[probe] = _answer(message.headers, message.time, sent)
    return list(answered.values())


async def _dead_letters(operator: Operator, namespace: str, agents: list[str]) -> int:
    total = 0
    for agent in agents:
        total += await operator.nats.stream_messages(
            target(operator), naming.dead_letter_stream(namespace, agent)
        )
    return total


async def _finish(
    operator: Operator,
    book: ProbeBook,
    body: Mapping[str, Any],
    previous: ChaosExperimentStatus,
    new: ChaosExperimentStatus,
) -> None:
    """Write status, then the Events of a run that started or ended, and the gauges."""
    meta = body["metadata"]
    namespace, name = str(meta["namespace"]), str(meta["name"])
    await _write(operator, namespace, name, new)
    about = regarding(KIND, body)
    started = new.run != previous.run or previous.phase not in builders.ACTIVE
    if new.run and started and new.phase in builders.ACTIVE:
        picked = ", ".join([*new.targets.agents, *new.targets.workflows])
        await operator.kube.create_event(
            about, "Normal", "RunStarted", f"run {new.run} started against {picked}"
        )
    if (
        new.verdict is not None
        and (previous.phase in builders.ACTIVE or new.run != previous.run)
        and new.phase not in builders.ACTIVE
    ):
        await operator.kube.create_event(
            about,
            "Normal" if new.verdict == "Passed" else "Warning",
            new.verdict,
            f"run {new.run}: {new.verdict_reason}",
        )
        book.forget(namespace, name, new.run)
    if new.phase in builders.ACTIVE:
        book.running.add((namespace, name))
    else:
        book.running.discard((namespace, name))
    _gauges(namespace, name, new)


def _gauges(namespace: str, name: str, status: ChaosExperimentStatus) -> None:
    found = status.figures
    latency = None
    if found.p95_latency is not None:
        latency = parse_duration(found.p95_latency).total_seconds()
    verdicts = {"Passed": 1.0, "Failed": 0.0, "Aborted": -1.0}
    metrics.set_chaos(
        namespace,
        name,
        {
            "sent": found.probes_sent,
            "answered": found.probes_answered,
            "failed": found.probes_failed,
            "pending": found.probes_pending,
            "lost": found.probes_lost,
        },
        {
            "success_ratio": found.success_ratio,
            "p95_latency_seconds": latency,
            "dead_letters_growth": float(builders.growth(found)),
            "pods_killed": float(found.pods_killed),
            "running": 1.0 if status.phase == "Running" else 0.0,
            "verdict": verdicts.get(status.verdict) if status.verdict else None,
        },
    )


async def forget(operator: Operator, body: Mapping[str, Any], book: ProbeBook) -> None:
    """A deleted experiment: its entries go at once, and its gauges and what the book kept
    of its probes (a run deleted mid-way never reaches the verdict that drops them)."""
    meta = body["metadata"]
    namespace, name = str(meta["namespace"]), str(meta["name"])
    previous = ChaosExperimentStatus.model_validate(body.get("status") or {})
    async with operator.lock(KIND, namespace, name):
        book.forget(namespace, name)
        book.running.discard((namespace, name))
        await _remove_faults(operator, namespace, name, previous.targets.agents)
    metrics.forget_chaos(namespace, name)


async def sweep(operator: Operator, namespaces: set[str]) -> list[str]:
    """Purge the entries in ``namespaces`` whose experiment no longer exists (its deletion
    was missed): returns the keys purged."""
    purged = []
    for namespace in sorted(namespaces):
        bucket = naming.chaos_bucket(namespace)
        keys = await operator.nats.bucket_keys(target(operator), bucket)
        present = {
            e["metadata"]["name"] for e in await operator.kube.list_custom(PLURAL, namespace)
        }
        for key in sorted(keys):
            stored = await operator.nats.read_key(target(operator), bucket, key)
            if not stored:
                continue
            try:
                entry = AgentFaults.model_validate_json(stored)
            except ValueError:
                continue
            if entry.experiment not in present:
                await operator.nats.withdraw(target(operator), bucket, key)
                purged.append(f"kv/{bucket}/{key}")
    return purged


def _wants_pass(body: Mapping[str, Any], now: datetime, rescan: bool) -> bool:
    """Runs in progress at every tick; the others at each rescan."""
    if "deletionTimestamp" in body["metadata"]:
        return False
    phase = (body.get("status") or {}).get("phase")
    return phase in builders.ACTIVE or rescan


async def chaos_once(operator: Operator, book: ProbeBook, rescan: bool) -> None:
    """One look: every experiment at a rescan, else those with a run in progress. Between
    rescans with no run in progress it reads nothing: a run starts in a pass of its own
    (on creation or update, or at a rescan), which registers it in ``book.running``."""
    if not rescan and not book.running:
        return
    semaphore = asyncio.Semaphore(PASS_CONCURRENCY)
    listed = await operator.kube.list_watched(PLURAL, operator.settings.namespaces)
    now = datetime.now(UTC)
    # Deleted experiments (the listing no longer has them) are not running.
    book.running &= {(b["metadata"]["namespace"], b["metadata"]["name"]) for b in listed}

    async def guarded(body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        async with semaphore:
            try:
                await chaos_pass(operator, book, body)
            except Exception:
                logger.exception(
                    "%s %s/%s: the pass failed; the next tick retries",
                    KIND,
                    meta["namespace"],
                    meta["name"],
                )

    await asyncio.gather(*(guarded(b) for b in listed if _wants_pass(b, now, rescan)))


async def chaos_forever(operator: Operator, book: ProbeBook) -> None:
    """Drive the runs in progress every tick, look at the rest every rescan, sweep now and
    then: the namespaces this process wrote faults to, and once, at the first sweep, every
    namespace with a chaos bucket. An experiment deleted while no operator watched (its
    DELETED event missed) has no pass left, and its faults, written by an earlier process,
    would otherwise stay until their ``until``, up to a day."""
    ticks = 0
    rescan_every = max(int(RESCAN_SECONDS / TICK_SECONDS), 1)
    swept_all = False
    while True:
        await asyncio.sleep(TICK_SECONDS)
        ticks += 1
        try:
            await chaos_once(operator, book, rescan=ticks % rescan_every == 0)
            if not swept_all or (ticks % SWEEP_EVERY == 0 and book.namespaces):
                namespaces = set(book.namespaces)
                if not swept_all:
                    namespaces |= await watched_chaos_namespaces(operator)
                purged = await sweep(operator, namespaces)
                swept_all = True
                if purged:
                    logger.info("purged the orphaned chaos entries %s", ", ".join(purged))
        except Exception:
            logger.exception("the chaos loop failed; retrying")


async def watched_chaos_namespaces(operator: Operator) -> set[str]:
    """The namespaces with a chaos bucket that this operator watches."""
    found = await operator.nats.chaos_namespaces(target(operator))
    watched = operator.settings.namespaces
    return {n for n in found if not watched or n in watched}


__all__ = [
    "ProbeBook",
    "chaos_forever",
    "chaos_pass",
    "forget",
    "sweep",
    "watched_chaos_namespaces",
]
