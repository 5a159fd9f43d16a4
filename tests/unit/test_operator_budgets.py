"""Nested time budgets: a step's timeout against its Agent's worst case, a run's deadline
against how long runs are kept."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from troupe_operator.api import AgentSpec, WorkflowSpec
from troupe_operator.builders.budgets import agent_worst_case, budget_problems, short_steps
from troupe_runtime.contract.policies import RetryPolicy


def _workflow(**step: Any) -> WorkflowSpec:
    return WorkflowSpec.model_validate(
        {"trigger": {"subject": "go"}, "steps": [{"name": "s", "agentRef": "a", **step}]}
    )


def _agent(timeout: str, attempts: int, backoff: list[str]) -> AgentSpec:
    return AgentSpec.model_validate(
        {
            "role": "r",
            "timeout": timeout,
            "messaging": {"ackWait": "1h"},  # room for any timeout the tests try
            "retry": {"maxAttempts": attempts, "backoff": backoff},
        }
    )


def test_the_worst_case_is_every_attempt_timing_out_plus_the_backoff_between() -> None:
    retry = RetryPolicy(max_attempts=3, backoff=[timedelta(seconds=1), timedelta(seconds=5)])

    assert agent_worst_case(timedelta(seconds=60), retry) == timedelta(seconds=186)


def test_a_step_timeout_shorter_than_its_agents_worst_case_is_reported() -> None:
    problems = budget_problems(_workflow(timeout="1m"), {"a": _agent("30s", 3, ["10s"])})

    assert problems == [
        "step s: timeout 1m is shorter than agent a's worst case 110s (timeout * maxAttempts"
        " + backoff); raise the step's timeout or lower the agent's retries"
    ]


def test_the_default_step_timeout_covers_the_default_agent() -> None:
    assert budget_problems(_workflow(), {"a": AgentSpec(role="r")}) == []


def test_a_deadline_longer_than_retention_is_reported() -> None:
    spec = WorkflowSpec.model_validate(
        {
            "trigger": {"subject": "go"},
            "steps": [{"name": "s", "agentRef": "a"}],
            "deadline": "2h",
            "retention": {"maxAge": "1h"},
        }
    )

    (problem,) = budget_problems(spec, {})

    assert problem.startswith("deadline 2h is longer than retention.maxAge 1h")


@settings(max_examples=200, deadline=None)
@given(
    step_seconds=st.integers(min_value=1, max_value=3600),
    agent_seconds=st.integers(min_value=1, max_value=600),
    attempts=st.integers(min_value=1, max_value=10),
    backoff=st.lists(st.integers(min_value=0, max_value=120), max_size=10),
)
def test_a_step_is_reported_exactly_when_its_timeout_is_below_the_worst_case(
    step_seconds: int, agent_seconds: int, attempts: int, backoff: list[int]
) -> None:
    backoff = backoff[:attempts]
    agent = _agent(f"{agent_seconds}s", attempts, [f"{b}s" for b in backoff])
    worst = agent_worst_case(agent.timeout, agent.retry)

    reported = short_steps(_workflow(timeout=f"{step_seconds}s"), {"a": agent})

    assert worst >= agent.timeout * attempts
    assert bool(reported) == (timedelta(seconds=step_seconds) < worst)
