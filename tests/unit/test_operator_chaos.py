"""ChaosExperiments, planned purely: the spec's rules, when a run starts and ends, what is
due in it, the figures, the abort check, the verdict and the conditions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from troupe_operator.api.chaos import (
    Abort,
    ChaosExperimentSpec,
    ChaosExperimentStatus,
    ChaosFigures,
    ChaosTargets,
    SteadyState,
)
from troupe_operator.builders import chaos
from troupe_runtime.contract import envelope
from troupe_runtime.contract.chaos import OPT_IN_LABEL, PROBE_HEADER, AgentFaults

NOW = datetime(2026, 12, 3, 12, 0, 0, tzinfo=UTC)
TEAM = ChaosTargets(agents=["echo"])


def spec(**fields: Any) -> ChaosExperimentSpec:
    base: dict[str, Any] = {"selector": {"agents": {}}, "duration": "10s"}
    return ChaosExperimentSpec.model_validate({**base, **fields})


def started(experiment: ChaosExperimentSpec, at: datetime = NOW) -> ChaosExperimentStatus:
    return chaos.advance(ChaosExperimentStatus(), experiment, 1, at, at, True, TEAM)


# The spec.


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"selector": {}}, "selector needs agents or workflows"),
        ({"duration": "25h"}, "at most 24h"),
        ({"schedule": "every minute"}, "cron"),
        ({"timeZone": "Mars/Olympus"}, "time zone"),
        ({"steadyState": {"probe": {"every": "1ms"}}}, "2000 probes"),
        ({"steadyState": {"probe": {"payload": "{not json"}}}, "payload is not JSON"),
        ({"faults": {"handler": {"errorRatio": 2}}}, "less than or equal to 1"),
    ],
)
def test_the_models_refuse_what_cannot_run(fields: dict[str, Any], said: str) -> None:
    with pytest.raises(ValidationError, match=said):
        spec(**fields)


def test_the_runtime_faults_are_the_contract_faults_without_the_pod_kills() -> None:
    experiment = spec(faults={"podKills": {"every": "5s"}, "handler": {"errorRatio": 1}})

    faults = chaos.agent_faults("x", started(experiment), experiment)

    assert faults is not None
    assert faults.faults.handler is not None
    assert faults.faults.handler.error_ratio == 1
    assert "podKills" not in faults.faults.model_dump(by_alias=True)
    assert faults.until == NOW + timedelta(seconds=10)


def test_pod_kills_alone_write_no_faults() -> None:
    experiment = spec(faults={"podKills": {"every": "5s"}})

    assert chaos.agent_faults("x", started(experiment), experiment) is None


# The lifecycle.


def test_a_one_shot_experiment_starts_once_and_not_again() -> None:
    experiment = spec()
    running = started(experiment)
    assert (running.phase, running.run) == ("Running", chaos.ONCE)
    done = chaos.finished(running, "Passed", "held", NOW + timedelta(seconds=20))

    later = chaos.advance(done, experiment, 1, NOW, NOW + timedelta(hours=1), True, TEAM)

    assert (later.phase, later.run, later.runs) == ("Passed", chaos.ONCE, 1)


def test_a_resumed_run_is_the_same_run() -> None:
    experiment = spec()
    running = started(experiment)

    resumed = chaos.advance(running, experiment, 1, NOW, NOW + timedelta(seconds=3), True, TEAM)

    assert resumed == running


def test_a_run_moves_to_evaluating_at_its_end() -> None:
    experiment = spec()
    ended = chaos.advance(
        started(experiment), experiment, 1, NOW, NOW + timedelta(seconds=10), True, TEAM
    )

    assert ended.phase == "Evaluating"


@pytest.mark.parametrize(
    ("experiment", "allowed", "said"),
    [(spec(suspend=True), True, "suspended"), (spec(), False, OPT_IN_LABEL)],
)
def test_suspending_or_opting_out_aborts_a_running_run(
    experiment: ChaosExperimentSpec, allowed: bool, said: str
) -> None:
    running = started(spec())

    aborted = chaos.advance(running, experiment, 2, NOW, NOW + timedelta(seconds=1), allowed, TEAM)

    assert aborted.verdict == "Aborted"
    assert said in aborted.verdict_reason


@pytest.mark.parametrize(
    ("experiment", "allowed", "targets"),
    [
        (spec(), False, TEAM),
        (spec(suspend=True), True, TEAM),
        (spec(), True, ChaosTargets()),
    ],
    ids=["not-opted-in", "suspended", "no-targets"],
)
def test_no_run_starts_without_opt_in_targets_or_while_suspended(
    experiment: ChaosExperimentSpec, allowed: bool, targets: ChaosTargets
) -> None:
    status = chaos.advance(ChaosExperimentStatus(), experiment, 1, NOW, NOW, allowed, targets)

    assert (status.phase, status.run) == ("Pending", "")


def test_a_schedule_starts_a_run_per_window_and_skips_missed_ones() -> None:
    experiment = spec(schedule="*/5 * * * *", duration="1m")
    created = datetime(2026, 12, 3, 11, 58, tzinfo=UTC)
    at = datetime(2026, 12, 3, 12, 0, 20, tzinfo=UTC)
    first = chaos.advance(ChaosExperimentStatus(), experiment, 1, created, at, True, TEAM)
    assert (first.phase, first.run) == ("Running", "s20261203t120000z")
    done = chaos.finished(first, "Passed", "held", at + timedelta(minutes=1))

    idle = chaos.advance(done, experiment, 1, created, at + timedelta(minutes=2), True, TEAM)
    assert idle.phase == "Passed"
    assert idle.next_run_at == "2026-12-03T12:05:00Z"
    # 12:05 was missed (the operator was away until 12:07): not run late.
    late = datetime(2026, 12, 3, 12, 7, tzinfo=UTC)
    assert chaos.advance(done, experiment, 1, created, late, True, TEAM).phase == "Passed"
    on_time = datetime(2026, 12, 3, 12, 10, 1, tzinfo=UTC)
    assert chaos.advance(done, experiment, 1, created, on_time, True, TEAM).run == (
        "s20261203t121000z"
    )


def test_probes_are_due_from_the_start_every_interval_until_the_end() -> None:
    experiment = spec(steadyState={"probe": {"every": "1s"}})
    running = started(experiment)

    assert chaos.probes_due(running, experiment, NOW) == 1
    assert chaos.probes_due(running, experiment, NOW + timedelta(seconds=2.5)) == 3
    assert chaos.probes_due(running, experiment, NOW + timedelta(minutes=5)) == 10


def test_kill_rounds_begin_one_interval_after_the_start() -> None:
    experiment = spec(faults={"podKills": {"every": "3s"}})
    running = started(experiment)

    assert chaos.kill_rounds_due(running, experiment, NOW + timedelta(seconds=2)) == 0
    assert chaos.kill_rounds_due(running, experiment, NOW + timedelta(seconds=3)) == 1
    assert chaos.kill_rounds_due(running, experiment, NOW + timedelta(minutes=1)) == 3


def _pod(name: str, created: str, ready: bool = True, leaving: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "creationTimestamp": created}
    if leaving:
        meta["deletionTimestamp"] = created
    state = "True" if ready else "False"
    return {"metadata": meta, "status": {"conditions": [{"type": "Ready", "status": state}]}}


def test_the_oldest_ready_pod_is_killed_unless_too_many_are_down() -> None:
    pods = [_pod("b", "2026-12-03T10:00:01Z"), _pod("a", "2026-12-03T10:00:00Z")]

    assert chaos.pod_to_kill(pods, 1) == "a"
    assert chaos.pod_to_kill([*pods, _pod("c", "x", leaving=True)], 1) is None
    assert chaos.pod_to_kill([*pods, _pod("c", "x", ready=False)], 2) == "a"
    assert chaos.pod_to_kill([], 1) is None


def test_a_probe_is_a_cloudevent_marked_with_its_experiment_and_answered_on_its_own_subject() -> (
    None
):
    experiment = spec(steadyState={"probe": {"payload": '{"q": 1}'}})
    probe = chaos.probe_id("x", "once", "echo", 3)

    headers, payload = chaos.probe_message("team", "x", experiment, probe, NOW)
    event = envelope.parse(headers, payload)

    assert headers[PROBE_HEADER] == "x"
    assert headers["Nats-Msg-Id"] == event.id == probe
    assert event.data == {"q": 1}
    assert event.replyto == chaos.probe_reply_subject("team", "x", probe)
    assert chaos.probe_reply_subject("team", "x", probe) != chaos.probe_reply_subject(
        "team", "x", chaos.probe_id("x", "once", "echo", 4)
    )


# Figures, abort and verdict.


def answers(ok: int, failed: int, latency: float = 0.05) -> list[chaos.Answer]:
    slow = timedelta(seconds=latency)
    return [chaos.Answer(True, slow)] * ok + [chaos.Answer(False, slow)] * failed


def test_unanswered_probes_are_pending_then_lost_once_the_grace_is_over() -> None:
    pending = chaos.figures(ChaosFigures(), 10, answers(7, 1), 0, 0, expired=False)
    lost = chaos.figures(ChaosFigures(), 10, answers(7, 1), 0, 0, expired=True)

    assert (pending.probes_pending, pending.probes_lost) == (2, 0)
    assert (lost.probes_pending, lost.probes_lost) == (0, 2)
    assert lost.success_ratio == 0.7


def test_p95_is_the_nearest_rank() -> None:
    latencies = [timedelta(milliseconds=m) for m in range(1, 101)]

    assert chaos.p95(latencies) == timedelta(milliseconds=95)
    assert chaos.p95([]) is None


def test_a_lost_probe_fails_the_verdict_whatever_the_thresholds() -> None:
    found = chaos.figures(ChaosFigures(), 3, answers(2, 0), 0, 0, expired=True)

    said, reason = chaos.verdict(SteadyState(min_success_ratio=0), found)

    assert said == "Failed"
    assert "1 probes lost" in reason


def test_the_verdict_names_each_threshold_broken() -> None:
    steady = SteadyState(
        min_success_ratio=0.9, max_p95_latency=timedelta(milliseconds=10), max_dead_letters=0
    )
    found = chaos.figures(
        ChaosFigures(dead_letters_before=1), 10, answers(8, 2, 0.5), 3, 0, expired=True
    )

    said, reason = chaos.verdict(steady, found)

    assert said == "Failed"
    assert "minSuccessRatio" in reason
    assert "maxP95Latency" in reason
    assert "maxDeadLetters" in reason


def test_evaluation_waits_for_late_answers_until_the_grace_is_over() -> None:
    experiment = spec(steadyState={"probe": {"grace": "5s"}})
    evaluating = started(experiment).model_copy(update={"phase": "Evaluating"})
    waiting = chaos.figures(ChaosFigures(), 4, answers(3, 0), 0, 0, expired=False)
    at_end = NOW + timedelta(seconds=11)

    assert chaos.judge(evaluating, experiment, waiting, at_end).phase == "Evaluating"
    all_in = chaos.figures(ChaosFigures(), 4, answers(4, 0), 0, 0, expired=False)
    assert chaos.judge(evaluating, experiment, all_in, at_end).verdict == "Passed"


observations = st.builds(
    lambda ok, failed, pending, before, after, expired: chaos.figures(
        ChaosFigures(dead_letters_before=before),
        ok + failed + pending,
        answers(ok, failed),
        after,
        0,
        expired,
    ),
    st.integers(0, 50),
    st.integers(0, 50),
    st.integers(0, 50),
    st.integers(0, 20),
    st.integers(0, 40),
    st.booleans(),
)


@given(
    st.lists(observations, min_size=1, max_size=8),
    st.floats(0, 1),
    st.one_of(st.none(), st.integers(0, 10)),
    st.one_of(st.none(), st.floats(0, 1)),
)
def test_any_observation_sequence_ends_in_exactly_one_verdict(
    sequence: list[ChaosFigures],
    min_ratio: float,
    max_dead: int | None,
    abort_ratio: float | None,
) -> None:
    experiment = spec(
        steadyState={"minSuccessRatio": min_ratio, "maxDeadLetters": max_dead},
        abort={"minSuccessRatio": abort_ratio, "maxDeadLetters": max_dead},
    )
    status = started(experiment)
    clock = NOW
    for found in sequence:
        clock += timedelta(seconds=1)
        status = chaos.advance(status, experiment, 1, NOW, clock, True, TEAM)
        if status.phase in chaos.ACTIVE:
            status = chaos.judge(status, experiment, found, clock)
    after = NOW + timedelta(minutes=10)
    status = chaos.advance(status, experiment, 1, NOW, after, True, TEAM)
    if status.phase in chaos.ACTIVE:
        final = sequence[-1].model_copy(update={"probes_pending": 0})
        status = chaos.judge(status, experiment, final, after)

    assert status.phase == status.verdict
    assert status.verdict in ("Passed", "Failed", "Aborted")
    assert status.runs == 1
    assert status.verdict_reason


@given(
    st.integers(0, 40),
    st.integers(0, 40),
    st.integers(0, 30),
    st.integers(1, 20),
    st.one_of(st.none(), st.floats(0, 1)),
    st.one_of(st.none(), st.integers(0, 30)),
)
def test_abort_trips_exactly_when_a_threshold_is_breached(
    ok: int,
    failed: int,
    grew: int,
    min_probes: int,
    min_ratio: float | None,
    max_dead: int | None,
) -> None:
    abort = Abort(min_success_ratio=min_ratio, max_dead_letters=max_dead, min_probes=min_probes)
    found = chaos.figures(ChaosFigures(), ok + failed, answers(ok, failed), grew, 0, False)
    resolved = ok + failed

    breached = (min_ratio is not None and resolved >= min_probes and ok / resolved < min_ratio) or (
        max_dead is not None and grew > max_dead
    )

    assert (chaos.abort_reason(abort, found) is not None) == breached


# Conditions.


def _by_type(status: ChaosExperimentStatus, experiment: ChaosExperimentSpec, **kw: Any) -> Any:
    args: dict[str, Any] = {"allowed": True, "targets": TEAM, "messaging_error": None}
    args.update(kw)
    found = chaos.conditions(
        [],
        status,
        experiment,
        1,
        NOW,
        args["allowed"],
        args["targets"],
        args["messaging_error"],
        "team",
    )
    return {c.type: c for c in found}


def test_a_namespace_that_does_not_opt_in_stalls_the_experiment() -> None:
    found = _by_type(ChaosExperimentStatus(), spec(), allowed=False)

    assert (found["Stalled"].status, found["Stalled"].reason) == ("True", "NamespaceNotOptedIn")
    assert OPT_IN_LABEL in found["Ready"].message


def test_a_run_in_progress_is_reconciling_and_a_verdict_is_ready() -> None:
    experiment = spec()
    running = _by_type(started(experiment), experiment)
    done = _by_type(chaos.finished(started(experiment), "Failed", "lost", NOW), experiment)

    assert (running["Reconciling"].status, running["Ready"].reason) == ("True", "Running")
    assert running["Stalled"].status == "False"
    assert (done["Ready"].status, done["Ready"].reason) == ("True", "Failed")
    assert done["SteadyStateHeld"].status == "False"


def test_faults_are_written_only_when_they_differ() -> None:
    experiment = spec(faults={"handler": {"errorRatio": 1}})
    faults = chaos.agent_faults("x", started(experiment), experiment)
    assert isinstance(faults, AgentFaults)
    value = chaos.encode_faults(faults)

    assert chaos.faults_to_write(value, None) == value
    assert chaos.faults_to_write(value, value) is None


def test_an_idle_pass_over_a_finished_experiment_changes_nothing() -> None:
    experiment = spec()
    done = chaos.finished(started(experiment), "Passed", "held", NOW + timedelta(seconds=30))
    later = NOW + timedelta(hours=1)

    def settled(status: ChaosExperimentStatus, at: datetime) -> ChaosExperimentStatus:
        stepped = chaos.advance(status, experiment, 1, NOW, at, True, TEAM)
        found = chaos.conditions(
            status.conditions, stepped, experiment, 1, at, True, TEAM, None, "team"
        )
        return stepped.model_copy(update={"conditions": found, "observed_generation": 1})

    once = settled(done, later)

    assert settled(once, later + timedelta(minutes=5)) == once


def test_a_spec_that_became_invalid_aborts_the_run_and_stalls() -> None:
    running = started(spec())

    status = chaos.spec_invalid_status(running, 2, NOW, "spec.duration: not a duration")
    found = {c.type: c for c in status.conditions}

    assert status.verdict == "Aborted"
    assert "not a duration" in status.verdict_reason
    assert (found["Stalled"].status, found["Stalled"].reason) == ("True", "SpecInvalid")
