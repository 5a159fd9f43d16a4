"""Nested time budgets of a Workflow (pure): a step's timeout against what its Agent
may spend on one message, and the run's deadline against how long runs are kept.

An Agent works on one message for up to ``timeout * maxAttempts`` plus its backoff
delays. A step timeout shorter than that makes the engine give up on (and perhaps
retry) an attempt the Agent is still working on or retrying; a deadline longer than
``retention.maxAge`` lets a run's start age out of the stream while it runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from troupe_operator.api import AgentSpec, WorkflowSpec
from troupe_runtime.contract.durations import format_duration
from troupe_runtime.contract.engine_config import DEFAULT_STEP_TIMEOUT
from troupe_runtime.contract.policies import RetryPolicy


def agent_worst_case(timeout: timedelta, retry: RetryPolicy) -> timedelta:
    """The longest an Agent may spend on one message: every attempt timing out, plus the
    delay before each attempt after the first."""
    delays = sum((retry.delay(attempt) for attempt in range(1, retry.max_attempts)), timedelta())
    return timeout * retry.max_attempts + delays


@dataclass(frozen=True)
class ShortStep:
    """A step whose timeout ends before its Agent's worst case."""

    step: str
    agent: str
    timeout: timedelta
    worst_case: timedelta

    def describe(self) -> str:
        return (
            f"step {self.step}: timeout {format_duration(self.timeout)} is shorter than agent "
            f"{self.agent}'s worst case {format_duration(self.worst_case)} (timeout * "
            f"maxAttempts + backoff); raise the step's timeout or lower the agent's retries"
        )


def short_steps(spec: WorkflowSpec, agents: Mapping[str, AgentSpec]) -> list[ShortStep]:
    """Steps (of Agents whose spec is known) that time out before their Agent gives up:
    the step's own agent or any fallback, since each attempt of each has the step's
    timeout."""
    found = []
    for step in spec.steps:
        if step.agent_ref is None:
            continue  # an approval step: its wait is bounded by its own timeout
        timeout = step.timeout if step.timeout is not None else DEFAULT_STEP_TIMEOUT
        for name in [step.agent_ref, *step.fallbacks]:
            agent = agents.get(name)
            if agent is None:
                continue
            worst = agent_worst_case(agent.timeout, agent.retry)
            if timeout < worst:
                found.append(ShortStep(step.name, name, timeout, worst))
    return found


def budget_problems(spec: WorkflowSpec, agents: Mapping[str, AgentSpec]) -> list[str]:
    """One sentence per budget that does not fit, for the Workflow's status."""
    problems = [short.describe() for short in short_steps(spec, agents)]
    max_age = spec.retention.max_age
    if spec.deadline is not None and spec.deadline > max_age:
        problems.append(
            f"deadline {format_duration(spec.deadline)} is longer than retention.maxAge "
            f"{format_duration(max_age)}: a run's log would age out while it runs; "
            f"raise retention.maxAge"
        )
    return problems
