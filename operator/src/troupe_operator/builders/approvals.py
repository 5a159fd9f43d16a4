"""Approvals, pure: a request read from the bucket → the Approval object to create, whether
to relay its decision, and the status it should show.

The approvals bucket is writable by every requester in the namespace, so a request is
untrusted input: ``refusal`` says why the operator will not act on one (its key or namespace
is not its own, its reply subject is not its requester's), and ``relay_refusal`` why it will
not publish a decision (the Approval's spec is not the request's: an Approval someone else
made under that name names other approvers). Nothing here does I/O; ``reconcilers.approvals``
reads, calls these, and writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import ValidationError

from troupe_operator.api import API_VERSION
from troupe_operator.api.approval import (
    ApprovalDecisionSpec,
    ApprovalSpec,
    ApprovalStatus,
)
from troupe_operator.api.status import Condition
from troupe_operator.builders import status as status_builders
from troupe_operator.builders.pods import FIELD_MANAGER
from troupe_runtime.contract import approvals, grammar, naming
from troupe_runtime.contract.approvals import ApprovalDecision, ApprovalRequest
from troupe_runtime.contract.redact import redact

KIND = "Approval"
PLURAL = "approvals"
OWNER_PLURALS = {"Workflow": "workflows", "Agent": "agents"}
REQUESTER_LABEL = "troupe.dev/requester"
REQUESTER_KIND_LABEL = "troupe.dev/requester-kind"
REASON_CHARS = approvals.MAX_REASON_CHARS
MESSAGE_CHARS = 1024
MAX_NAME_CHARS = 256
SHOWN_APPROVERS = 5


def parse_request(stored: bytes | None) -> tuple[ApprovalRequest | None, str | None]:
    """The request a bucket value holds, or why it holds none (unreadable JSON, a field the
    contract refuses)."""
    if stored is None:
        return None, "the request is not in the approvals bucket"
    try:
        return ApprovalRequest.model_validate_json(stored), None
    except ValidationError as error:
        return None, f"the bucket's value is not an approval request ({error.error_count()} errors)"


def foreign(namespace: str, key: str, request: ApprovalRequest) -> str | None:
    """Why ``request``, found under ``key`` in ``namespace``'s bucket, is not this bucket's to
    mirror at all (it claims another namespace, another key, a requester that cannot be a
    name), or None."""
    if request.namespace != namespace:
        return f"the request names namespace {request.namespace!r}, not its bucket's {namespace}"
    if naming.approval_key(request.name) != key or not grammar.matches(
        grammar.DNS_LABEL_PATTERN, request.name
    ):
        return f"the request's name {request.name!r} is not its key {key!r}"
    if not grammar.matches(grammar.DNS_LABEL_PATTERN, request.requester.name):
        return f"the requester's name {request.requester.name!r} is not a DNS label"
    return None


def unrelayable(namespace: str, request: ApprovalRequest) -> str | None:
    """Why no decision may be published to ``request.reply_subject``: it is not its
    requester's own subject (the bucket is untrusted; a forged subject could reach another
    Workflow's run), or its requester has none. The Approval is still made, and Stalled."""
    expected = approvals.reply_subject_for(namespace, request.requester)
    if expected is None:
        return (
            f"no decision can be relayed to {request.requester.kind} "
            f"{request.requester.name} run {request.requester.run_id!r}: only a Workflow run "
            "with a valid run id has a reply subject"
        )
    if request.reply_subject != expected:
        return (
            f"the request's reply subject {request.reply_subject!r} is not its requester's "
            f"{expected}: the operator relays no decision to it"
        )
    return None


def _stamp(value: datetime | None) -> str | None:
    return None if value is None else status_builders.timestamp(value)


def approval_spec(request: ApprovalRequest) -> ApprovalSpec:
    """The Approval's spec: the request as it was filed, its text bounded and blanked."""
    requester = request.requester
    return ApprovalSpec.model_validate(
        {
            "requester": {
                "kind": requester.kind,
                "name": requester.name,
                "runId": approvals.bounded_text(requester.run_id, MAX_NAME_CHARS),
                **(
                    {"step": approvals.bounded_text(requester.step, MAX_NAME_CHARS)}
                    if requester.step
                    else {}
                ),
                **(
                    {"tool": approvals.bounded_text(requester.tool, MAX_NAME_CHARS)}
                    if requester.tool
                    else {}
                ),
            },
            "approvers": {
                "users": [u for u in request.approvers.users if 0 < len(u) <= MAX_NAME_CHARS],
                "groups": [g for g in request.approvers.groups if 0 < len(g) <= MAX_NAME_CHARS],
            },
            "message": approvals.bounded_text(request.message, approvals.MAX_MESSAGE_CHARS),
            **({"expiresAt": _stamp(request.expires_at)} if request.expires_at else {}),
            "onTimeout": request.on_timeout,
        }
    )


def approval_manifest(request: ApprovalRequest, owner: Mapping[str, Any]) -> dict[str, Any]:
    """The Approval object for ``request``, owned by its requester ``owner`` (the Workflow or
    Agent as read), so the garbage collector removes it with its owner. No finalizer: an
    Approval never waits on the operator to go."""
    meta = owner["metadata"]
    requester = request.requester
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": request.name,
            "namespace": request.namespace,
            "labels": {
                "app.kubernetes.io/managed-by": FIELD_MANAGER,
                REQUESTER_KIND_LABEL: requester.kind,
                REQUESTER_LABEL: requester.name,
            },
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": requester.kind,
                    "name": meta["name"],
                    "uid": meta["uid"],
                }
            ],
        },
        "spec": approval_spec(request).model_dump(by_alias=True, exclude_none=True),
    }


def owner_alive(owner: Mapping[str, Any] | None) -> bool:
    """Whether the requester exists and is not being deleted: only then is an Approval made
    (one made for a deleted owner would never be collected)."""
    return owner is not None and not owner.get("metadata", {}).get("deletionTimestamp")


def stored_spec(body: Mapping[str, Any]) -> ApprovalSpec | None:
    try:
        return ApprovalSpec.model_validate(body.get("spec") or {})
    except ValidationError:
        return None


def relay_refusal(request: ApprovalRequest, body: Mapping[str, Any]) -> str | None:
    """Why a decision on ``body`` must not reach ``request``'s requester: the Approval's spec
    (whose approvers the admission policy checked) is not the request's (someone made an
    Approval of that name before the operator did), or it is not the request's incarnation."""
    spec = stored_spec(body)
    if spec is None:
        return "the Approval's spec cannot be read"
    wanted = approval_spec(request).model_dump(exclude={"decision"})
    if spec.model_dump(exclude={"decision"}) != wanted:
        return (
            "the Approval's spec is not the request's (another Approval took its name): "
            "delete it and the operator makes the request's own"
        )
    return None


def decision_of(body: Mapping[str, Any]) -> ApprovalDecisionSpec | None:
    spec = stored_spec(body)
    return None if spec is None else spec.decision


def decision(
    request: ApprovalRequest, given: ApprovalDecisionSpec, decided_at: datetime
) -> ApprovalDecision:
    """What the operator relays: the approver's verdict, who (the user name the admission
    policy held to the caller's own) and why."""
    return ApprovalDecision(
        name=request.name,
        verdict=given.verdict,
        decided_by=given.decided_by,
        decided_at=decided_at,
        reason=approvals.bounded_text(given.reason, REASON_CHARS),
    )


Action = Literal["create", "relay", "status"]


@dataclass(frozen=True)
class Plan:
    """What one pass over one request does, in order; ``refused`` says why it relays no
    decision (the request or its Approval is not trustworthy)."""

    actions: tuple[Action, ...]
    refused: str | None = None


def plan(
    namespace: str,
    key: str,
    request: ApprovalRequest,
    body: Mapping[str, Any] | None,
    owner_exists: bool,
) -> Plan:
    """Create the Approval of a pending request whose owner exists; relay its decision once,
    while the request is pending and trustworthy; keep the status in step. A resolved
    request without an Approval stays without one (nobody waits for it), and a foreign one
    is left alone."""
    problem = foreign(namespace, key, request)
    if problem is not None:
        return Plan((), problem)
    refused = unrelayable(namespace, request)
    if body is None:
        if not request.pending or not owner_exists:
            return Plan((), refused)
        return Plan(("create", "status"), refused)
    if refused is None:
        refused = relay_refusal(request, body)
    relayed = bool((body.get("status") or {}).get("relayedAt"))
    if decision_of(body) is not None and request.pending and refused is None and not relayed:
        return Plan(("relay", "status"), None)
    return Plan(("status",), refused)


def _condition(
    type: str, holds: bool, reason: str, message: str, generation: int, now: datetime
) -> Condition:
    return Condition(
        type=type,
        status="True" if holds else "False",
        reason=reason,
        message=status_builders.truncate(redact(approvals.bounded_text(message, MESSAGE_CHARS))),
        last_transition_time=status_builders.timestamp(now),
        observed_generation=generation,
    )


def _approvers(request: ApprovalRequest) -> str:
    named = [*request.approvers.users, *(f"group {g}" for g in request.approvers.groups)]
    shown = ", ".join(named[:SHOWN_APPROVERS]) or "nobody"
    more = len(named) - SHOWN_APPROVERS
    return shown + (f" and {more} more" if more > 0 else "")


State = Literal["final", "progressing", "stalled"]


def _pending_state(
    request: ApprovalRequest | None,
    problem: str | None,
    given: ApprovalDecisionSpec | None,
    relayed_at: str | None,
    relay_failure: str | None,
) -> tuple[State, str, str]:
    """Where a request still Pending stands: (state, reason, message)."""
    if problem is not None:
        return "stalled", "RequestRefused" if request else "RequestNotFound", problem
    if given is None:
        waiting = f"waiting for a decision by {_approvers(request)}" if request else "waiting"
        return "progressing", "AwaitingDecision", waiting
    if relayed_at is None:
        return "progressing", "RelayPending", relay_failure or "relaying the decision"
    said = f"{given.verdict} by {given.decided_by} relayed; waiting for the requester to act"
    return "progressing", "DecisionRelayed", said


def approval_status(
    previous: ApprovalStatus,
    request: ApprovalRequest | None,
    problem: str | None,
    given: ApprovalDecisionSpec | None,
    relayed_at: str | None,
    relay_failure: str | None,
    generation: int,
    now: datetime,
) -> ApprovalStatus:
    """The status from what was observed: the request's phase (its requester's word), the
    decision relayed, and kstatus conditions (Reconciling while Pending, Ready once final,
    Stalled when no decision can ever be relayed). Every text shown is bounded. A resolved
    Approval whose request is gone (aged out of the bucket) stays as it was resolved."""
    if request is None and previous.phase != "Pending":
        return previous
    fields: dict[str, Any] = {"relayed_at": relayed_at}
    state: State
    reason: str
    if request is not None and not request.pending:
        decider = _text(request.decided_by, MAX_NAME_CHARS)
        fields |= {
            "phase": request.phase,
            "approved": request.approved,
            "decided_by": decider,
            "decided_at": _stamp(request.decided_at),
            "reason": _text(request.reason, REASON_CHARS),
        }
        state, reason, message = "final", request.phase, f"{request.phase} by {decider or '?'}"
    else:
        fields["phase"] = "Pending"
        if given is not None:
            fields |= {
                "decided_by": _text(given.decided_by, MAX_NAME_CHARS),
                "reason": _text(given.reason, REASON_CHARS),
                "decided_at": relayed_at,
            }
        state, reason, message = _pending_state(request, problem, given, relayed_at, relay_failure)
    conditions = [
        _condition("Ready", state == "final", reason, message, generation, now),
        _condition(
            "Reconciling",
            state == "progressing",
            reason,
            message if state == "progressing" else "",
            generation,
            now,
        ),
        _condition(
            "Stalled",
            state == "stalled",
            reason,
            message if state == "stalled" else "",
            generation,
            now,
        ),
    ]
    conditions = status_builders.keep_transition_times(previous.conditions, conditions)
    return ApprovalStatus(observed_generation=generation, conditions=conditions, **fields)


def _text(value: str | None, limit: int) -> str | None:
    return None if value is None else approvals.bounded_text(value, limit)
