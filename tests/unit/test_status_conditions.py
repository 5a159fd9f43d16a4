"""The condition vocabulary: Ready, Reconciling and Stalled from the sub-conditions, per kstatus."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from troupe_operator.api import AgentSpec, AgentStatus
from troupe_operator.api.status import Condition
from troupe_operator.builders.problems import Problem
from troupe_operator.builders.status import (
    AGENT_SUBCONDITIONS,
    MESSAGING_READY,
    SPEC_VALID,
    WORKLOAD_AVAILABLE,
    Observation,
    PodCrash,
    WorkloadObservation,
    keep_transition_times,
    merge_conditions,
    observe_deployment,
    pod_crashes,
    problem_observations,
    reconcile_failed,
    spec_invalid,
    transitions,
    with_observations,
)
from troupe_operator.reconcilers.common import spec_problems

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _by_type(conditions: list[Condition]) -> dict[str, Condition]:
    return {c.type: c for c in conditions}


def test_the_three_top_conditions_come_first_and_are_always_present() -> None:
    merged = merge_conditions([], [], AGENT_SUBCONDITIONS, 1, T0)

    assert [c.type for c in merged] == ["Ready", "Reconciling", "Stalled"]
    assert [c.status for c in merged] == ["True", "False", "False"]


def test_a_spec_the_models_refuse_stalls_with_reason_spec_invalid() -> None:
    status = with_observations(
        AgentStatus(),
        [spec_invalid("spec.runtime.env[0].name: String should match pattern")],
        AGENT_SUBCONDITIONS,
        4,
        T0,
    )

    conditions = _by_type(status.conditions)
    assert (conditions["Ready"].status, conditions["Ready"].reason) == ("False", "SpecInvalid")
    assert (conditions["Stalled"].status, conditions["Stalled"].reason) == ("True", "SpecInvalid")
    assert "spec.runtime.env[0].name" in conditions["Stalled"].message
    assert conditions["Reconciling"].status == "False"
    assert status.observed_generation == 4


def test_an_unexpected_failure_is_progressing_not_stalled() -> None:
    merged = merge_conditions(
        [], [reconcile_failed(WORKLOAD_AVAILABLE, "boom")], AGENT_SUBCONDITIONS, 1, T0
    )

    conditions = _by_type(merged)
    assert (conditions["Reconciling"].status, conditions["Reconciling"].reason) == (
        "True",
        "ReconcileFailed",
    )
    assert conditions["Stalled"].status == "False"
    assert "retrying" in conditions["Ready"].message


def test_problems_fall_on_the_sub_condition_their_reason_names() -> None:
    observed = problem_observations(
        [
            Problem("spec.contract.inputSchema", "InvalidSchema", "not a JSON Schema"),
            Problem("spec.messaging", "SubjectConflict", "stream x of Workflow y has it"),
        ],
        clear=[SPEC_VALID],
    )

    assert [(o.type, o.reason, o.stalls) for o in observed] == [
        (SPEC_VALID, "InvalidSchema", True),
        (MESSAGING_READY, "SubjectConflict", True),
    ]


def test_ready_takes_the_first_failing_sub_condition_in_order() -> None:
    merged = merge_conditions(
        [],
        [
            WorkloadObservation(1, 0, 1, current_generation=True).condition(),
            *problem_observations([Problem("spec.x", "InvalidSchema", "bad")]),
        ],
        AGENT_SUBCONDITIONS,
        1,
        T0,
    )

    assert _by_type(merged)["Ready"].reason == "InvalidSchema"
    assert _by_type(merged)["Stalled"].reason == "InvalidSchema"


def test_a_carried_over_stalled_reason_still_stalls() -> None:
    first = merge_conditions(
        [], problem_observations([Problem("spec.y", "Unheard", "x")]), AGENT_SUBCONDITIONS, 1, T0
    )

    refreshed = merge_conditions(
        first,
        [WorkloadObservation(1, 1, 1, current_generation=True).condition()],
        AGENT_SUBCONDITIONS,
        1,
        T0,
    )

    assert _by_type(refreshed)["Stalled"].status == "True"


def test_messages_are_redacted() -> None:
    down = Observation(
        MESSAGING_READY, False, "MessagingUnavailable", "NATS at nats://me:hunter2@nats:4222"
    )

    merged = merge_conditions([], [down], AGENT_SUBCONDITIONS, 1, T0)

    assert all("hunter2" not in c.message for c in merged)


def test_crashing_pods_stall_with_the_termination_message() -> None:
    pod = {
        "metadata": {"name": "agent-abc"},
        "status": {
            "containerStatuses": [
                {
                    "name": "runtime",
                    "ready": False,
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {
                        "terminated": {
                            "exitCode": 1,
                            "reason": "Error",
                            "message": "ValueError: invalid schema",
                        }
                    },
                }
            ]
        },
    }
    deployment = {
        "metadata": {"generation": 1},
        "spec": {"replicas": 1},
        "status": {"observedGeneration": 1, "updatedReplicas": 1},
    }

    observed = observe_deployment(deployment, [pod]).condition()

    assert (observed.reason, observed.stalls) == ("PodsCrashing", True)
    assert "agent-abc" in observed.message
    assert "ValueError: invalid schema" in observed.message
    assert "CrashLoopBackOff" in observed.message


def test_a_ready_container_that_once_failed_is_not_crashing() -> None:
    pod = {
        "metadata": {"name": "p"},
        "status": {
            "containerStatuses": [
                {"name": "runtime", "ready": True, "lastState": {"terminated": {"exitCode": 1}}}
            ]
        },
    }

    assert pod_crashes(pod) == []


def test_a_long_termination_message_keeps_its_tail() -> None:
    crash = PodCrash("p", "runtime", "Error", "x" * 1000 + "the cause")
    observed = WorkloadObservation(1, 0, 1, True, crashes=(crash,)).condition()
    merged = merge_conditions([], [observed], AGENT_SUBCONDITIONS, 1, T0)

    assert len(_by_type(merged)["Ready"].message) <= 1024
    tail = pod_crashes(
        {
            "metadata": {"name": "p"},
            "status": {
                "containerStatuses": [
                    {
                        "name": "c",
                        "state": {"terminated": {"exitCode": 2, "message": "y" * 999 + "end"}},
                    }
                ]
            },
        }
    )
    assert tail[0].message.endswith("end")
    assert len(tail[0].message) <= 301


def test_transitions_warn_when_a_condition_turns_bad() -> None:
    good = merge_conditions(
        [], [WorkloadObservation(1, 1, 1, True).condition()], AGENT_SUBCONDITIONS, 1, T0
    )
    bad = merge_conditions(
        good,
        problem_observations([Problem("spec.z", "InvalidSchema", "no")]),
        AGENT_SUBCONDITIONS,
        2,
        T0,
    )

    changed = {t.type: t for t in transitions(good, bad)}

    assert set(changed) == {"Ready", "Stalled", SPEC_VALID}
    assert all(t.warning for t in changed.values())
    back = {t.type: t for t in transitions(bad, good)}
    assert not any(t.warning for t in back.values())
    assert transitions(good, good) == []


def test_a_second_merge_keeps_the_first_transition_time() -> None:
    first = merge_conditions(
        [], [WorkloadObservation(1, 1, 1, True).condition()], AGENT_SUBCONDITIONS, 1, T0
    )
    later = T0 + timedelta(minutes=1)
    again = merge_conditions(
        first, [WorkloadObservation(1, 0, 1, True).condition()], AGENT_SUBCONDITIONS, 1, later
    )
    back = merge_conditions(
        again, [WorkloadObservation(1, 1, 1, True).condition()], AGENT_SUBCONDITIONS, 1, later
    )

    kept = _by_type(keep_transition_times(first, back))

    assert kept[WORKLOAD_AVAILABLE].last_transition_time == "2026-01-01T00:00:00Z"


REASONS = st.sampled_from(
    ["InvalidSchema", "SecretNotFound", "ReplicasNotReady", "MessagingUnavailable", "X"]
)
OBSERVATIONS = st.builds(
    Observation,
    type=st.sampled_from(AGENT_SUBCONDITIONS),
    ok=st.booleans(),
    reason=REASONS,
    message=st.text(max_size=20),
    stalled=st.sampled_from([None, True, False]),
)


@given(st.lists(OBSERVATIONS, max_size=6), st.lists(OBSERVATIONS, max_size=6))
def test_ready_is_true_iff_every_sub_condition_is(
    earlier: list[Observation], now: list[Observation]
) -> None:
    previous = merge_conditions([], earlier, AGENT_SUBCONDITIONS, 1, T0)
    merged = _by_type(merge_conditions(previous, now, AGENT_SUBCONDITIONS, 2, T0))

    subs = [merged[t] for t in AGENT_SUBCONDITIONS if t in merged]
    assert (merged["Ready"].status == "True") == all(c.status == "True" for c in subs)
    flags = [merged["Reconciling"].status == "True", merged["Stalled"].status == "True"]
    if merged["Ready"].status == "False":
        assert flags.count(True) == 1
        first_failing = next(c for c in subs if c.status == "False")
        assert merged["Ready"].reason == first_failing.reason
    else:
        assert flags == [False, False]


@given(st.lists(OBSERVATIONS, max_size=6))
def test_a_fresh_observation_decides_stalled(observed: list[Observation]) -> None:
    merged = _by_type(merge_conditions([], observed, AGENT_SUBCONDITIONS, 1, T0))
    latest = {o.type: o for o in observed}

    failing = next(
        (latest[t] for t in AGENT_SUBCONDITIONS if t in latest and not latest[t].ok), None
    )
    if failing is not None:
        assert (merged["Stalled"].status == "True") == failing.stalls


def test_a_refused_spec_names_the_field_in_camel_case_and_never_its_value() -> None:
    raw = {"role": "r", "runtime": {"env": [{"name": ""}], "imagePullPolicy": "hunter2"}}
    try:
        AgentSpec.model_validate(raw)
    except ValidationError as error:
        problems = spec_problems(error, raw)
    else:
        raise AssertionError("the models accepted an empty env name")

    fields = [p.field for p in problems]
    assert "spec.runtime.env[0].name" in fields
    assert "spec.runtime.imagePullPolicy" in fields
    assert all("hunter2" not in p.message for p in problems)
    assert {p.reason for p in problems} == {"SpecInvalid"}


def test_a_union_member_adds_no_field() -> None:
    raw = {"role": "r", "runtime": {"resources": {"limits": {"cpu": [1]}}}}
    try:
        AgentSpec.model_validate(raw)
    except ValidationError as error:
        problems = spec_problems(error, raw)
    else:
        raise AssertionError("the models accepted a list as a quantity")

    assert [p.field for p in problems] == ["spec.runtime.resources.limits.cpu"]
