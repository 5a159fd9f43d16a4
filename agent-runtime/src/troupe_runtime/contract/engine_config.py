"""The engine's configuration: a Workflow resolved by the operator.

Like ``RuntimeConfig`` for agents, this is what the operator writes into the
engine's ConfigMap; steps name the inbox subjects of their agents instead of
agent references, so the engine needs no Kubernetes access.

A step is either an agent's (``agent`` and ``subject`` set) or an approval step
(``approval`` set, no agent): the engine files an ``approvals.ApprovalRequest`` and waits
for a person's decision instead of dispatching (``workflow.planner``).

An agent's step may name ``fallbacks``: further agents, resolved to their inboxes like the
step's own, that the planner hands the same input to, in order, once the agent before has
used up the step's attempts. ``agents`` is that chain, the step's own agent first; a
fallback's position in it is the ``fallback`` index the run log and the planner use.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from pydantic import Field, model_validator

from troupe_runtime.contract import approvals, naming
from troupe_runtime.contract.agent_config import NatsSettings
from troupe_runtime.contract.durations import Duration
from troupe_runtime.contract.policies import DeadLetterPolicy, RetryPolicy, WireModel

DEFAULT_STEP_TIMEOUT = timedelta(minutes=5)
DEFAULT_RUN_RETENTION = timedelta(days=7)


class EngineCompensation(WireModel):
    """The agent that undoes a step, and the input it gets."""

    subject: str
    input: dict[str, str] = Field(default_factory=dict)


class EngineApproval(WireModel):
    """An approval step: who may decide, what they read, how long the run waits."""

    approvers: approvals.Approvers
    message: str = Field(
        default="", description="A template over the run (``expressions.split_template``)."
    )
    timeout: Duration = approvals.DEFAULT_TIMEOUT
    on_timeout: approvals.OnTimeout = "reject"


MAX_FALLBACKS = 8
"""Fallback agents a step may name: each can hold a run up for its own attempts and
timeouts, so a long chain mostly makes a failing step slow to fail."""


class StepAgent(WireModel):
    """An agent a step may dispatch to, with its inbox resolved (as the step's own)."""

    agent: str
    subject: str
    priority_levels: int = Field(
        default=1, ge=1, le=10, description="The agent's priority levels; runs keep theirs."
    )


class EngineStep(WireModel):
    """One DAG node, with its agent's inbox subject resolved; or an approval step, which
    has no agent (``agent`` and ``subject`` empty)."""

    name: str
    agent: str = ""
    subject: str = ""
    approval: EngineApproval | None = Field(default=None, exclude_if=lambda value: value is None)
    """Left out of an agent's step: its JSON stays what it was before approval steps, so an
    upgraded operator leaves existing engines' ConfigMaps (and pods) alone, and an engine
    of the previous version still reads them."""
    depends_on: list[str] = Field(default_factory=list)
    input: dict[str, str] = Field(default_factory=dict)
    timeout: Duration = DEFAULT_STEP_TIMEOUT
    retry: RetryPolicy = Field(default_factory=lambda: RetryPolicy(max_attempts=1, backoff=[]))
    on_failure: Literal["fail", "continue", "compensate"] = "fail"
    compensation: EngineCompensation | None = None
    priority_levels: int = Field(
        default=1, ge=1, le=10, description="The agent's priority levels; runs keep theirs."
    )
    fallbacks: list[StepAgent] = Field(
        default_factory=list, max_length=MAX_FALLBACKS, exclude_if=lambda value: not value
    )
    """Left out when empty, as ``approval`` is, so steps without fallbacks keep the JSON
    (and the engine pods) they had before fallbacks existed."""

    @model_validator(mode="after")
    def _agent_or_approval(self) -> EngineStep:
        if self.approval is None and not (self.agent and self.subject):
            raise ValueError(f"step {self.name}: an agent step needs agent and subject")
        if self.approval is not None and (
            self.agent or self.subject or self.compensation or self.fallbacks
        ):
            raise ValueError(
                f"step {self.name}: an approval step has no agent, fallbacks or compensation"
            )
        names = [agent.agent for agent in self.agents]
        if len(set(names)) != len(names):
            raise ValueError(f"step {self.name}: an agent appears twice among agent and fallbacks")
        return self

    @property
    def agents(self) -> list[StepAgent]:
        """The agents the step tries, in order: its own, then its fallbacks (none for an
        approval step)."""
        if self.approval is not None:
            return []
        own = StepAgent(
            agent=self.agent, subject=self.subject, priority_levels=self.priority_levels
        )
        return [own, *self.fallbacks]


class RunRetention(WireModel):
    """How long, and how many, finished runs are kept: their events, replies, results and
    projections. Unfinished runs are never pruned by count; by age they are, so keep
    ``maxAge`` longer than the longest run."""

    max_age: Duration = Field(
        default=DEFAULT_RUN_RETENTION,
        description="Age after which a run's messages and projection are removed: a duration "
        "such as 24h; default 168h (7 days).",
    )
    max_runs: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        description="Finished runs kept at most; the oldest finished run goes first. "
        "Unset: no limit but maxAge.",
    )


class EngineConfig(WireModel):
    """Everything one workflow's engine needs."""

    workflow: str
    namespace: str
    trigger_subject: str
    steps: list[EngineStep]
    deadline: Duration | None = None
    max_concurrent_runs: int = Field(default=10, ge=1)
    dead_letter: DeadLetterPolicy = Field(default_factory=DeadLetterPolicy)
    retention: RunRetention = Field(default_factory=RunRetention)
    nats: NatsSettings = Field(default_factory=NatsSettings)
    health_port: int = Field(default=8080, ge=1, le=65535)

    def step_subject(self, name: str, priority: int | None, fallback: int = 0) -> str:
        """The inbox of the step's agent number ``fallback`` (0: its own) for a run of
        ``priority`` (that agent's highest level at most)."""
        agent = self.step(name).agents[fallback]
        if not priority or agent.priority_levels == 1:
            return agent.subject
        level = min(priority, agent.priority_levels - 1)
        return naming.inbox_subject(self.namespace, agent.agent, level)

    @property
    def has_approvals(self) -> bool:
        """Whether a step waits for people: the engine then binds the approvals bucket."""
        return any(step.approval is not None for step in self.steps)

    @property
    def approvals_bucket(self) -> str:
        return naming.approvals_bucket(self.namespace)

    def step(self, name: str) -> EngineStep:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    @property
    def stream(self) -> str:
        return naming.workflow_stream(self.namespace, self.workflow)

    @property
    def runs_bucket(self) -> str:
        return naming.workflow_runs_bucket(self.namespace, self.workflow)

    @property
    def dead_letter_stream(self) -> str:
        return naming.workflow_dead_letter_stream(self.namespace, self.workflow)

    def subject(self, kind: str, run_id: str = "*") -> str:
        return naming.workflow_subject(self.namespace, self.workflow, kind, run_id)

    @property
    def lease_subject(self) -> str:
        """Where the engine that owns the workflow's runs is recorded; its last sequence
        is the fencing token every log append is checked against."""
        return self.subject("lease", "owner")

    @property
    def probe_subject(self) -> str:
        """Core NATS only (no stream stores it): the owner answers here while it lives."""
        return self.subject("probe", "owner")

    def tally_subject(self, status: str) -> str:
        """One message per finished run of ``status``, in finish order: the count and the
        pruning order, read without scanning runs."""
        return self.subject("tally", status)

    def to_json(self) -> str:
        """The ConfigMap payload: compact camelCase JSON, defaults included."""
        return self.model_dump_json(by_alias=True)
