"""The Approval API: one object per decision a requester waits for, so that
``kubectl get approvals -A`` is the inbox of what waits for a person.

The operator creates an Approval from each pending ``contract.approvals.ApprovalRequest`` it
finds in a namespace's approvals bucket; a person decides by patching ``spec.decision``
(``troupe approve`` / ``troupe deny``). Everything else in the spec is the request as it was
filed and never changes, and a decision once set is final: the CRD says so in CEL
(``APPROVAL_RULES``). Who may decide is RBAC on ``approvals`` plus the chart's
ValidatingAdmissionPolicy (``charts/troupe/templates/approval-policy.yaml``), which admits a
decision only from a user named in ``spec.approvers`` and only with ``decidedBy`` equal to
the caller's authenticated user name. The status is the operator's: the request's phase as
its requester last wrote it, and who decided, when and why.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from troupe_operator.api.common import ApiModel, rule
from troupe_operator.api.status import ObjectStatus
from troupe_runtime.contract import approvals, grammar
from troupe_runtime.contract.approvals import OnTimeout, Phase, Verdict

MAX_NAME_CHARS = 256
"""A user, group or requester name: what CEL needs to bound the policy's cost."""
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]

APPROVAL_RULES = [
    rule(
        "self.spec.requester == oldSelf.spec.requester"
        " && self.spec.approvers == oldSelf.spec.approvers"
        " && self.spec.message == oldSelf.spec.message"
        " && self.spec.onTimeout == oldSelf.spec.onTimeout"
        " && has(self.spec.expiresAt) == has(oldSelf.spec.expiresAt)"
        " && (!has(self.spec.expiresAt) || self.spec.expiresAt == oldSelf.spec.expiresAt)",
        "only spec.decision may change: the rest is the request as it was filed",
        ".spec",
    ),
    rule(
        "!has(oldSelf.spec.decision)"
        " || (has(self.spec.decision) && self.spec.decision == oldSelf.spec.decision)",
        "a decision once set is final: spec.decision can no longer change",
        ".spec.decision",
    ),
]
"""Transition rules: the request is immutable, the decision is set once."""


class ApprovalRequester(ApiModel):
    """What waits for the decision."""

    kind: Literal["Workflow", "Agent"] = Field(
        description="Workflow (an approval step) or Agent (a tool call its policy guards)."
    )
    name: str = Field(
        max_length=grammar.DNS_LABEL_MAX,
        pattern=grammar.DNS_LABEL_PATTERN,
        description="The Workflow's or Agent's name, in the Approval's namespace: it owns "
        "the Approval, which goes when it is deleted.",
    )
    run_id: str = Field(
        max_length=MAX_NAME_CHARS,
        description="The Workflow run, or for an Agent the event (task) whose tool call waits.",
    )
    step: str | None = Field(
        default=None, max_length=MAX_NAME_CHARS, description="The Workflow's approval step."
    )
    tool: str | None = Field(
        default=None, max_length=MAX_NAME_CHARS, description="The Agent's tool call that waits."
    )


class ApprovalApprovers(ApiModel):
    """Who may decide, besides what RBAC on approvals allows: the admission policy admits a
    decision only from one of these."""

    users: list[Name] = Field(
        default_factory=list,
        max_length=approvals.MAX_APPROVERS,
        description="Kubernetes user names, as the API server authenticates them (a "
        "ServiceAccount is system:serviceaccount:<namespace>:<name>).",
    )
    groups: list[Name] = Field(
        default_factory=list,
        max_length=approvals.MAX_APPROVERS,
        description="Kubernetes groups: any member may decide.",
    )


class ApprovalDecisionSpec(ApiModel):
    """A person's decision: set once, with troupe approve or troupe deny, or a patch."""

    verdict: Verdict = Field(description="Approve or Deny.")
    decided_by: str = Field(
        min_length=1,
        max_length=MAX_NAME_CHARS,
        description="Your own user name, as the API server authenticates you: the admission "
        "policy refuses any other, so the recorded decider is the authenticated one.",
    )
    reason: str = Field(
        default="",
        max_length=approvals.MAX_REASON_CHARS,
        description="Why, for the run's log (the audit trail).",
    )


class ApprovalSpec(ApiModel):
    """The request as its requester filed it, and the decision once someone makes it."""

    requester: ApprovalRequester
    approvers: ApprovalApprovers = Field(default_factory=ApprovalApprovers)
    message: str = Field(
        default="",
        max_length=approvals.MAX_MESSAGE_CHARS,
        description="What the approvers are asked, templated from the run (untrusted text).",
    )
    expires_at: str | None = Field(
        default=None,
        description="RFC 3339: when the requester stops waiting and applies onTimeout.",
    )
    on_timeout: OnTimeout = Field(
        default="reject",
        description="What the requester does when nobody decided in time: reject (the "
        "default) or approve.",
    )
    decision: ApprovalDecisionSpec | None = Field(
        default=None,
        description="Set by an approver to decide; final once set. The operator relays it "
        "to the requester.",
    )


class ApprovalStatus(ObjectStatus):
    """What the operator last observed of the request and its decision."""

    phase: Phase = Field(
        default="Pending",
        description="Pending, or as the requester resolved it: Approved, Denied, TimedOut "
        "or Withdrawn (its run ended first).",
    )
    approved: bool | None = Field(
        default=None, description="With a final phase: whether the requester went on."
    )
    decided_by: str | None = Field(
        default=None,
        description="Who decided: the approver's user name, troupe:timeout or troupe:withdrawn.",
    )
    decided_at: str | None = Field(default=None, description="RFC 3339: when.")
    reason: str | None = Field(default=None, description="Why, as the decider wrote it.")
    relayed_at: str | None = Field(
        default=None,
        description="RFC 3339: when the operator published spec.decision to the requester.",
    )


__all__ = [
    "APPROVAL_RULES",
    "ApprovalApprovers",
    "ApprovalDecisionSpec",
    "ApprovalRequester",
    "ApprovalSpec",
    "ApprovalStatus",
]
