"""The Workflow API: a DAG of steps, each handled by an Agent of the same namespace or
decided by a person (an approval step).

What CEL can check (unique names, known and non-self dependencies, a step being exactly
one of an agent's or an approval) the API server refuses; a cycle or an unknown Agent the
operator finds (``builders.dag``) and reports in status, and so an approval message that
is not a template (``builders.validation``). A valid Workflow runs in its own engine
Deployment (``builders.engine``).

An agent's step may name ``fallbacks``: other Agents of the namespace, tried in order with
the same input when the agent before has used up the step's attempts (each gets the
step's retry and timeout afresh); the run log records each hand-over. They must differ
from the step's agentRef and from each other (the API server checks); a missing one
stops the engine like a missing agentRef. Fallbacks are tried for failures and
timeouts, not for a Budget's refusal, which ends the run as before.

An approval step has no agent, fallbacks, retry, timeout of its own as a step, input or
compensation: the engine files a request (an Approval object appears) and the run waits,
WaitingForApproval, until an approver decides or ``approval.timeout`` passes.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from troupe_operator.api.agent import NatsConnection
from troupe_operator.api.approval import ApprovalApprovers
from troupe_operator.api.common import RETRY_BACKOFF_RULE, ApiModel, cel, rule
from troupe_runtime.contract import approvals, engine_config, grammar
from troupe_runtime.contract.durations import Duration, format_duration
from troupe_runtime.contract.engine_config import RunRetention
from troupe_runtime.contract.policies import (
    NAME_PATTERN,
    DeadLetterPolicy,
    RetryPolicy,
    StateBucket,
)

MAX_STEPS = 64
MAX_DEPENDENCIES = 32
MAX_FALLBACKS = engine_config.MAX_FALLBACKS


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


MAX_APPROVAL_TIMEOUT_TEXT = format_duration(approvals.MAX_TIMEOUT)
APPROVERS_RULE = rule(
    "(has(self.users) ? size(self.users) : 0) + (has(self.groups) ? size(self.groups) : 0) > 0",
    "an approval step names at least one approver: a user or a group",
)
APPROVAL_TIMEOUT_RULE = rule(
    f"!has(self.timeout) || duration(self.timeout) <= duration('{MAX_APPROVAL_TIMEOUT_TEXT}')",
    f"an approval may wait {MAX_APPROVAL_TIMEOUT_TEXT} at most",
    ".timeout",
)
AGENT_OR_APPROVAL_RULE = rule(
    "has(self.agentRef) != has(self.approval)",
    "a step names exactly one of agentRef (an Agent handles it) or approval (a person decides it)",
)
FALLBACKS_OWN_AGENT_RULE = rule(
    "!has(self.fallbacks) || !has(self.agentRef) || !(self.agentRef in self.fallbacks)",
    "a step's fallbacks must not name its own agentRef",
    ".fallbacks",
)
FALLBACKS_UNIQUE_RULE = rule(
    "self.all(f, self.exists_one(g, g == f))", "a step names each fallback agent once"
)
FALLBACKS_APPROVAL_RULE = rule(
    "!has(self.approval) || !has(self.fallbacks) || size(self.fallbacks) == 0",
    "an approval step takes no fallbacks: a person decides it, no agent",
    ".fallbacks",
)
APPROVAL_STEP_RULE = rule(
    "!has(self.approval) || (!has(self.retry) && !has(self.timeout) && !has(self.compensation)"
    " && (!has(self.input) || size(self.input) == 0)"
    " && (!has(self.onFailure) || self.onFailure != 'compensate'))",
    "an approval step takes no retry, timeout, input or compensation, and onFailure is fail "
    "or continue: set approval.timeout and approval.onTimeout instead",
    ".approval",
)


class ApprovalStepSpec(ApiModel):
    """A person's decision the run waits for."""

    model_config = ApiModel.model_config | {"json_schema_extra": cel(APPROVAL_TIMEOUT_RULE)}

    approvers: ApprovalApprovers = Field(
        json_schema_extra=cel(APPROVERS_RULE),
        description="Who may decide (at least one user or group); RBAC on approvals must "
        "allow them to patch the Approval too.",
    )
    message: str = Field(
        default="",
        max_length=approvals.MAX_MESSAGE_CHARS,
        description="What the approvers are asked: text with {expression} placeholders "
        "(JMESPath over the trigger and the steps' outputs, as in input), rendered when the "
        "step is reached, such as 'Deploy {trigger.version}? Tests: "
        "{steps.test.output.summary}'; {{ and }} are literal braces.",
    )
    timeout: Duration | None = Field(
        default=None,
        description="How long the run waits for a decision: a duration such as 30m or 24h; "
        f"default {format_duration(approvals.DEFAULT_TIMEOUT)}, at most "
        f"{MAX_APPROVAL_TIMEOUT_TEXT}. The run's deadline, when sooner, ends the wait first "
        "and fails the run.",
    )
    on_timeout: approvals.OnTimeout = Field(
        default="reject",
        description="What the timeout decides: reject (the default: the step fails) or "
        "approve (the step succeeds, decided by troupe:timeout).",
    )

    @model_validator(mode="after")
    def _bounded(self) -> ApprovalStepSpec:
        if not (self.approvers.users or self.approvers.groups):
            raise ValueError(APPROVERS_RULE["message"])
        if self.timeout is not None and self.timeout > approvals.MAX_TIMEOUT:
            raise ValueError(APPROVAL_TIMEOUT_RULE["message"])
        return self


class WorkflowStep(ApiModel):
    """One node of the DAG: an Agent's step (agentRef) or a person's (approval)."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": cel(
            AGENT_OR_APPROVAL_RULE,
            APPROVAL_STEP_RULE,
            FALLBACKS_APPROVAL_RULE,
            FALLBACKS_OWN_AGENT_RULE,
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
    agent_ref: str | None = Field(
        default=None,
        pattern=NAME_PATTERN,
        max_length=63,
        description="The name of the Agent, in this namespace, that handles the step; unset "
        "for an approval step.",
    )
    approval: ApprovalStepSpec | None = Field(
        default=None,
        description="Makes this an approval step: the run waits (WaitingForApproval) until an "
        "approver decides or the timeout does. Approved, the step's output is {approved, "
        "decidedBy, reason}; denied, the step fails and onFailure applies.",
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
    fallbacks: list[Annotated[str, Field(pattern=NAME_PATTERN, max_length=63)]] = Field(
        default_factory=list,
        max_length=MAX_FALLBACKS,
        json_schema_extra=cel(FALLBACKS_UNIQUE_RULE),
        description="Agents of this namespace that take the step over, in order, with the "
        "same input, when the agent before has failed it: each gets the step's retry and "
        "timeout afresh, and the run log records each hand-over (StepFellBack). The step "
        f"fails, and onFailure applies, only when the last has failed. At most "
        f"{MAX_FALLBACKS}, each once, never the step's own agentRef; not for approval "
        "steps. A Budget's refusal ends the run without falling back.",
    )

    @model_validator(mode="after")
    def _fallbacks(self) -> WorkflowStep:
        if self.approval is not None and self.fallbacks:
            raise ValueError(FALLBACKS_APPROVAL_RULE["message"])
        if self.agent_ref is not None and self.agent_ref in self.fallbacks:
            raise ValueError(FALLBACKS_OWN_AGENT_RULE["message"])
        if len(set(self.fallbacks)) != len(self.fallbacks):
            raise ValueError(FALLBACKS_UNIQUE_RULE["message"])
        return self

    @model_validator(mode="after")
    def _agent_or_approval(self) -> WorkflowStep:
        if (self.agent_ref is None) == (self.approval is None):
            raise ValueError(AGENT_OR_APPROVAL_RULE["message"])
        if self.approval is not None and (
            self.retry is not None
            or self.timeout is not None
            or self.compensation is not None
            or self.input
            or self.on_failure == "compensate"
        ):
            raise ValueError(APPROVAL_STEP_RULE["message"])
        return self


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
