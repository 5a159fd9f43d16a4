"""Status of Agents and Workflows, following the kstatus conventions.

``observedGeneration`` plus a list of conditions, each with a reason and a
message for people, whose ``lastTransitionTime`` changes only when its status
does, so ``kubectl wait --for=condition=Ready``, Argo CD and Flux all work.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from troupe_operator.api.common import ApiModel
from troupe_runtime.contract.run_state import RunStatus


class Condition(ApiModel):
    """One observation about the object, as in ``metav1.Condition``."""

    type: str = Field(min_length=1, description="What is observed, such as Ready.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(min_length=1, description="CamelCase, for machines.")
    message: str = Field(default="", description="For people: what is wrong and what to do.")
    last_transition_time: str = Field(description="RFC 3339; changes only with status.")
    observed_generation: int = Field(
        default=0, description="The metadata.generation this condition was observed at."
    )


class ConsumerCounts(ApiModel):
    """Messages of one agent as its durable consumers see them, summed over priorities."""

    pending: int = Field(default=0, description="Not yet delivered.")
    ack_pending: int = Field(default=0, description="Delivered, not yet acknowledged.")
    redelivered: int = Field(default=0, description="Delivered more than once, unacknowledged.")


class AgentSubjects(ApiModel):
    """Where to publish to the agent, and where its dead letters go."""

    inbox: list[str] = Field(
        default_factory=list, description="One subject per priority level, from priority 0."
    )
    dead_letters: str = Field(default="", description="The dead-letter stream's subject.")


class AgentUsage(ApiModel):
    """Tokens and dollars of an LLM agent's completions over the last hour, all replicas."""

    tokens_in: int = Field(default=0, description="Input (prompt) tokens.")
    tokens_out: int = Field(default=0, description="Output (completion) tokens.")
    tokens: int = Field(default=0, description="tokensIn + tokensOut: the Tokens column.")
    cost_usd: float = Field(
        default=0.0, description="Dollars, at the prices of the ModelProviders' models."
    )
    window: str = Field(default="1h", description="The window summed: the last hour.")


class AutoscaleStatus(ApiModel):
    """The autoscaler's last decision, for ``kubectl get agents -o wide``."""

    engine: Literal["operator", "keda"] = Field(
        default="operator", description="Who scales: operator or keda."
    )
    desired_replicas: int | None = Field(
        default=None,
        description="Replicas the operator's autoscaler wants for the lag below; unset when "
        "KEDA or an HPA decides.",
    )
    lag: int = Field(default=0, description="The lag that decision rests on.")
    last_scale_time: str | None = Field(
        default=None, description="RFC 3339: when the autoscaler last changed replicas."
    )
    scaled_by: str | None = Field(
        default=None,
        description="The HorizontalPodAutoscaler or ScaledObject that owns replicas, when not "
        "the operator.",
    )


class ObjectStatus(ApiModel):
    """What every kind's status starts with: the generation observed and the conditions."""

    observed_generation: int = Field(
        default=0, description="The metadata.generation this status describes."
    )
    conditions: list[Condition] = Field(
        default_factory=list, description="Ready, Reconciling, Stalled and what they rest on."
    )


class AgentStatus(ObjectStatus):
    """What the operator last observed of an agent."""

    replicas: int = Field(default=0, description="Pods of the agent's Deployment.")
    ready_replicas: int = Field(default=0, description="Of those, pods ready for messages.")
    config_hash: str = Field(
        default="", description="Hash of the runtime config the pods were started with."
    )
    consumers: ConsumerCounts = Field(default_factory=ConsumerCounts)
    lag: int = Field(default=0, description="pending + ackPending: the Lag printer column.")
    dead_letters: int = Field(default=0, description="Messages in the dead-letter stream.")
    autoscale: AutoscaleStatus | None = Field(
        default=None,
        description="With spec.runtime.autoscale: what the autoscaler last decided.",
    )
    subjects: AgentSubjects | None = Field(
        default=None, description="The agent's NATS subjects, set by the first pass."
    )
    usage: AgentUsage | None = Field(
        default=None,
        description="LLM agents (spec.llm): tokens and cost over the last hour, summed on "
        "each pass from the namespace's usage bucket.",
    )


class RunCounts(ApiModel):
    """Workflow runs by state, as the engine's projections in KV hold them."""

    running: int = Field(default=0, description="Running or compensating.")
    succeeded: int = Field(default=0, description="Runs that succeeded.")
    failed: int = Field(default=0, description="Runs that failed.")
    budget_exceeded: int = Field(
        default=0,
        description="Runs a Budget's hard limit stopped (not counted in failed).",
    )
    cancelled: int = Field(default=0, description="Runs a cancel ended (not counted in failed).")


class LastRun(ApiModel):
    """The run started most recently."""

    id: str = Field(description="The run's id.")
    status: RunStatus = Field(
        description="Running, WaitingForApproval (an approval step waits for a person and no "
        "step runs), Compensating, Succeeded, Failed, BudgetExceeded (a Budget's hard limit "
        "stopped it; its output holds the steps that finished) or Cancelled."
    )
    started_at: str = Field(description="RFC 3339.")
    finished_at: str | None = Field(default=None, description="RFC 3339; unset while running.")
    tokens_in: int = Field(
        default=0, description="LLM input tokens its steps' replies reported, every attempt."
    )
    tokens_out: int = Field(default=0, description="LLM output tokens, likewise.")
    cost_usd: float = Field(default=0.0, description="Dollars, likewise.")


class WorkflowSubjects(ApiModel):
    """Where to publish to start a run of the workflow."""

    trigger: str = Field(default="", description="The trigger subject, as the spec names it.")
    start: str = Field(
        default="",
        description="Where the troupe run command publishes: a run id replaces the last token.",
    )


class WorkflowStatus(ObjectStatus):
    """What the operator last observed of a workflow and its engine."""

    steps: int = Field(default=0, description="Steps in the DAG.")
    runs: RunCounts = Field(default_factory=RunCounts)
    last_run: LastRun | None = None
    subjects: WorkflowSubjects | None = Field(
        default=None, description="The workflow's NATS subjects, set by the first pass."
    )
