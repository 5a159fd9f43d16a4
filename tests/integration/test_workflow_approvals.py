"""Approval steps on a real nats-server with the real engine: the run waits for a person
(its request in the namespace's approvals bucket, the run WaitingForApproval), a decision
published as the operator relays it moves it on, a timeout resolves it either way, the
run's deadline withdraws it, a forged or malformed decision changes nothing, and an engine
SIGKILLed while the run waits hands it to the next engine, which records each fact once."""

from __future__ import annotations

import signal
import uuid
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js import JetStreamContext
from nats.js.api import Header
from nats.js.errors import KeyNotFoundError
from troupe_gateway.calls import Calls

from tests.integration.runtime_harness import eventually
from tests.integration.test_workflow_recovery import engine_answers, engine_process
from tests.integration.workflow_harness import (
    agents,
    engine,
    engine_config,
    new_namespace,
    result,
    run_events,
    trigger,
)
from troupe_cli.main import amain
from troupe_devcluster.layout import free_port
from troupe_runtime.agent.context import Context
from troupe_runtime.contract import approvals, envelope, naming
from troupe_runtime.contract.approvals import ApprovalDecision, ApprovalRequest, Verdict
from troupe_runtime.contract.engine_config import EngineConfig
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.gateway import DirectoryEntry
from troupe_runtime.contract.run_events import CANCEL_TYPE, ApprovalDecided
from troupe_runtime.contract.run_state import RunState
from troupe_runtime.contract.workflow_resources import build_workflow_resources
from troupe_runtime.nats.provision import ensure_workflow_resources


def _gate(timeout: str = "1h", on_timeout: str = "reject", **extra: Any) -> dict[str, Any]:
    return {
        "name": "gate",
        "approval": {
            "approvers": {"users": ["alice"], "groups": ["release"]},
            "message": "ship {trigger.version}?",
            "timeout": timeout,
            "onTimeout": on_timeout,
        },
        **extra,
    }


def _name(config: EngineConfig, run: str) -> str:
    return approvals.approval_name(config.workflow, run, "gate")


async def decide(
    js: JetStreamContext,
    pending: ApprovalRequest,
    verdict: Verdict = "Approve",
    by: str = "alice",
    reason: str = "looks good",
    *,
    name: str | None = None,
    subject: str | None = None,
) -> None:
    """A decision of ``pending`` as the operator relays it (``approvals.decision_event``,
    on the request's reply subject); ``name`` and ``subject`` forge one."""
    decision = ApprovalDecision(
        name=name or pending.name,
        verdict=verdict,
        decided_by=by,
        decided_at=datetime.now(UTC),
        reason=reason,
    )
    event = approvals.decision_event(pending, decision, uuid.uuid4().hex)
    headers, payload = envelope.to_binary(event)
    await js.publish(
        subject or pending.reply_subject,
        payload,
        headers={**headers, Header.MSG_ID.value: event.id},
    )


async def request(js: JetStreamContext, config: EngineConfig, name: str) -> ApprovalRequest | None:
    kv = await js.key_value(naming.approvals_bucket(config.namespace))
    try:
        entry = await kv.get(naming.approval_key(name))
    except KeyNotFoundError:
        return None
    return ApprovalRequest.model_validate_json(entry.value or b"")


async def projection(js: JetStreamContext, config: EngineConfig, run: str) -> RunState | None:
    kv = await js.key_value(config.runs_bucket)
    try:
        entry = await kv.get(run)
    except KeyNotFoundError:
        return None
    return RunState.model_validate_json(entry.value or b"")


async def waits(js: JetStreamContext, config: EngineConfig, run: str) -> ApprovalRequest:
    """Wait until the run waits for approval and its request is Pending in the bucket."""
    found: dict[str, ApprovalRequest] = {}

    async def waiting() -> bool:
        state = await projection(js, config, run)
        filed = await request(js, config, _name(config, run))
        if filed is not None:
            found["request"] = filed
        return bool(
            state and state.status == "WaitingForApproval" and filed and filed.phase == "Pending"
        )

    await eventually(waiting, f"run {run} to wait for approval")
    return found["request"]


async def drained(js: JetStreamContext, config: EngineConfig) -> None:
    async def done() -> bool:
        info = await js.consumer_info(config.stream, naming.REPLIES_CONSUMER)
        return bool(info.num_pending == 0 and info.num_ack_pending == 0)

    await eventually(done, "every decision to be acked")


def _decisions(events: list[Any]) -> list[ApprovalDecided]:
    return [e for e in events if isinstance(e, ApprovalDecided)]


async def _deploy(ctx: Context) -> Any:
    return {"deployed": ctx.event.data}


async def _cli(capsys: pytest.CaptureFixture[str], nats_url: str, ns: str, *args: str) -> str:
    """What ``troupe`` prints for ``args``."""
    capsys.readouterr()
    assert await amain(["--nats-url", nats_url, "-n", ns, *args]) == 0
    return capsys.readouterr().out


async def test_an_approved_run_goes_on_with_who_approved_it(
    nats_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = new_namespace()
    steps = [
        _gate(),
        {"name": "deploy", "dependsOn": ["gate"], "input": {"by": "steps.gate.output.decidedBy"}},
    ]
    config = engine_config(nats_url, ns, steps)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    async with agents(nats_url, ns, {"deploy": _deploy}), engine(config):
        run = uuid.uuid4().hex
        await trigger(js, config, {"version": "1.2"}, run)
        pending = await waits(js, config, run)
        assert pending.message == "ship 1.2?"
        assert pending.reply_subject == config.subject("approve", run)
        assert pending.approvers.users == ["alice"]
        assert pending.approvers.groups == ["release"]
        assert pending.requester.step == "gate"
        assert pending.requester.run_id == run
        listed = await _cli(capsys, nats_url, ns, "runs", "list", "wf")
        assert "WaitingForApproval" in listed
        assert pending.name in listed
        shown = await _cli(capsys, nats_url, ns, "runs", "show", "wf", run)
        assert f"approval:  {pending.name} (step gate" in shown
        assert "asks:      ship 1.2?" in shown
        await decide(js, pending)
        outcome = await result(js, config, run)
        decided = await request(js, config, pending.name)
        events = await run_events(js, config, run)
    await nc.close()
    assert outcome["status"] == "Succeeded"
    assert outcome["output"] == {"deployed": {"by": "alice"}}
    assert decided is not None
    assert (decided.phase, decided.approved, decided.decided_by) == ("Approved", True, "alice")
    [decision] = _decisions(events)
    assert (decision.decided_by, decision.reason, decision.phase) == (
        "alice",
        "looks good",
        "Approved",
    )


async def test_a_denied_run_fails_naming_who_denied_it_and_why(nats_url: str) -> None:
    ns = new_namespace()
    config = engine_config(nats_url, ns, [_gate(), {"name": "deploy", "dependsOn": ["gate"]}])
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    deployed: list[Any] = []

    async def deploy(ctx: Context) -> Any:
        deployed.append(ctx.event.data)
        return None

    async with agents(nats_url, ns, {"deploy": deploy}), engine(config):
        run = uuid.uuid4().hex
        await trigger(js, config, {"version": "2"}, run)
        pending = await waits(js, config, run)
        await decide(js, pending, "Deny", by="bob", reason="not on a Friday")
        outcome = await result(js, config, run)
        decided = await request(js, config, pending.name)
        kinds = [e.kind for e in await run_events(js, config, run)]
    await nc.close()
    assert outcome["status"] == "Failed"
    assert outcome["error"] == (
        f"step gate failed: approval {pending.name} denied by bob: not on a Friday"
    )
    assert decided is not None
    assert (decided.phase, decided.decided_by) == ("Denied", "bob")
    assert deployed == []
    assert kinds == ["RunStarted", "ApprovalRequested", "ApprovalDecided", "RunFinished"]


@pytest.mark.parametrize(("on_timeout", "status"), [("reject", "Failed"), ("approve", "Succeeded")])
async def test_a_timeout_resolves_the_approval_per_on_timeout(
    nats_url: str, on_timeout: str, status: str
) -> None:
    ns = new_namespace()
    config = engine_config(nats_url, ns, [_gate(timeout="2s", on_timeout=on_timeout)])
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    async with engine(config):
        run = uuid.uuid4().hex
        await trigger(js, config, {"version": "3"}, run)
        pending = await waits(js, config, run)
        outcome = await result(js, config, run)
        decided = await request(js, config, pending.name)
        events = await run_events(js, config, run)
    await nc.close()
    assert outcome["status"] == status
    assert decided is not None
    assert (decided.phase, decided.decided_by) == ("TimedOut", approvals.TIMEOUT_DECIDER)
    assert decided.approved is (on_timeout == "approve")
    [decision] = _decisions(events)
    assert decision.decided_by == approvals.TIMEOUT_DECIDER
    assert decision.reason == "no decision within 2s"
    if on_timeout == "approve":
        assert outcome["output"]["decidedBy"] == approvals.TIMEOUT_DECIDER
    else:
        assert "timed out: no decision within 2s (onTimeout: reject)" in outcome["error"]


async def test_the_run_deadline_withdraws_a_pending_approval(nats_url: str) -> None:
    ns = new_namespace()
    config = engine_config(nats_url, ns, [_gate(timeout="1h")], deadline="2s")
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    async with engine(config):
        run = uuid.uuid4().hex
        await trigger(js, config, {"version": "4"}, run)
        pending = await waits(js, config, run)
        outcome = await result(js, config, run)
        gone = await request(js, config, pending.name)
        events = await run_events(js, config, run)
    await nc.close()
    assert outcome == {"status": "Failed", "output": None, "error": "deadline of 0:00:02 exceeded"}
    assert gone is not None
    assert (gone.phase, gone.decided_by) == ("Withdrawn", approvals.WITHDRAWN_DECIDER)
    assert _decisions(events) == []


async def test_a_cancelled_run_withdraws_its_pending_approval_and_ignores_a_late_decision(
    nats_url: str,
) -> None:
    ns = new_namespace()
    config = engine_config(nats_url, ns, [_gate()])
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    async with engine(config):
        run = uuid.uuid4().hex
        await trigger(js, config, {"version": "4"}, run)
        pending = await waits(js, config, run)
        cancel = CloudEvent(id=uuid.uuid4().hex, source="/t", type=CANCEL_TYPE, data=None)
        headers, payload = envelope.to_binary(cancel)
        await js.publish(config.subject("cancel", run), payload, headers=headers)
        outcome = await result(js, config, run)
        await decide(js, pending)  # too late: the run is over
        await drained(js, config)
        gone = await request(js, config, pending.name)
        events = await run_events(js, config, run)
    await nc.close()
    assert outcome["status"] == "Cancelled"
    assert gone is not None
    assert (gone.phase, gone.decided_by) == ("Withdrawn", approvals.WITHDRAWN_DECIDER)
    assert _decisions(events) == []


async def test_forged_or_malformed_decisions_are_dropped_and_the_run_still_waits(
    nats_url: str,
) -> None:
    ns = new_namespace()
    config = engine_config(nats_url, ns, [_gate()])
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    async with engine(config):
        run = uuid.uuid4().hex
        await trigger(js, config, {"version": "5"}, run)
        pending = await waits(js, config, run)
        subject = config.subject("approve", run)
        await js.publish(subject, b"\xff not json")
        bad_type = CloudEvent(id="x1", source="/t", type="troupe.other", data={"name": "x"})
        headers, payload = envelope.to_binary(bad_type)
        await js.publish(subject, payload, headers=headers)
        not_a_decision = CloudEvent(
            id="x2", source="/t", type=approvals.DECISION_TYPE, data={"verdict": "Maybe"}
        )
        headers, payload = envelope.to_binary(not_a_decision)
        await js.publish(subject, payload, headers=headers)
        await decide(js, pending, name="wf-0123456789abcdef")  # a request nobody filed
        await decide(js, pending, by="troupe:timeout")  # a reserved decider
        await decide(js, pending, subject=config.subject("approve", "another-run"))
        await drained(js, config)
        state = await projection(js, config, run)
        still = await request(js, config, pending.name)
        assert state is not None
        assert state.status == "WaitingForApproval"
        assert still is not None
        assert still.phase == "Pending"
        assert _decisions(await run_events(js, config, run)) == []
        await decide(js, pending, reason="first")
        await decide(js, pending, "Deny", reason="second")  # twice is once
        outcome = await result(js, config, run)
        await drained(js, config)
        events = await run_events(js, config, run)
    await nc.close()
    assert outcome["status"] == "Succeeded"
    [decision] = _decisions(events)
    assert (decision.approved, decision.reason) == (True, "first")


async def test_an_engine_killed_while_the_run_waits_resumes_it_on_the_decision(
    nats_url: str, tmp_path: Path
) -> None:
    ns = new_namespace()
    config = engine_config(
        nats_url, ns, [_gate(), {"name": "deploy", "dependsOn": ["gate"]}], healthPort=free_port()
    )
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_workflow_resources(js, build_workflow_resources(config))
    async with agents(nats_url, ns, {"deploy": _deploy}):
        run = uuid.uuid4().hex
        with engine_process(config, tmp_path) as first:
            await eventually(partial(engine_answers, config, first), "the first engine")
            await trigger(js, config, {"version": "6"}, run)
            pending = await waits(js, config, run)
            first.send_signal(signal.SIGKILL)
            first.wait()
        # As if the engine had died between logging the request and filing it.
        kv = await js.key_value(naming.approvals_bucket(ns))
        await kv.purge(naming.approval_key(pending.name))
        assert await request(js, config, pending.name) is None
        with engine_process(config, tmp_path) as second:
            await eventually(partial(engine_answers, config, second), "the second engine")
            refiled = await waits(js, config, run)
            assert refiled == pending  # filed again from the log, as it was
            await decide(js, pending, by="carol")
            outcome = await result(js, config, run)
            decided = await request(js, config, pending.name)
        events = await run_events(js, config, run)
    await nc.close()
    assert outcome["status"] == "Succeeded"
    assert decided is not None
    assert (decided.phase, decided.decided_by) == ("Approved", "carol")
    assert [e.kind for e in events].count("ApprovalRequested") == 1
    [decision] = _decisions(events)
    assert decision.decided_by == "carol"


async def test_a_gateway_caller_sees_input_required_until_the_decision(nats_url: str) -> None:
    ns = new_namespace()
    config = engine_config(nats_url, ns, [_gate()])
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    entry = DirectoryEntry(
        kind="Workflow", namespace=ns, name=config.workflow, subject=config.subject("start", "*")
    )
    calls = Calls(nc, js, 3600.0)
    async with engine(config):
        record = await calls.submit(entry, {"version": "8"}, caller="carol")
        pending = await waits(js, config, record.task_id)
        view = await calls.get(entry, record.task_id)
        assert view is not None
        assert (view.state, view.approvals) == ("input-required", (pending.name,))
        assert view.prompt == f"approval {pending.name} (step gate): ship 8?"
        await decide(js, pending)
        done = await calls.wait(entry, record.task_id, 20)
    await nc.close()
    assert done.state == "completed"
    assert done.output == {"approved": True, "decidedBy": "alice", "reason": "looks good"}


async def test_a_decision_moves_the_run_on_even_while_the_bucket_cannot_be_written(
    nats_url: str,
) -> None:
    ns = new_namespace()
    config = engine_config(nats_url, ns, [_gate(), {"name": "deploy", "dependsOn": ["gate"]}])
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    async with agents(nats_url, ns, {"deploy": _deploy}), engine(config):
        run = uuid.uuid4().hex
        await trigger(js, config, {"version": "9"}, run)
        pending = await waits(js, config, run)
        await js.delete_key_value(naming.approvals_bucket(ns))
        await decide(js, pending, by="dave")
        outcome = await result(js, config, run)
        events = await run_events(js, config, run)
    await nc.close()
    assert outcome["status"] == "Succeeded"
    assert outcome["output"] == {
        "deployed": {"approved": True, "decidedBy": "dave", "reason": "looks good"}
    }
    assert [d.decided_by for d in _decisions(events)] == ["dave"]
