"""Tool-call approvals on the real runtime, a real nats-server, the scripted model and a real
MCP server (the SDK's MCPServer over streamable HTTP) exposing ``erase`` (destructiveHint)
and ``peek`` (readOnlyHint): a destructive call parks its message (the request in the
approvals bucket, the message acknowledged, the tool not run), the decision the operator
would relay resumes it, a denial reaches the model, forged decisions change nothing, a
timeout decides by onTimeout, and a runtime killed while parked resumes after a restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext
from nats.js.api import Header
from nats.js.errors import KeyNotFoundError, NotFoundError
from troupe_gateway.calls import Calls, TaskView

from tests.integration.llm_harness import llm_config, running_llm
from tests.integration.runtime_harness import eventually, provisioned, sample, send
from tests.support.mcp_servers import McpTestServer, mcp_server
from troupe_devcluster.layout import free_port
from troupe_devcluster.scripted_llm import ScriptedLlm, ScriptedToolCall, Text, ToolCalls
from troupe_runtime.agent.runtime import Runtime
from troupe_runtime.contract import envelope, naming, pod
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.approvals import (
    DECISION_TYPE,
    REQUEST_TYPE,
    TIMEOUT_DECIDER,
    ApprovalDecision,
    ApprovalRequest,
    decision_event,
    decision_message_id,
    reply_subject_for,
)
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.gateway import DirectoryEntry
from troupe_runtime.nats.event_log import EventLog

__all__ = ["mcp_server"]

REPOSITORY = Path(__file__).resolve().parents[2]
DESTRUCTIVE = {"approval": "destructive", "approvers": {"users": ["alice", "bob"]}}


def approval_config(
    nats_url: str, llm: ScriptedLlm, server: McpTestServer, **rule: Any
) -> RuntimeConfig:
    mcp = {"name": "files", "url": server.url, "timeout": "5s", "allow": ["erase", "peek"]}
    return llm_config(
        nats_url,
        llm.base_url,
        tools={"mcp": [mcp]},
        approvals={"default": {**DESTRUCTIVE, **rule}},
    )


def erase(path: str, call_id: str = "e1") -> ScriptedToolCall:
    return ScriptedToolCall("erase", json.dumps({"path": path}), call_id)


def peek(path: str, call_id: str = "p1") -> ScriptedToolCall:
    return ScriptedToolCall("peek", json.dumps({"path": path}), call_id)


async def ask(js: JetStreamContext, config: RuntimeConfig) -> tuple[CloudEvent, str]:
    """Send a message whose answer goes to a gateway reply subject (stored, readable)."""
    replyto = naming.gateway_reply_subject(config.namespace, uuid.uuid4().hex)
    return await send(js, config, "tidy up", replyto=replyto), replyto


async def requests(js: JetStreamContext, config: RuntimeConfig) -> list[ApprovalRequest]:
    """Every request in the namespace's approvals bucket now."""
    try:
        kv = await js.key_value(naming.approvals_bucket(config.namespace))
    except NotFoundError:
        return []
    try:
        keys = await kv.keys()
    except Exception:  # no keys yet
        return []
    found = []
    for key in keys:
        try:
            found.append(ApprovalRequest.model_validate_json((await kv.get(key)).value or b""))
        except KeyNotFoundError:
            continue
    return found


async def filed(js: JetStreamContext, config: RuntimeConfig) -> ApprovalRequest:
    """The one request, once it is in the bucket."""
    found: list[ApprovalRequest] = []

    async def one() -> bool:
        found[:] = await requests(js, config)
        return len(found) == 1

    await eventually(one, "the approval request in the bucket")
    return found[0]


async def settled(js: JetStreamContext, config: RuntimeConfig) -> bool:
    """Nothing pending or unacknowledged in the inbox: the message was acknowledged."""
    info = await js.consumer_info(config.inbox_stream, config.consumer_name(0))
    stream = await js.stream_info(config.inbox_stream)
    return info.num_pending == 0 and info.num_ack_pending == 0 and stream.state.messages == 0


async def replied(js: JetStreamContext, config: RuntimeConfig, replyto: str) -> Any:
    """The answer sent to ``replyto``, once there is one."""
    stream = naming.event_log_stream(config.namespace)
    answers: list[Any] = []

    async def answered() -> bool:
        try:
            msg = await js.get_last_msg(stream, replyto)
        except NotFoundError:
            return False
        reply = envelope.parse(msg.headers or {}, msg.data or b"")
        if reply.type == REQUEST_TYPE:  # the gateway caller told it waits: not the answer
            return False
        answers.append(reply.data)
        return True

    await eventually(answered, f"the answer on {replyto}")
    return answers[-1]


async def decide(
    js: JetStreamContext,
    request: ApprovalRequest,
    verdict: str,
    by: str,
    reason: str,
    uid: str = "uid-1",
    to: str | None = None,
) -> None:
    """Publish the decision as the operator relays it: to the requester's own subject
    (or ``to``, a forger's choice), with the decision's message id."""
    decision = ApprovalDecision.model_validate(
        {"name": request.name, "verdict": verdict, "decidedBy": by, "reason": reason,
         "decidedAt": "2026-12-03T12:05:00Z"}
    )  # fmt: skip
    subject = to or reply_subject_for(request.namespace, request.requester)
    assert subject == (to or request.reply_subject)
    event = decision_event(request, decision, uid)
    headers, payload = envelope.to_binary(event)
    headers[Header.MSG_ID.value] = decision_message_id(request, uid)
    await js.publish(subject, payload, headers=headers)


async def journal_types(js: JetStreamContext, config: RuntimeConfig, event_id: str) -> list[str]:
    log_id = naming.conversation_log_id(config.agent, event_id)
    return [event.id for event in await EventLog(js, config.namespace, log_id).replay()]


def tool_results(llm: ScriptedLlm, completion: int) -> dict[str, str]:
    return {
        m["tool_call_id"]: m["content"]
        for m in llm.completions[completion].messages
        if m["role"] == "tool"
    }


def ignored(runtime: Runtime) -> float:
    return sample(runtime, "troupe_messages_total", outcome="ignored")


async def test_a_destructive_call_waits_acked_for_its_approval_then_runs_once_and_answers(
    nats_url: str, scripted_llm: ScriptedLlm, mcp_server: McpTestServer
) -> None:
    config = approval_config(nats_url, scripted_llm, mcp_server, message="{tool} {arguments}?")
    scripted_llm.script(ToolCalls([erase("/tmp/x")]), Text("erased it"))
    async with (
        provisioned(config) as (_, js),
        running_llm(config, declared_tools=True) as (runtime, _),
    ):
        event, replyto = await ask(js, config)
        request = await filed(js, config)
        await eventually(lambda: settled(js, config), "the parked message to be acknowledged")
        assert request.phase == "Pending"
        assert (request.requester.kind, request.requester.name) == ("Agent", config.agent)
        assert (request.requester.run_id, request.requester.tool) == (event.id, "erase")
        assert request.approvers.users == ["alice", "bob"]
        assert request.message == 'erase {"path": "/tmp/x"}?'
        assert request.reply_subject == naming.agent_approvals_subject(
            config.namespace, config.agent
        )
        assert mcp_server.calls("erase") == []
        assert len(scripted_llm.completions) == 1

        await decide(js, request, "Approve", "alice", "looks fine")
        answer = await replied(js, config, replyto)
        assert answer["content"] == "erased it"
        assert mcp_server.calls("erase") == ["/tmp/x"]
        assert tool_results(scripted_llm, 1) == {"e1": "erased /tmp/x"}
        [final] = await requests(js, config)
        assert (final.phase, final.approved, final.decided_by, final.reason) == (
            "Approved", True, "alice", "looks fine"
        )  # fmt: skip
        ids = await journal_types(js, config, event.id)
        assert ids[:3] == ["turn-0", "parked-0-e1", "decided-0-e1"]

        # The same decision relayed again (another message id) is taken once.
        before = ignored(runtime)
        await decide(js, request, "Approve", "alice", "looks fine", uid="uid-2")
        await eventually(lambda: ignored(runtime) == before + 1, "the repeat to be ignored")
        await eventually(lambda: settled(js, config), "the repeat to be acknowledged")
    assert mcp_server.calls("erase") == ["/tmp/x"]
    assert len(scripted_llm.completions) == 2


async def test_a_denial_never_runs_the_tool_and_the_model_reads_who_denied_it_and_why(
    nats_url: str, scripted_llm: ScriptedLlm, mcp_server: McpTestServer
) -> None:
    config = approval_config(nats_url, scripted_llm, mcp_server)
    scripted_llm.script(ToolCalls([peek("/etc/motd"), erase("/etc")]), Text("left it alone"))
    async with (
        provisioned(config) as (_, js),
        running_llm(config, declared_tools=True) as (runtime, _),
    ):
        _, replyto = await ask(js, config)
        request = await filed(js, config)
        # The read-only tool ran at once, with no approval; only erase waits.
        assert mcp_server.calls("peek") == ["/etc/motd"]
        assert request.requester.tool == "erase"
        await eventually(lambda: settled(js, config), "the parked message to be acknowledged")

        await decide(js, request, "Deny", "bob", "not /etc")
        answer = await replied(js, config, replyto)
    assert answer["content"] == "left it alone"
    assert mcp_server.calls("erase") == []
    assert mcp_server.calls("peek") == ["/etc/motd"]  # not run again on resuming
    results = tool_results(scripted_llm, 1)
    assert results["p1"] == "contents of /etc/motd"
    assert results["e1"] == "error: bob denied this call of 'erase', so it did not run: not /etc."
    assert ignored(runtime) == 0


async def test_cost_above_runs_a_cheap_call_unasked_and_parks_a_costly_one(
    nats_url: str, scripted_llm: ScriptedLlm, mcp_server: McpTestServer
) -> None:
    """The cost is the rule's expression over the call's arguments (here the path's length,
    the only number erase's arguments give): within the threshold the call runs at once;
    above it, it waits for a decision like any guarded call."""
    config = approval_config(
        nats_url, scripted_llm, mcp_server, approval="costAbove", cost="length(path)", threshold=6
    )
    scripted_llm.script(
        ToolCalls([erase("/tmp/x")]), ToolCalls([erase("/var/lib/data", "e2")]), Text("done")
    )
    async with (
        provisioned(config) as (_, js),
        running_llm(config, declared_tools=True) as (_, _),
    ):
        _, replyto = await ask(js, config)
        request = await filed(js, config)
        await eventually(lambda: settled(js, config), "the parked message to be acknowledged")
        assert request.requester.tool == "erase"
        assert "/var/lib/data" in request.message
        assert mcp_server.calls("erase") == ["/tmp/x"]  # length 6: not above 6, so not asked

        await decide(js, request, "Approve", "bob", "fine")
        answer = await replied(js, config, replyto)
        assert len(await requests(js, config)) == 1  # the cheap call filed nothing
    assert answer["content"] == "done"
    assert mcp_server.calls("erase") == ["/tmp/x", "/var/lib/data"]


async def test_forged_and_malformed_decisions_change_nothing(
    nats_url: str, scripted_llm: ScriptedLlm, mcp_server: McpTestServer
) -> None:
    config = approval_config(nats_url, scripted_llm, mcp_server)
    scripted_llm.script(ToolCalls([erase("/")]), Text("done"))
    async with (
        provisioned(config) as (_, js),
        running_llm(config, declared_tools=True) as (runtime, _),
    ):
        event, replyto = await ask(js, config)
        request = await filed(js, config)
        subject = request.reply_subject

        def forged(data: Any, type: str = DECISION_TYPE) -> tuple[dict[str, str], bytes]:
            fake = CloudEvent(id=uuid.uuid4().hex, source="/forger", type=type, data=data)
            return envelope.to_binary(fake)

        valid = {"name": request.name, "verdict": "Approve", "decidedBy": "mallory",
                 "decidedAt": "2026-12-03T12:05:00Z"}  # fmt: skip
        attempts = [
            ({}, b"\xff not a cloudevent"),
            forged(valid, type="troupe.something.else"),
            forged({**valid, "verdict": "Maybe"}),
            forged({**valid, "name": "agent-0000000000000000"}),  # no such request
            forged({**valid, "decidedBy": TIMEOUT_DECIDER}),  # a timeout before the expiry
            forged({**valid, "decidedBy": "troupe:withdrawn"}),
        ]
        for headers, payload in attempts:
            await js.publish(subject, payload, headers=headers)
        await eventually(lambda: ignored(runtime) == len(attempts), "every forgery ignored")
        await eventually(lambda: settled(js, config), "the forgeries to be acknowledged")
        [still] = await requests(js, config)
        assert still.phase == "Pending"
        assert mcp_server.calls("erase") == []
        assert len(scripted_llm.completions) == 1
        assert "decided-0-e1" not in await journal_types(js, config, event.id)

        # A decision on someone else's request (a Workflow's, in the same bucket) is no
        # decision for this Agent.
        kv = await js.key_value(naming.approvals_bucket(config.namespace))
        other = request.model_copy(
            update={"name": "wf-0123456789abcdef", "requester": request.requester.model_copy(
                update={"kind": "Workflow", "step": "gate"})}
        )  # fmt: skip
        await kv.put(other.name, other.model_dump_json(by_alias=True).encode())
        await decide(js, other, "Approve", "alice", "", to=subject)
        await eventually(lambda: ignored(runtime) == len(attempts) + 1, "the foreign one")

        await decide(js, request, "Approve", "alice", "")
        assert (await replied(js, config, replyto))["content"] == "done"
    assert mcp_server.calls("erase") == ["/"]


@pytest.mark.parametrize("on_timeout", ["reject", "approve"])
async def test_a_request_nobody_decides_times_out_by_its_on_timeout(
    nats_url: str, scripted_llm: ScriptedLlm, mcp_server: McpTestServer, on_timeout: str
) -> None:
    config = approval_config(nats_url, scripted_llm, mcp_server, timeout="1s", onTimeout=on_timeout)
    scripted_llm.script(ToolCalls([erase("/srv")]), Text("timed out"))
    async with (
        provisioned(config) as (_, js),
        running_llm(config, declared_tools=True, approval_scan_seconds=0.2) as _,
    ):
        _, replyto = await ask(js, config)
        answer = await replied(js, config, replyto)
        [final] = await requests(js, config)
    approved = on_timeout == "approve"
    assert answer["content"] == "timed out"
    assert (final.phase, final.approved, final.decided_by) == (
        "TimedOut", approved, TIMEOUT_DECIDER
    )  # fmt: skip
    if approved:
        assert mcp_server.calls("erase") == ["/srv"]
        assert tool_results(scripted_llm, 1)["e1"] == "erased /srv"
    else:
        assert mcp_server.calls("erase") == []
        assert "within its approval timeout" in tool_results(scripted_llm, 1)["e1"]


def start_runtime(config: RuntimeConfig, workdir: Path) -> subprocess.Popen[bytes]:
    """``python -m troupe_runtime.agent`` as the container runs it."""
    config_file = workdir / "config.json"
    config_file.write_text(config.to_json())
    with (workdir / "runtime.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, *pod.AGENT_COMMAND[1:], "--config", str(config_file)],
            cwd=REPOSITORY,
            env={**os.environ, pod.POD_IP_ENV: "127.0.0.1"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def killed(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()


async def test_a_runtime_killed_while_parked_resumes_on_the_decision_after_a_restart(
    nats_url: str, scripted_llm: ScriptedLlm, mcp_server: McpTestServer, tmp_path: Path
) -> None:
    config = approval_config(nats_url, scripted_llm, mcp_server)
    config = config.model_copy(update={"health_port": free_port()})
    scripted_llm.script(ToolCalls([erase("/var/log")]), Text("erased after the restart"))
    async with provisioned(config) as (_, js):
        first = start_runtime(config, tmp_path)
        try:
            _, replyto = await ask(js, config)
            request = await filed(js, config)
            await eventually(lambda: settled(js, config), "the parked message to be acknowledged")
        finally:
            killed(first)
        await decide(js, request, "Approve", "bob", "go")  # stored while no runtime runs
        second = start_runtime(config, tmp_path)
        try:
            answer = await replied(js, config, replyto)
        finally:
            killed(second)
    assert answer["content"] == "erased after the restart"
    assert mcp_server.calls("erase") == ["/var/log"]
    assert len(scripted_llm.completions) == 2  # turn 0 was not asked again


async def test_a_gateway_caller_sees_input_required_until_the_decision(
    nats_url: str, scripted_llm: ScriptedLlm, mcp_server: McpTestServer
) -> None:
    config = approval_config(nats_url, scripted_llm, mcp_server, message="erase {arguments}?")
    scripted_llm.script(ToolCalls([erase("/opt")]), Text("erased through the gateway"))
    entry = DirectoryEntry(
        kind="Agent",
        namespace=config.namespace,
        name=config.agent,
        subject=config.inbox_subject(0),
    )
    async with (
        provisioned(config) as (nc, js),
        running_llm(config, declared_tools=True),
    ):
        calls = Calls(nc, js, 3600.0)
        record = await calls.submit(entry, "tidy up /opt", caller="carol")
        request = await filed(js, config)
        views: list[TaskView] = []

        async def asked() -> bool:
            views.append(await calls.get(entry, record.task_id))  # type: ignore[arg-type]
            return views[-1].state == "input-required"

        await eventually(asked, "the task to be input-required")
        waits = views[-1]
        assert waits.approvals == (request.name,)
        assert waits.prompt == f'approval {request.name} (tool erase): erase {{"path": "/opt"}}?'
        assert not waits.terminal
        await decide(js, request, "Approve", "alice", "")
        done = await calls.wait(entry, record.task_id, 20)
    assert done.state == "completed"
    assert done.output["content"] == "erased through the gateway"
    assert mcp_server.calls("erase") == ["/opt"]


async def test_a_message_too_large_to_park_refuses_the_call_and_the_model_goes_on(
    nats_url: str, scripted_llm: ScriptedLlm, mcp_server: McpTestServer
) -> None:
    config = approval_config(nats_url, scripted_llm, mcp_server)
    scripted_llm.script(ToolCalls([erase("/big")]), Text("could not wait"))
    async with (
        provisioned(config) as (nc, js),
        running_llm(config, declared_tools=True) as _,
    ):
        # Its turn fits the journal; the parked record (the message itself, in base64) not.
        size = nc.max_payload * 3 // 4 + 4096
        replyto = naming.gateway_reply_subject(config.namespace, uuid.uuid4().hex)
        await send(js, config, "x" * size, replyto=replyto)
        answer = await replied(js, config, replyto)
        assert await requests(js, config) == []
    assert answer["content"] == "could not wait"
    assert mcp_server.calls("erase") == []
    assert "too large to wait for one" in tool_results(scripted_llm, 1)["e1"]
