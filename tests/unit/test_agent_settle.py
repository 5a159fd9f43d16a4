"""The agent worker's settle step: how a message's processing ended decides its fate."""

from __future__ import annotations

import math
from typing import Any, Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from troupe_runtime.agent.settle import (
    CANNOT_DEFER_ERROR,
    DEFERRED_ERROR,
    EXPIRED_ERROR,
    JITTER,
    MAX_DEFER_SECONDS,
    OVERDELIVERED_ERROR,
    Ack,
    AgentFailed,
    DeadLetter,
    Deferred,
    Expired,
    Failed,
    InvalidInput,
    InvalidOutput,
    Malformed,
    ModelFailed,
    ModelRefused,
    Nak,
    Outcome,
    Overdelivered,
    Policy,
    Settlement,
    Succeeded,
    decide,
    effective_attempt,
)
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.agent_resources import build_consumer
from troupe_runtime.contract.dead_letters import DeadLetterReason
from troupe_runtime.contract.llm import MAX_DEFERRALS
from troupe_runtime.contract.policies import retry_delay

POLICY = Policy(max_attempts=3, backoff=(1.0, 5.0), retryable={"busy": True, "bad": False})
LLM_POLICY = Policy(max_attempts=3, backoff=(1.0, 5.0), max_deferrals=MAX_DEFERRALS)
LLM: dict[str, Any] = {"policy": {"model": {"provider": "local", "model": "smollm2"}}}


def drawing(draw: float = 0.5) -> Any:
    """A random source that always draws ``draw``."""
    return lambda: draw


def config(**fields: Any) -> RuntimeConfig:
    return RuntimeConfig.model_validate({"agent": "a", "namespace": "ns", **fields})


# Examples: one behaviour each.


def test_a_success_is_acknowledged() -> None:
    assert decide(Succeeded(outputs=2), POLICY) == Ack()


def test_a_malformed_envelope_is_dead_lettered_with_its_reason() -> None:
    assert decide(Malformed("not a CloudEvent"), POLICY) == DeadLetter(
        DeadLetterReason.MALFORMED, "not a CloudEvent"
    )


def test_an_expired_deadline_is_dead_lettered() -> None:
    assert decide(Expired(), POLICY) == DeadLetter(DeadLetterReason.EXPIRED, EXPIRED_ERROR)


def test_an_input_schema_violation_is_dead_lettered() -> None:
    assert decide(InvalidInput("bad input"), POLICY) == DeadLetter(
        DeadLetterReason.INVALID_INPUT, "bad input"
    )


def test_an_output_schema_violation_is_dead_lettered() -> None:
    assert decide(InvalidOutput("bad output"), POLICY) == DeadLetter(
        DeadLetterReason.INVALID_OUTPUT, "bad output"
    )


def test_a_delivery_past_the_allowed_attempts_is_dead_lettered_as_max_deliveries() -> None:
    settlement = decide(Overdelivered(4), POLICY)
    assert settlement == DeadLetter(
        DeadLetterReason.MAX_DELIVERIES, OVERDELIVERED_ERROR.format(deliveries=4)
    )


def test_a_first_failure_is_handed_back_after_the_first_backoff() -> None:
    assert decide(Failed("boom", attempt=1), POLICY) == Nak(1.0, "boom")


def test_the_last_backoff_entry_repeats() -> None:
    policy = Policy(max_attempts=10, backoff=(1.0, 5.0))
    assert decide(Failed("boom", attempt=7), policy) == Nak(5.0, "boom")


def test_no_backoff_means_no_delay() -> None:
    assert decide(Failed("boom", attempt=1), Policy(max_attempts=2)) == Nak(0.0, "boom")


def test_the_last_allowed_attempt_is_dead_lettered_as_exhausted() -> None:
    assert decide(Failed("boom", attempt=3), POLICY) == DeadLetter(
        DeadLetterReason.EXHAUSTED, "boom"
    )


def test_a_single_attempt_policy_never_retries() -> None:
    assert decide(Failed("boom", attempt=1), Policy(max_attempts=1)) == DeadLetter(
        DeadLetterReason.EXHAUSTED, "boom"
    )


def test_a_non_retryable_state_is_rejected_on_the_first_attempt() -> None:
    assert decide(AgentFailed("bad", "AgentError: bad", attempt=1), POLICY) == DeadLetter(
        DeadLetterReason.REJECTED, "AgentError: bad"
    )


def test_a_retryable_state_is_retried() -> None:
    assert decide(AgentFailed("busy", "AgentError: busy", attempt=1), POLICY) == Nak(
        1.0, "AgentError: busy"
    )


def test_an_undeclared_state_is_retryable() -> None:
    assert decide(AgentFailed("unknown", "e", attempt=2), POLICY) == Nak(5.0, "e")


def test_a_retryable_state_exhausts_like_any_failure() -> None:
    assert decide(AgentFailed("busy", "e", attempt=3), POLICY) == DeadLetter(
        DeadLetterReason.EXHAUSTED, "e"
    )


def test_the_policy_is_read_from_the_runtime_config() -> None:
    config = RuntimeConfig.model_validate(
        {
            "agent": "a",
            "namespace": "ns",
            "retry": {"maxAttempts": 4, "backoff": ["2s", "1m"]},
            "contract": {"errorStates": [{"name": "bad", "retryable": False}, {"name": "busy"}]},
        }
    )
    assert Policy.of(config) == Policy(
        max_attempts=4, backoff=(2.0, 60.0), retryable={"bad": False, "busy": True}
    )


# Deferrals (an LLM agent's 429): examples.


def test_a_deferral_is_handed_back_after_its_delay_without_counting_as_an_attempt() -> None:
    settlement = decide(Deferred(30.0, deferrals=1, error="429", attempt=1), LLM_POLICY)
    assert settlement == Nak(30.0, "429", counted=False)


def test_the_last_allowed_deferral_is_still_handed_back() -> None:
    outcome = Deferred(2.0, deferrals=MAX_DEFERRALS, error="429", attempt=3)
    assert decide(outcome, LLM_POLICY) == Nak(2.0, "429", counted=False)


def test_a_deferral_past_max_deferrals_is_dead_lettered_as_rate_limited() -> None:
    outcome = Deferred(2.0, deferrals=MAX_DEFERRALS + 1, error="429 from every model", attempt=1)
    assert decide(outcome, LLM_POLICY) == DeadLetter(
        DeadLetterReason.RATE_LIMITED,
        DEFERRED_ERROR.format(
            deferrals=MAX_DEFERRALS + 1, allowed=MAX_DEFERRALS, error="429 from every model"
        ),
    )


def test_an_agent_that_cannot_defer_retries_a_deferral_as_an_attempt_no_sooner_than_asked() -> None:
    outcome = Deferred(30.0, deferrals=1, error="429", attempt=1)
    assert decide(outcome, POLICY) == Nak(30.0, CANNOT_DEFER_ERROR.format(error="429"))


def test_an_agent_that_cannot_defer_exhausts_on_a_deferral_at_the_last_attempt() -> None:
    outcome = Deferred(30.0, deferrals=1, error="429", attempt=3)
    assert decide(outcome, POLICY) == DeadLetter(
        DeadLetterReason.EXHAUSTED, CANNOT_DEFER_ERROR.format(error="429")
    )


@pytest.mark.parametrize(
    ("asked", "waited"),
    [(-5.0, 0.0), (math.nan, 0.0), (math.inf, 0.0), (1e9, MAX_DEFER_SECONDS), (12.5, 12.5)],
)
def test_a_deferral_waits_what_jetstream_can_whatever_retry_after_said(
    asked: float, waited: float
) -> None:
    settlement = decide(Deferred(asked, 1, "429", 1), LLM_POLICY)
    assert settlement == Nak(waited, "429", counted=False)


def test_an_overdelivery_says_how_many_deliveries_were_deferred() -> None:
    settlement = decide(Overdelivered(9, deferrals=6), LLM_POLICY)
    assert settlement == DeadLetter(
        DeadLetterReason.MAX_DELIVERIES,
        OVERDELIVERED_ERROR.format(deliveries=9) + " (6 of them deferred, which burn no attempt)",
    )


def test_an_llm_agent_may_defer_and_its_consumers_allow_the_deliveries() -> None:
    llm = config(retry={"maxAttempts": 4}, llm=LLM)
    plain = config(retry={"maxAttempts": 4})
    assert Policy.of(llm).max_deferrals == MAX_DEFERRALS
    assert Policy.of(plain).max_deferrals == 0
    assert build_consumer(llm, 0, 1).max_deliver == 4 + MAX_DEFERRALS + 1
    assert build_consumer(plain, 0, 1).max_deliver == 4 + 1


def test_before_the_handler_only_deliveries_past_attempts_and_deferrals_are_overdelivered() -> None:
    assert not LLM_POLICY.overdelivered(3 + MAX_DEFERRALS)
    assert LLM_POLICY.overdelivered(3 + MAX_DEFERRALS + 1)
    assert not POLICY.overdelivered(3)
    assert POLICY.overdelivered(4)


def test_known_deferrals_leave_the_attempts_they_did_not_burn() -> None:
    assert not LLM_POLICY.exhausted(deliveries=10, deferrals=7)  # attempt 3 of 3
    assert LLM_POLICY.exhausted(deliveries=10, deferrals=6)  # attempt 4 of 3


# Model failures: examples.


def test_a_model_refusal_is_dead_lettered_as_rejected_with_the_providers_message() -> None:
    assert decide(ModelRefused("HTTP 400: context length exceeded"), POLICY) == DeadLetter(
        DeadLetterReason.REJECTED, "HTTP 400: context length exceeded"
    )


@pytest.mark.parametrize(("draw", "factor"), [(0.0, 1 - JITTER), (0.5, 1.0), (1.0, 1 + JITTER)])
def test_an_unavailable_model_is_retried_with_the_backoff_jittered(
    draw: float, factor: float
) -> None:
    settlement = decide(ModelFailed("503", attempt=2), POLICY, drawing(draw))
    assert isinstance(settlement, Nak)
    assert math.isclose(settlement.delay, 5.0 * factor)
    assert settlement.error == "503"


def test_a_rate_limited_model_is_retried_no_sooner_than_its_retry_after() -> None:
    settlement = decide(ModelFailed("429", attempt=1, not_before=40.0), POLICY, drawing())
    assert settlement == Nak(40.0, "429")


def test_a_model_failure_on_the_last_attempt_is_exhausted() -> None:
    assert decide(ModelFailed("503", attempt=3), POLICY, drawing()) == DeadLetter(
        DeadLetterReason.EXHAUSTED, "503"
    )


# Properties.

states = st.sampled_from(["busy", "bad", "gone", "unknown"])
errors = st.text(max_size=20)
attempts = st.integers(min_value=1, max_value=200)
policies = st.builds(
    Policy,
    max_attempts=st.integers(min_value=1, max_value=100),
    backoff=st.lists(st.floats(min_value=0, max_value=3600), max_size=5).map(tuple),
    retryable=st.dictionaries(states, st.booleans()),
)
failures: st.SearchStrategy[Outcome] = st.one_of(
    st.builds(Failed, errors, attempts),
    st.builds(AgentFailed, states, errors, attempts),
)
draws = st.floats(min_value=0, max_value=1, exclude_max=True)
delays = st.floats(allow_nan=True, allow_infinity=True)
deferrals = st.integers(min_value=1, max_value=2 * MAX_DEFERRALS)
outcomes: st.SearchStrategy[Outcome] = st.one_of(
    failures,
    st.builds(Deferred, delays, deferrals, errors, attempts),
    st.builds(ModelRefused, errors),
    st.builds(ModelFailed, errors, attempts, st.floats(min_value=0, max_value=3600)),
    st.builds(Succeeded, st.integers(min_value=0, max_value=10)),
    st.builds(Malformed, errors),
    st.builds(Expired),
    st.builds(InvalidInput, errors),
    st.builds(InvalidOutput, errors),
    st.builds(Overdelivered, attempts),
)


def _rejected(outcome: Outcome, policy: Policy) -> bool:
    return isinstance(outcome, AgentFailed) and not policy.retryable.get(outcome.state, True)


@given(outcomes, policies)
def test_only_a_success_is_acknowledged(outcome: Outcome, policy: Policy) -> None:
    assert (decide(outcome, policy) == Ack()) == isinstance(outcome, Succeeded)


@given(outcomes, policies)
def test_only_a_failure_that_may_pass_next_time_is_handed_back(
    outcome: Outcome, policy: Policy
) -> None:
    retried = isinstance(decide(outcome, policy), Nak)
    assert not retried or (
        isinstance(outcome, Failed | AgentFailed | ModelFailed | Deferred)
        and not _rejected(outcome, policy)
    )


@given(failures, policies)
def test_a_failure_below_max_attempts_is_handed_back_with_the_declared_backoff(
    outcome: Failed | AgentFailed, policy: Policy
) -> None:
    if outcome.attempt >= policy.max_attempts or _rejected(outcome, policy):
        return
    assert decide(outcome, policy) == Nak(
        retry_delay(policy.backoff, outcome.attempt), outcome.error
    )


@given(failures, policies)
def test_a_failure_at_or_after_max_attempts_is_dead_lettered_as_exhausted(
    outcome: Failed | AgentFailed, policy: Policy
) -> None:
    if outcome.attempt < policy.max_attempts or _rejected(outcome, policy):
        return
    assert decide(outcome, policy) == DeadLetter(DeadLetterReason.EXHAUSTED, outcome.error)


@given(states, errors, attempts, policies)
def test_a_non_retryable_state_is_rejected_whatever_the_attempt(
    state: str, error: str, attempt: int, policy: Policy
) -> None:
    policy = Policy(policy.max_attempts, policy.backoff, {**policy.retryable, state: False})
    assert decide(AgentFailed(state, error, attempt), policy) == DeadLetter(
        DeadLetterReason.REJECTED, error
    )


@given(outcomes, policies)
def test_a_dead_letter_carries_the_outcome_error(outcome: Outcome, policy: Policy) -> None:
    settlement = decide(outcome, policy)
    if not isinstance(settlement, DeadLetter):
        return
    match outcome:
        case Malformed(reason) | InvalidInput(reason) | InvalidOutput(reason):
            assert settlement.error == reason
        case Failed(error) | AgentFailed(_, error) | ModelRefused(error) | ModelFailed(error):
            assert settlement.error == error
        case Deferred(error=error):
            assert error in settlement.error
        case Overdelivered(deliveries):
            assert settlement.error.startswith(OVERDELIVERED_ERROR.format(deliveries=deliveries))
        case _:
            assert settlement.error == EXPIRED_ERROR


@given(outcomes, policies, draws)
def test_decide_is_deterministic_given_the_draw(
    outcome: Outcome, policy: Policy, draw: float
) -> None:
    assert decide(outcome, policy, drawing(draw)) == decide(outcome, policy, drawing(draw))


@given(errors, attempts, policies, draws, st.floats(min_value=0, max_value=3600))
def test_a_model_failure_waits_the_backoff_within_the_jitter_and_never_less_than_asked(
    error: str, attempt: int, policy: Policy, draw: float, not_before: float
) -> None:
    settlement = decide(ModelFailed(error, attempt, not_before), policy, drawing(draw))
    if attempt >= policy.max_attempts:
        assert settlement == DeadLetter(DeadLetterReason.EXHAUSTED, error)
        return
    assert isinstance(settlement, Nak)
    assert settlement.counted
    backoff = retry_delay(policy.backoff, attempt)
    assert settlement.delay >= not_before
    assert settlement.delay == not_before or (
        backoff * (1 - JITTER) - 1e-9 <= settlement.delay <= backoff * (1 + JITTER) + 1e-9
    )


@given(delays, deferrals, errors, attempts, policies)
def test_a_deferral_delay_is_one_jetstream_can_wait(
    delay: float, count: int, error: str, attempt: int, policy: Policy
) -> None:
    settlement = decide(Deferred(delay, count, error, attempt), policy)
    if isinstance(settlement, Nak):
        assert 0 <= settlement.delay <= MAX_DEFER_SECONDS


# One message's life, simulated: JetStream's deliveries, the runtime's checks and the
# settle rules, the loop's journal of deferrals. Whatever the handler does each time.

Behaviour = Literal["crash", "fail", "model_failed", "defer", "succeed"]
behaviours = st.one_of(
    st.lists(st.sampled_from(["crash", "fail", "model_failed", "defer", "succeed"]), max_size=80),
    # What reaches the limits: nothing but crashes and deferrals, until the end.
    st.lists(st.sampled_from(["crash", "defer"]), min_size=1, max_size=80),
)
simulated_policies = st.builds(
    Policy,
    max_attempts=st.integers(min_value=1, max_value=10),
    backoff=st.just((1.0,)),
    max_deferrals=st.sampled_from([0, 1, 3, MAX_DEFERRALS]),
)


def simulate(
    policy: Policy, plan: list[Behaviour], reports: bool = True
) -> tuple[int, int, Settlement | None, bool]:
    """Counted handler runs, deferrals handed back, the final settlement (None: the
    plan ran out first), and whether the server gave up before the runtime settled.

    ``reports``: the handler tells earlier deferrals on a redelivery (``set_deferrals``),
    as the loop does from its journal. One that does not leaves the runtime only its
    check of raw deliveries, so crashes may then cost up to ``max_deferrals`` extra runs."""
    max_deliver = policy.max_attempts + policy.max_deferrals + 1  # build_consumer's
    counted = handed_back = journal = deliveries = 0
    for behaviour in plan:
        deliveries += 1
        if deliveries > max_deliver:
            return counted, handed_back, None, True
        if policy.overdelivered(deliveries):
            return counted, handed_back, decide(Overdelivered(deliveries), policy), False
        known = journal if reports else 0
        if reports and deliveries > 1 and policy.exhausted(deliveries, known):  # set_deferrals
            return counted, handed_back, decide(Overdelivered(deliveries, known), policy), False
        attempt = effective_attempt(deliveries, known)
        if behaviour != "defer" or policy.max_deferrals == 0:
            counted += 1
        match behaviour:
            case "crash":
                continue
            case "succeed":
                return counted, handed_back, decide(Succeeded(0), policy), False
            case "fail":
                outcome: Outcome = Failed("boom", attempt)
            case "model_failed":
                outcome = ModelFailed("503", attempt)
            case "defer":
                journal += 1
                outcome = Deferred(1.0, journal, "429", attempt)
        settlement = decide(outcome, policy, drawing())
        if not isinstance(settlement, Nak):
            return counted, handed_back, settlement, False
        handed_back += not settlement.counted
        if settlement.counted and behaviour == "defer":
            journal -= 1  # an agent that cannot defer: that delivery was an attempt
    return counted, handed_back, None, False


@given(simulated_policies, behaviours)
def test_handler_runs_that_count_never_exceed_max_attempts(
    policy: Policy, plan: list[Behaviour]
) -> None:
    counted, _, _, _ = simulate(policy, plan)
    assert counted <= policy.max_attempts


@given(simulated_policies, behaviours)
def test_deferrals_never_exceed_max_deferrals(policy: Policy, plan: list[Behaviour]) -> None:
    _, handed_back, _, _ = simulate(policy, plan)
    assert handed_back <= policy.max_deferrals


@given(simulated_policies, behaviours, st.booleans())
def test_the_runtime_settles_a_message_before_jetstream_gives_up_on_it(
    policy: Policy, plan: list[Behaviour], reports: bool
) -> None:
    _, _, _, server_gave_up = simulate(policy, plan, reports)
    assert not server_gave_up


@given(simulated_policies, behaviours)
def test_a_message_runs_out_of_attempts_only_after_all_of_them(
    policy: Policy, plan: list[Behaviour]
) -> None:
    counted, _, settlement, _ = simulate(policy, plan)
    if isinstance(settlement, DeadLetter) and settlement.reason in (
        DeadLetterReason.EXHAUSTED,
        DeadLetterReason.MAX_DELIVERIES,
    ):
        assert counted == policy.max_attempts
