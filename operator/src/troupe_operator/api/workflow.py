"""The Workflow API: a DAG of steps, each handled by an Agent of the same namespace.

What CEL can check (unique names, known and non-self dependencies) the API
server refuses; a cycle or an unknown Agent the operator finds (``builders.dag``)
and reports in status. A valid Workflow runs in its own engine Deployment
(``builders.engine``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from troupe_operator.api.agent import NatsConnection
from troupe_operator.api.common import RETRY_BACKOFF_RULE, ApiModel, cel, rule
from troupe_runtime.contract import grammar
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

    agent_ref: str = Field(
        pattern=NAME_PATTERN, max_length=63, description="The Agent that undoes the step."
    )
    input: dict[str, str] = Field(
        default_factory=dict,
        max_length=64,
        description="Input field → expression over the trigger and the steps' outputs.",
    )


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

    name: str = Field(
        pattern=NAME_PATTERN,
        max_length=63,
        description="The step's name (a DNS label), unique in the workflow.",
    )
    agent_ref: str = Field(
        pattern=NAME_PATTERN,
        max_length=63,
        description="The name of the Agent, in this namespace, that handles the step.",
    )
    depends_on: list[Annotated[str, Field(pattern=NAME_PATTERN, max_length=63)]] = Field(
        default_factory=list,
        max_length=MAX_DEPENDENCIES,
        description="Steps of this workflow that finish first.",
    )
    input: dict[str, str] = Field(
        default_factory=dict,
        max_length=64,
        description="Input field → expression over the trigger and earlier steps' outputs.",
    )
    timeout: Duration | None = Field(
        default=None,
        description="How long one attempt may take: a duration such as 30s or 5m; default 5m.",
    )
    retry: RetryPolicy | None = Field(
        default=None,
        json_schema_extra=cel(RETRY_BACKOFF_RULE),
        description="Attempts of the step; default one attempt, no retry.",
    )
    on_failure: Literal["fail", "continue", "compensate"] = Field(
        default="fail",
        description="When the step fails for good: fail the run, continue without it, or "
        "compensate the finished steps and fail. Default fail.",
    )
    compensation: Compensation | None = Field(
        default=None, description="What undoes the step, for onFailure compensate."
    )


TRIGGER_RULE = rule(
    f"self != '{grammar.TROUPE_ROOT}' && !self.startsWith('{grammar.TROUPE_ROOT}.')",
    f"a trigger subject may not lie under {grammar.TROUPE_ROOT}.: those subjects are Troupe's",
)


class Trigger(ApiModel):
    """What starts a run: a message on the subject."""

    subject: str = Field(
        min_length=1,
        max_length=grammar.SUBJECT_MAX,
        pattern=grammar.TRIGGER_SUBJECT_PATTERN,
        json_schema_extra=cel(TRIGGER_RULE),
        description="The NATS subject whose messages start runs, such as orders.created or "
        "orders.*.created: printable ASCII tokens, * and a final > as whole tokens but not "
        f"the first, no leading $, not under {grammar.TROUPE_ROOT}.",
    )

    @model_validator(mode="after")
    def _not_troupes(self) -> Trigger:
        if grammar.is_troupe_subject(self.subject):
            raise ValueError(TRIGGER_RULE["message"])
        return self


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

    description: str = Field(
        default="", max_length=4096, description="What the workflow does, for people."
    )
    steps: list[WorkflowStep] = Field(
        min_length=1, max_length=MAX_STEPS, description="The DAG's nodes, each name once."
    )
    trigger: Trigger = Field(description="What starts a run.")
    deadline: Duration | None = Field(
        default=None,
        description="Bound on a whole run: a duration such as 10m or 1h30m; unset: no bound.",
    )
    max_concurrent_runs: int = Field(
        default=10, ge=1, le=10_000, description="Runs in progress at once; default 10."
    )
    state: StateBucket | None = Field(
        default=None,
        description="A NATS KV bucket for the workflow. Not provisioned yet: agents declare "
        "the buckets they use in their own spec.state.",
    )
    dead_letter: DeadLetterPolicy = Field(
        default_factory=DeadLetterPolicy,
        description="Where trigger messages that cannot start a run go.",
    )
    retention: RunRetention = Field(
        default_factory=RunRetention,
        description="How long and how many finished runs are kept (stream and runs bucket).",
    )
    nats: NatsConnection = Field(
        default_factory=NatsConnection,
        description="Which NATS to use; unset fields fall back to the operator's settings.",
    )
    deletion_policy: Literal["Delete", "Retain"] = Field(
        default="Delete",
        description="Whether deleting the Workflow deletes its runs (stream, KV, dead "
        "letters) or keeps them (Retain); default Delete.",
    )
