"""An approval step's request and its decisions, from the run's state (pure).

The engine's log is the truth about an approval: ``ApprovalRequested`` opens it,
``ApprovalDecided`` closes it. What the approvals bucket holds is derived from that
(``request_for``), so the engine can write it again after a crash and converge: the bucket
says Pending while the log waits, and the final phase once it decided. A run that ends
with a request still pending withdraws it (``withdrawn``).

A decision is anyone's message on the run's ``approve`` subject: ``decision_problem``
says why one does not count (a name no waiting step has, a run not waiting, a decider in
Troupe's reserved ``troupe:`` namespace) before the engine logs anything.
"""

from __future__ import annotations

from datetime import datetime

from troupe_runtime.contract import approvals
from troupe_runtime.contract.approvals import ApprovalDecision, ApprovalRequest, Requester
from troupe_runtime.contract.engine_config import EngineConfig
from troupe_runtime.contract.run_events import ApprovalDecided
from troupe_runtime.contract.run_state import RunState, StepApproval, pending_approvals

RESERVED_DECIDER_PREFIX = "troupe:"
"""Deciders Troupe itself writes (``approvals.TIMEOUT_DECIDER``, ``WITHDRAWN_DECIDER``):
no decision on the wire may claim one."""
MAX_DECIDER_CHARS = 256


def request_for(config: EngineConfig, state: RunState, step: str) -> ApprovalRequest | None:
    """The request ``step``'s approval should be in the bucket as, from the log; None if
    the step never asked."""
    current = state.steps.get(step)
    if current is None or current.approval is None:
        return None
    approval = current.approval
    engine_step = config.step(step)
    assert engine_step.approval is not None
    return ApprovalRequest(
        name=approval.name,
        namespace=config.namespace,
        requester=Requester(kind="Workflow", name=config.workflow, run_id=state.run_id, step=step),
        approvers=engine_step.approval.approvers,
        message=approval.message,
        requested_at=approval.requested_at,
        expires_at=approval.expires_at,
        on_timeout=engine_step.approval.on_timeout,
        reply_subject=config.subject("approve", state.run_id),
        phase=approval.phase,
        approved=approval.approved,
        decided_by=approval.decided_by,
        decided_at=approval.decided_at,
        reason=approval.reason,
    )


def withdrawn(request: ApprovalRequest, at: datetime) -> ApprovalRequest:
    """A pending request whose run ended first."""
    return request.model_copy(
        update={
            "phase": "Withdrawn",
            "approved": False,
            "decided_by": approvals.WITHDRAWN_DECIDER,
            "decided_at": at,
        }
    )


def decision_problem(state: RunState | None, decision: ApprovalDecision) -> str | None:
    """Why ``decision`` does not decide anything in this run, or None."""
    decider = approvals.bounded_text(decision.decided_by, MAX_DECIDER_CHARS)
    if not decider:
        return "decidedBy is blank"
    if decider.startswith(RESERVED_DECIDER_PREFIX):
        return f"decidedBy {decider!r} is reserved for Troupe"
    if state is None or state.terminal:
        return "the run is finished or unknown"
    if state.cancellation is not None or state.status == "Compensating":
        return "the run is ending"
    if waiting_step(state, decision.name) is None:
        return f"no step of the run waits for approval {decision.name!r}"
    return None


def waiting_step(state: RunState, name: str) -> str | None:
    """The step waiting for request ``name``, if one does."""
    for step, approval in pending_approvals(state).items():
        if approval.name == name:
            return step
    return None


def decided_event(
    state: RunState, step: str, decision: ApprovalDecision, at: datetime
) -> ApprovalDecided:
    """A person's decision as the run logs it: text bounded and blanked of control
    characters (it is shown in statuses and logs)."""
    approval = state.steps[step].approval
    assert approval is not None
    approved = decision.verdict == "Approve"
    return ApprovalDecided(
        run_id=state.run_id,
        at=at,
        step=step,
        name=approval.name,
        phase="Approved" if approved else "Denied",
        approved=approved,
        decided_by=approvals.bounded_text(decision.decided_by, MAX_DECIDER_CHARS),
        decided_at=decision.decided_at,
        reason=approvals.bounded_text(decision.reason, approvals.MAX_REASON_CHARS),
    )


def timed_out_event(
    state: RunState, step: str, approval: StepApproval, approved: bool, reason: str, at: datetime
) -> ApprovalDecided:
    """A request its timeout resolved, per the step's ``onTimeout``."""
    return ApprovalDecided(
        run_id=state.run_id,
        at=at,
        step=step,
        name=approval.name,
        phase="TimedOut",
        approved=approved,
        decided_by=approvals.TIMEOUT_DECIDER,
        decided_at=at,
        reason=reason,
    )
