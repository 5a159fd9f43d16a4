"""The agent worker's settle step: how a message's processing ended decides its fate."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from troupe_runtime.agent.settle import (
    EXPIRED_ERROR,
    OVERDELIVERED_ERROR,
    Ack,
    AgentFailed,
    DeadLetter,
    Expired,
    Failed,
    InvalidInput,
    InvalidOutput,
    Malformed,
    Nak,
    Outcome,
    Overdelivered,
    Policy,
    Succeeded,
    decide,
)
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.dead_letters import DeadLetterReason
from troupe_runtime.contract.policies import retry_delay

POLICY = Policy(max_attempts=3, backoff=(1.0, 5.0), retryable={"busy": True, "bad": False})


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
outcomes: st.SearchStrategy[Outcome] = st.one_of(
    failures,
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
        isinstance(outcome, Failed | AgentFailed) and not _rejected(outcome, policy)
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
        case Failed(error) | AgentFailed(_, error):
            assert settlement.error == error
        case Overdelivered(deliveries):
            assert settlement.error == OVERDELIVERED_ERROR.format(deliveries=deliveries)
        case _:
            assert settlement.error == EXPIRED_ERROR


@given(outcomes, policies)
def test_decide_is_deterministic(outcome: Outcome, policy: Policy) -> None:
    assert decide(outcome, policy) == decide(outcome, policy)
