"""Attempts against deliveries in the handler's context, and model failures as outcomes."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client

from troupe_runtime.agent.context import AttemptsExhausted, Context
from troupe_runtime.agent.llm.types import (
    InvalidModelOutput,
    ModelRejected,
    ModelUnavailable,
    RateLimited,
)
from troupe_runtime.agent.processing import model_outcome
from troupe_runtime.agent.settle import InvalidOutput, ModelFailed, ModelRefused
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.state import StateStore


async def _nothing(*_: object) -> None:
    return None


def context(deliveries: int, max_attempts: int) -> Context:
    config = RuntimeConfig.model_validate({"agent": "a", "namespace": "ns"})
    return Context(
        CloudEvent(id="e", source="/t", type="t"),
        attempt=deliveries,
        max_attempts=max_attempts,
        state=StateStore(Client().jetstream(), config),  # constructing it does no I/O
        logger=logging.getLogger("test"),
        publisher=_nothing,
        progress=_nothing,
    )


def test_without_deferrals_the_attempt_is_the_delivery() -> None:
    assert context(deliveries=2, max_attempts=3).attempt == 2


def test_earlier_deferrals_do_not_count_as_attempts() -> None:
    ctx = context(deliveries=7, max_attempts=3)
    ctx.set_deferrals(5)
    assert (ctx.attempt, ctx.deferrals, ctx.deliveries) == (2, 5, 7)


def test_deferrals_that_leave_no_attempt_stop_the_handler() -> None:
    ctx = context(deliveries=7, max_attempts=3)
    with pytest.raises(AttemptsExhausted) as raised:
        ctx.set_deferrals(3)  # attempt 4 of 3: three earlier deliveries crashed
    assert (raised.value.deliveries, raised.value.deferrals) == (7, 3)


@pytest.mark.parametrize("count", [-1, 7, 8])
def test_more_deferrals_than_earlier_deliveries_are_refused(count: int) -> None:
    with pytest.raises(ValueError, match="between 0 and 6"):
        context(deliveries=7, max_attempts=3).set_deferrals(count)


@given(
    st.integers(min_value=1, max_value=100),
    st.integers(min_value=1, max_value=100),
    st.integers(min_value=0, max_value=100),
)
def test_an_accepted_deferral_count_leaves_an_attempt_within_the_limit(
    deliveries: int, max_attempts: int, count: int
) -> None:
    ctx = context(deliveries, max_attempts)
    try:
        ctx.set_deferrals(count)
    except (ValueError, AttemptsExhausted):
        return
    assert 1 <= ctx.attempt <= max_attempts
    assert ctx.attempt + ctx.deferrals == deliveries


def test_a_model_refusal_names_the_status_and_keeps_the_providers_message() -> None:
    outcome = model_outcome(ModelRejected("maximum context length is 2048 tokens", 400), 1)
    assert outcome == ModelRefused(
        "the model rejected the request (HTTP 400): maximum context length is 2048 tokens"
    )


def test_an_answer_invalid_after_the_repair_turn_is_invalid_output() -> None:
    outcome = model_outcome(InvalidModelOutput("'answer' is a required property"), 1)
    assert outcome == InvalidOutput(
        "the model's answer is not valid output: 'answer' is a required property"
    )


def test_an_unavailable_chain_is_a_model_failure_worth_retrying() -> None:
    outcome = model_outcome(ModelUnavailable("503 from local/smollm2"), 2)
    assert outcome == ModelFailed("ModelUnavailable: 503 from local/smollm2", 2)


@pytest.mark.parametrize(("retry_after", "not_before"), [(None, 0.0), (12.0, 12.0)])
def test_a_rate_limit_that_escapes_the_loop_retries_no_sooner_than_retry_after(
    retry_after: float | None, not_before: float
) -> None:
    outcome = model_outcome(RateLimited("429", retry_after), 1)
    assert outcome == ModelFailed("RateLimited: 429", 1, not_before=not_before)
