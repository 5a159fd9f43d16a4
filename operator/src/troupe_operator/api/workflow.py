"""The Workflow API: a DAG of steps, each handled by an Agent of the same namespace.

What CEL can check (unique names, known and non-self dependencies) the API
server refuses; a cycle or an unknown Agent the operator finds (``builders.dag``)
and reports in status. A valid Workflow runs in its own engine Deployment
(``builders.engine``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from troupe_operator.api.agent import NatsConnection
from troupe_operator.api.common import RETRY_BACKOFF_RULE, ApiModel, cel, rule
from troupe_runtime.contract.durations import Duration
from troupe_runtime.contract.engine_config import RunRetention
from troupe_runtime.contract.policies import (
    NAME_PATTERN,
    DeadLetterPolicy,
    RetryPolicy,
    StateBucket,
)

MAX_STEPS = 64
MAX_DEPENDENCIES = 32


class Compensation(ApiModel):
    """What undoes a step's effect when a later failure asks for compensation."""

    agent_ref: str = Field(pattern=NAME_PATTERN, max_length=63)
    input: dict[str, str] = Field(default_factory=dict, max_length=64)


class WorkflowStep(ApiModel):
    """One node of the DAG."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": cel(
            rule(
                "!has(self.dependsOn) || !(self.name in self.dependsOn)",
                "a step must not depend on itself",
                ".dependsOn",
            ),
            rule(
                "!has(self.onFailure) || self.onFailure != 'compensate' || has(self.compensation)",
                "onFailure: compensate needs a compensation",
                ".compensation",
            ),
        )
    }

    name: str = Field(pattern=NAME_PATTERN, max_length=63)
    agent_ref: str = Field(pattern=NAME_PATTERN, max_length=63, description="An Agent's name.")
    depends_on: list[Annotated[str, Field(pattern=NAME_PATTERN, max_length=63)]] = Field(
        default_factory=list, max_length=MAX_DEPENDENCIES, description="Steps that finish first."
    )
    input: dict[str, str] = Field(
        default_factory=dict,
        max_length=64,
        description="Input field → expression over the trigger and earlier steps' outputs.",
    )
    timeout: Duration | None = Field(default=None, description="Per attempt; default 5m.")
    retry: RetryPolicy | None = Field(
        default=None,
        json_schema_extra=cel(RETRY_BACKOFF_RULE),
        description="Attempts of the step; default one attempt, no retry.",
    )
    on_failure: Literal["fail", "continue", "compensate"] = "fail"
    compensation: Compensation | None = None


class Trigger(ApiModel):
    """What starts a run: a message on ``subject``."""

    subject: str = Field(min_length=1, max_length=255, pattern=r"^[^\s]+$")


class WorkflowSpec(ApiModel):
    """The desired state of one workflow."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": cel(
            rule(
                "self.steps.all(s, self.steps.exists_one(t, t.name == s.name))",
                "step names must be unique",
                ".steps",
            ),
            rule(
                "self.steps.all(s, !has(s.dependsOn)"
                " || s.dependsOn.all(d, self.steps.exists(t, t.name == d)))",
                "every dependsOn must name a step of this workflow",
                ".steps",
            ),
        )
    }

    description: str = Field(default="", max_length=4096)
    steps: list[WorkflowStep] = Field(min_length=1, max_length=MAX_STEPS)
    trigger: Trigger
    deadline: Duration | None = Field(default=None, description="Bound on a whole run.")
    max_concurrent_runs: int = Field(default=10, ge=1, le=10_000)
    state: StateBucket | None = None
    dead_letter: DeadLetterPolicy = Field(default_factory=DeadLetterPolicy)
    retention: RunRetention = Field(
        default_factory=RunRetention,
        description="How long and how many finished runs are kept (stream and runs bucket).",
    )
    nats: NatsConnection = Field(default_factory=NatsConnection)
    deletion_policy: Literal["Delete", "Retain"] = Field(
        default="Delete",
        description="Whether deleting the Workflow deletes its runs (stream, KV, dead letters).",
    )
