"""Human decisions Troupe waits for: what a requester files and what a person decides.

The round trip, each side's part of it:

1. A requester (a Workflow engine reaching an approval step, or an LLM agent before a
   tool call its policy guards) puts an ``ApprovalRequest`` in ``phase`` Pending under
   ``naming.approval_key(name)`` in the namespace's approvals bucket
   (``naming.approvals_bucket``), then waits, durably: the wait is a fact in its own log,
   not a process blocked on it.
2. The operator keeps one ``Approval`` object per request in that bucket (level-based: it
   watches the bucket and converges), so ``kubectl get approvals -A`` is the inbox.
3. A person decides by patching the Approval's ``spec.decision`` (``troupe approve`` or
   ``troupe deny``). A ValidatingAdmissionPolicy in the chart admits the patch only from a
   named approver and only when ``decidedBy`` is the caller's own user name, so the
   recorded decider is the authenticated one.
4. The operator publishes an ``ApprovalDecision`` (a CloudEvent of ``DECISION_TYPE``, with
   ``Nats-Msg-Id`` = ``decision_message_id``) to the request's ``reply_subject``.
5. The requester logs the decision in its run's event log (who, when, why: the audit
   trail), acts on it, and writes the request back with its final ``phase``; the operator
   copies that phase to the Approval's status.

An LLM agent's tool call (``contract.tool_approvals`` says which calls wait): the request's
``requester`` is ``Requester(kind="Agent", name=<agent>, run_id=<the message's event id>,
tool=<tool name>)``, its name ``approval_name(agent, event id, <turn>-<call id>)``, and its
``reply_subject`` (and ``reply_subject_for``) the Agent's own
``naming.agent_approvals_subject``: ``troupe.<ns>.agents.<agent>.approvals``, which the
Agent's inbox stream stores and its priority-0 consumer reads. The runtime journals the
parked message, acknowledges it, and on the decision writes the request's final phase
*before* it resumes the conversation: the bucket's revision is the one arbiter between a
person's decision and the timeout, so whichever lands first is the decision.

A request that times out is resolved by its requester alone (``phase`` TimedOut, with
``approved`` from ``on_timeout``); one whose run ends first (cancelled, deadline) is
Withdrawn. A decision that arrives after the request left Pending changes nothing.

Everything a person types (``reason``) and everything templated from a run (``message``) is
untrusted text: ``bounded_text`` cuts it and blanks control characters before it is stored
or shown.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timedelta
from typing import Literal

from nats.js.api import KeyValueConfig, StorageType
from pydantic import Field

from troupe_runtime.contract import envelope, grammar, naming
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.policies import WireModel
from troupe_runtime.contract.run_events import RUN_ID_PATTERN

REQUEST_TYPE = "troupe.approval.requested"
DECISION_TYPE = "troupe.approval.decided"
DECISION_SOURCE = "/troupe-operator/approvals"
"""The ``source`` of the decisions the operator relays."""
MAX_MESSAGE_CHARS = 4096
MAX_REASON_CHARS = 1024
MAX_APPROVERS = 64
MAX_TIMEOUT = timedelta(days=30)
"""The longest an approval may wait: the bucket keeps a request a day longer."""
DEFAULT_TIMEOUT = timedelta(hours=24)
TIMEOUT_DECIDER = "troupe:timeout"
"""``decided_by`` of a request its timeout resolved."""
WITHDRAWN_DECIDER = "troupe:withdrawn"
"""``decided_by`` of a request whose run ended before anyone decided."""

AGENT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
"""An Agent's name, a DNS label: nothing that could widen a subject."""

Phase = Literal["Pending", "Approved", "Denied", "TimedOut", "Withdrawn"]
FINAL_PHASES: tuple[Phase, ...] = ("Approved", "Denied", "TimedOut", "Withdrawn")
Verdict = Literal["Approve", "Deny"]
OnTimeout = Literal["reject", "approve"]


def bounded_text(value: str, limit: int) -> str:
    """``value`` cut to ``limit`` characters, control characters blanked (so text shown in
    a status, a log line or ``kubectl get`` cannot forge lines), surrounding blanks
    stripped."""
    return "".join(c if c.isprintable() else " " for c in value[:limit]).strip()


class Approvers(WireModel):
    """Who may decide: Kubernetes user names and groups, as the API server authenticates
    them (``request.userInfo``). RBAC on ``approvals`` must allow the patch as well."""

    users: list[str] = Field(
        default_factory=list,
        max_length=MAX_APPROVERS,
        description="Kubernetes user names that may decide (ServiceAccounts as "
        "system:serviceaccount:<namespace>:<name>).",
    )
    groups: list[str] = Field(
        default_factory=list,
        max_length=MAX_APPROVERS,
        description="Kubernetes groups whose members may decide.",
    )

    def admits(self, user: str, groups: list[str]) -> bool:
        """Whether ``user`` (a member of ``groups``) is one of these approvers: the policy's
        rule, for code that decides outside the API server (tests, the CLI's hint)."""
        return user in self.users or any(g in self.groups for g in groups)


class Requester(WireModel):
    """What waits for the decision."""

    kind: Literal["Workflow", "Agent"]
    name: str
    run_id: str
    """The Workflow run, or for an Agent the event (task) whose tool call waits."""
    step: str | None = None
    """The Workflow's approval step."""
    tool: str | None = None
    """The Agent's tool call that waits."""


class ApprovalRequest(WireModel):
    """One pending (or resolved) decision, as the requester files it in the bucket."""

    name: str = Field(description="The Approval object's name (``approval_name``).")
    namespace: str
    requester: Requester
    approvers: Approvers
    message: str = Field(default="", max_length=MAX_MESSAGE_CHARS)
    requested_at: datetime
    expires_at: datetime | None = None
    on_timeout: OnTimeout = "reject"
    reply_subject: str
    """Where the operator publishes the ``ApprovalDecision``."""
    phase: Phase = "Pending"
    approved: bool | None = None
    """Set with a final phase: whether the requester went on as approved."""
    decided_by: str | None = None
    decided_at: datetime | None = None
    reason: str | None = Field(default=None, max_length=MAX_REASON_CHARS)

    @property
    def pending(self) -> bool:
        return self.phase == "Pending"


class ApprovalDecision(WireModel):
    """A person's decision, as the operator relays it from the Approval's spec."""

    name: str = Field(max_length=63, pattern=grammar.DNS_LABEL_PATTERN)
    """An Approval's name (``approval_name``): a decision arrives on a subject anyone may
    publish to, so a name that cannot be one is refused here, before it becomes a KV key."""
    verdict: Verdict
    decided_by: str = Field(min_length=1, max_length=256)
    decided_at: datetime
    reason: str = Field(default="", max_length=MAX_REASON_CHARS)


def approval_name(owner: str, run_id: str, point: str) -> str:
    """The Approval object of ``owner``'s (a Workflow's or an Agent's name) run ``run_id`` at
    ``point`` (a step's name, or a tool call's id): deterministic, so a requester filing
    twice after a crash names the same object; a DNS label (at most 63 characters) whatever
    the run id, which is a caller's text."""
    digest = hashlib.sha256(f"{run_id}\x00{point}".encode()).hexdigest()[:16]
    return f"{owner[: 63 - 17].rstrip('-')}-{digest}"


def decision_message_id(request: ApprovalRequest, uid: str) -> str:
    """The decision's ``Nats-Msg-Id``: one per Approval object (``uid``), so a relay
    retried after a crash is dropped by JetStream."""
    return f"approval:{request.name}:{uid}"


def reply_subject_for(namespace: str, requester: Requester) -> str | None:
    """The one subject a decision for ``requester`` may be published to: a Workflow run's
    ``approve`` subject, or an Agent's ``naming.agent_approvals_subject`` (one per Agent:
    the decision names its Approval, so no run id goes into the subject). The bucket is
    writable by every requester, so the operator relays to this subject, never to a
    ``reply_subject`` a request merely claims. None where the run id is not one (a wildcard
    would reach other runs) or the Agent's name is no DNS label."""
    if requester.kind == "Agent":
        if not AGENT_NAME.fullmatch(requester.name):
            return None
        return naming.agent_approvals_subject(namespace, requester.name)
    if not RUN_ID_PATTERN.match(requester.run_id):
        return None
    return naming.workflow_subject(namespace, requester.name, "approve", requester.run_id)


def decision_event(request: ApprovalRequest, decision: ApprovalDecision, uid: str) -> CloudEvent:
    """The CloudEvent the operator publishes to the request's reply subject (with
    ``Nats-Msg-Id`` = its id, ``decision_message_id``)."""
    return CloudEvent(
        id=decision_message_id(request, uid),
        source=DECISION_SOURCE,
        type=DECISION_TYPE,
        time=decision.decided_at,
        subject=request.name,
        correlationid=request.requester.run_id,
        datacontenttype=envelope.JSON_CONTENT_TYPE,
        data=decision.model_dump(mode="json", by_alias=True),
    )


def approvals_bucket_config(namespace: str) -> KeyValueConfig:
    """The namespace's approvals bucket, as the operator provisions it (once per namespace,
    shared by its Workflows and Agents): the latest value per request, kept a day past the
    longest wait, so a request no requester resolves (its Workflow deleted) ages out."""
    return KeyValueConfig(
        bucket=naming.approvals_bucket(namespace),
        history=1,
        storage=StorageType.FILE,
        ttl=(MAX_TIMEOUT + timedelta(days=1)).total_seconds(),
        description=f"Approval requests of namespace {namespace}",
    )
