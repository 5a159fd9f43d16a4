"""A run waiting for approval, as people and callers see it: ``troupe runs`` and ``troupe
runs show`` print WaitingForApproval and the pending Approval's name, the step timeline
shows the approval step and its decision, and the gateway's A2A task is input-required
with what the approvers are asked."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from a2a.types.a2a_pb2 import TaskState as A2ATaskState
from troupe_gateway import a2a_tasks
from troupe_gateway.calls import run_view

from troupe_cli import render
from troupe_cli.views import timeline
from troupe_runtime.contract.gateway import TaskRecord
from troupe_runtime.contract.run_events import (
    ApprovalDecided,
    ApprovalRequested,
    Event,
    RunStarted,
)
from troupe_runtime.contract.run_state import RunState, replay

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NAME = "release-0123456789abcdef"
REQUESTED = ApprovalRequested(
    run_id="r1",
    at=T0 + timedelta(seconds=1),
    step="gate",
    name=NAME,
    message="ship 1.2?",
    expires_at=T0 + timedelta(hours=1),
)
DENIED = ApprovalDecided(
    run_id="r1",
    at=T0 + timedelta(seconds=5),
    step="gate",
    name=NAME,
    phase="Denied",
    approved=False,
    decided_by="bob",
    decided_at=T0 + timedelta(seconds=5),
    reason="not today",
)


def _state(*events: Event) -> RunState:
    state = replay([RunStarted(run_id="r1", at=T0), *events])
    assert state is not None
    return state


def test_runs_list_a_waiting_run_with_its_approval() -> None:
    waiting, other = _state(REQUESTED), _state()
    text = render.runs_text([waiting, other])
    header, row, plain = text.splitlines()[:3]
    assert header.split()[-1] == "APPROVAL"
    assert "WaitingForApproval" in row
    assert row.rstrip().endswith(NAME)
    assert NAME not in plain
    assert [r["waitingForApprovals"] for r in render.runs_json([waiting, other])] == [[NAME], []]
    assert "APPROVAL" not in render.runs_text([other]).splitlines()[0]


def test_runs_show_names_the_pending_approval_and_what_it_asks() -> None:
    state = _state(REQUESTED)
    text = render.run_text(state, timeline([RunStarted(run_id="r1", at=T0), REQUESTED]))
    assert "status:    WaitingForApproval" in text
    assert f"approval:  {NAME} (step gate" in text
    assert "asks:      ship 1.2?" in text
    assert "gate" in text
    assert "WaitingForApproval" in text.split("asks:")[1]


def test_the_timeline_and_json_keep_who_decided_for_audit() -> None:
    events: list[Event] = [RunStarted(run_id="r1", at=T0), REQUESTED, DENIED]
    [attempt] = timeline(events)
    assert (attempt.step, attempt.status) == ("gate", "Denied")
    assert attempt.error == f"approval {NAME} denied by bob: not today"
    document = render.run_json(_state(REQUESTED, DENIED), [attempt])
    [approval] = document["approvals"]
    assert (approval["decidedBy"], approval["reason"], approval["phase"]) == (
        "bob",
        "not today",
        "Denied",
    )
    assert "approval:" not in render.run_text(_state(REQUESTED, DENIED), [attempt])


def test_a_waiting_run_is_an_input_required_task_saying_what_is_asked() -> None:
    record = TaskRecord(
        task_id="r1", kind="Workflow", name="release", context_id="c1", created_at=T0
    )
    view = run_view(record, _state(REQUESTED))
    assert (view.state, view.approvals) == ("input-required", (NAME,))
    assert not view.terminal
    status = a2a_tasks.status(view)
    assert status.state == A2ATaskState.TASK_STATE_INPUT_REQUIRED
    assert status.message.parts[0].text == f"approval {NAME} (step gate): ship 1.2?"
    assert list(status.message.metadata["approvals"]) == [NAME]
    running = run_view(record, _state())
    assert (running.state, running.prompt) == ("working", None)
