"""The ``troupe`` CLI on a real nats-server, against real agents and a real workflow engine."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.js import JetStreamContext

from tests.integration.runtime_harness import DEADLINE, eventually, stored, stream_count
from tests.integration.workflow_harness import (
    agent_config,
    agents,
    engine,
    engine_config,
    new_namespace,
)
from troupe_cli.main import amain
from troupe_runtime.agent.context import Context, HandlerFn
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.agent_resources import build_agent_resources
from troupe_runtime.contract.dead_letters import DeadLetterReason, Origin, dead_letter_headers
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.nats.provision import ensure_agent_resources

Output = tuple[int, str, str]


async def troupe(capsys: pytest.CaptureFixture[str], nats_url: str, ns: str, *args: str) -> Output:
    """Run the CLI in this event loop; return its exit code, stdout and stderr."""
    code = await amain(["--nats-url", nats_url, "-n", ns, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def appender(name: str) -> HandlerFn:
    async def handle(ctx: Context) -> Any:
        return [*(ctx.event.data or []), name]

    return handle


async def broken(ctx: Context) -> Any:
    raise RuntimeError("the disk is full")


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(nats_url)
    yield nc.jetstream()
    await nc.close()


async def provision(js: JetStreamContext, ns: str, agent: str, **fields: Any) -> None:
    """An agent's streams, consumers and buckets, with no runtime consuming its inbox."""
    config = agent_config("nats://unused", ns, agent, **fields)
    await ensure_agent_resources(js, build_agent_resources(config))


async def dead_letter(js: JetStreamContext, ns: str, agent: str, data: Any, sequence: int) -> str:
    """Store a dead letter as the runtime does; return its original event id."""
    event = CloudEvent(id=uuid.uuid4().hex, source="/tests", type="test.input", data=data)
    headers, payload = envelope.to_binary(event)
    origin = Origin(
        subject=naming.inbox_subject(ns, agent, 0),
        stream=naming.inbox_stream(ns, agent),
        sequence=sequence,
    )
    await js.publish(
        naming.dead_letter_subject(ns, agent),
        payload,
        headers=dead_letter_headers(
            headers,
            reason=DeadLetterReason.EXHAUSTED,
            error="the disk is full",
            attempts=3,
            agent=f"{ns}/{agent}",
            origin=origin,
        ),
    )
    return event.id


async def test_run_wait_prints_the_output_of_the_run(
    nats_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = new_namespace()
    config = engine_config(nats_url, ns, [{"name": "a"}, {"name": "b", "dependsOn": ["a"]}])
    async with agents(nats_url, ns, {"a": appender("a"), "b": appender("b")}), engine(config):
        code, out, _ = await troupe(
            capsys, nats_url, ns, "run", "wf", "--input", '["go"]', "--id", "r1", "--wait"
        )

    assert code == 0
    assert out.splitlines()[0] == "run r1: Succeeded"
    assert json.loads("\n".join(out.splitlines()[1:])) == ["go", "a", "b"]


async def test_run_wait_exits_1_with_the_error_when_the_run_fails(
    nats_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = new_namespace()
    config = engine_config(nats_url, ns, [{"name": "a"}])
    async with agents(nats_url, ns, {"a": broken}), engine(config):
        code, out, _ = await troupe(capsys, nats_url, ns, "-o", "json", "run", "wf", "--wait")

    assert code == 1
    result = json.loads(out)
    assert result["status"] == "Failed"
    assert "the disk is full" in result["error"]


async def test_runs_list_and_show_give_the_run_and_its_step_timeline(
    nats_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = new_namespace()
    config = engine_config(nats_url, ns, [{"name": "a"}, {"name": "b", "dependsOn": ["a"]}])
    async with agents(nats_url, ns, {"a": appender("a"), "b": appender("b")}), engine(config):
        assert (await troupe(capsys, nats_url, ns, "run", "wf", "--id", "r1", "--wait"))[0] == 0
        listed = await troupe(capsys, nats_url, ns, "runs", "list", "wf")
        shown = await troupe(capsys, nats_url, ns, "runs", "show", "wf", "r1", "-o", "json")

    code, out, _ = listed
    assert code == 0
    assert out.splitlines()[0].split() == ["RUN", "STATUS", "STARTED", "FINISHED", "DURATION"]
    assert out.splitlines()[1].split()[:2] == ["r1", "Succeeded"]
    code, out, _ = shown
    assert code == 0
    run = json.loads(out)
    assert (run["status"], run["output"]) == ("Succeeded", ["a", "b"])
    assert [(s["step"], s["attempt"], s["status"]) for s in run["steps"]] == [
        ("a", 1, "Succeeded"),
        ("b", 1, "Succeeded"),
    ]
    assert all(s["durationSeconds"] >= 0 for s in run["steps"])
    assert run["steps"][0]["finished"] <= run["steps"][1]["dispatched"]


async def test_send_puts_a_cloudevent_in_the_agents_inbox(
    nats_url: str, js: JetStreamContext, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = new_namespace()
    await provision(js, ns, "echo", messaging={"priorityLevels": 2})

    code, out, _ = await troupe(
        capsys, nats_url, ns, "-o", "json", "send", "echo", "--data", '{"x": 1}', "--priority", "1"
    )

    assert code == 0
    sent = json.loads(out)
    msg = await js.get_msg(naming.inbox_stream(ns, "echo"), sent["sequence"])
    event = envelope.parse(msg.headers, msg.data or b"")
    assert msg.subject == naming.inbox_subject(ns, "echo", 1)
    assert (event.id, event.type, event.priority, event.data) == (
        sent["id"],
        "troupe.cli.message",
        1,
        {"x": 1},
    )


async def test_send_with_a_session_sets_the_sessionid_and_refuses_a_bad_one(
    nats_url: str, js: JetStreamContext, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = new_namespace()
    await provision(js, ns, "echo")

    code, out, _ = await troupe(
        capsys, nats_url, ns, "-o", "json", "send", "echo", "--session", "conv-1"
    )
    refused, _, err = await troupe(capsys, nats_url, ns, "send", "echo", "--session", "a b")

    assert code == 0
    msg = await js.get_msg(naming.inbox_stream(ns, "echo"), json.loads(out)["sequence"])
    assert envelope.parse(msg.headers, msg.data or b"").sessionid == "conv-1"
    assert refused == 1
    assert "session 'a b' is not valid" in err


async def test_send_to_an_agent_without_an_inbox_names_the_stream(
    nats_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = new_namespace()

    code, _, err = await troupe(capsys, nats_url, ns, "send", "ghost")

    assert code == 1
    assert f"agent ghost has no inbox stream TROUPE_{ns}_ghost" in err


async def test_dlq_list_and_show_give_the_reason_and_the_original_message(
    nats_url: str, js: JetStreamContext, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = new_namespace()
    await provision(js, ns, "worker")
    event_id = await dead_letter(js, ns, "worker", {"order": 7}, sequence=12)

    code, out, _ = await troupe(capsys, nats_url, ns, "dlq", "list", "worker")
    assert code == 0
    row = out.splitlines()[1].split()
    assert (row[0], row[3], row[4], row[5]) == (
        "1",
        "exhausted",
        "3",
        naming.inbox_subject(ns, "worker", 0),
    )

    code, out, _ = await troupe(capsys, nats_url, ns, "-o", "json", "dlq", "show", "worker", "1")
    assert code == 0
    letter = json.loads(out)
    assert (letter["eventId"], letter["data"], letter["error"]) == (
        event_id,
        {"order": 7},
        "the disk is full",
    )
    assert letter["headers"]["Troupe-Original-Sequence"] == "12"


async def test_dlq_replay_republishes_to_the_original_subject_and_removes_the_letter(
    nats_url: str, js: JetStreamContext, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = new_namespace()
    await provision(js, ns, "worker")
    replayed_id = await dead_letter(js, ns, "worker", {"order": 1}, sequence=1)
    kept_id = await dead_letter(js, ns, "worker", {"order": 2}, sequence=2)

    code, out, _ = await troupe(capsys, nats_url, ns, "dlq", "replay", "worker", "1")

    assert code == 0
    assert out.strip() == f"replayed 1 to {naming.inbox_subject(ns, 'worker', 0)}"
    (inbox,) = await stored(js, naming.inbox_stream(ns, "worker"))
    event = envelope.parse(inbox.headers, inbox.data or b"")
    assert (inbox.subject, event.id, event.data) == (
        naming.inbox_subject(ns, "worker", 0),
        replayed_id,
        {"order": 1},
    )
    assert not any(key.startswith("Troupe-") for key in inbox.headers or {})
    (left,) = await stored(js, naming.dead_letter_stream(ns, "worker"))
    assert (left.headers or {})["ce-id"] == kept_id


async def test_dlq_replay_all_then_purge_leave_the_stream_empty(
    nats_url: str, js: JetStreamContext, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = new_namespace()
    await provision(js, ns, "worker")
    for sequence in (1, 2):
        await dead_letter(js, ns, "worker", {"order": sequence}, sequence)

    code, out, _ = await troupe(
        capsys, nats_url, ns, "-o", "json", "dlq", "replay", "worker", "--all"
    )
    assert code == 0
    assert [r["sequence"] for r in json.loads(out)["replayed"]] == [1, 2]
    assert await stream_count(js, naming.inbox_stream(ns, "worker")) == 2

    await dead_letter(js, ns, "worker", {"order": 3}, sequence=3)
    code, out, _ = await troupe(capsys, nats_url, ns, "dlq", "purge", "worker")
    assert code == 0
    assert out.strip() == "purged 1 dead letters of agent worker"
    assert await stream_count(js, naming.dead_letter_stream(ns, "worker")) == 0


async def test_state_put_then_get_returns_the_value_and_its_revision(
    nats_url: str, js: JetStreamContext, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = new_namespace()
    await provision(js, ns, "clerk", state=[{"name": "orders"}])

    put = await troupe(capsys, nats_url, ns, "state", "put", "orders", "o.1", '{"qty": 2}')
    got = await troupe(capsys, nats_url, ns, "-o", "json", "state", "get", "orders", "o.1")
    missing = await troupe(capsys, nats_url, ns, "state", "get", "orders", "o.2")

    assert put[0] == 0
    assert put[1].strip() == "put orders/o.1 at revision 1"
    assert (got[0], json.loads(got[1])) == (
        0,
        {"bucket": "orders", "key": "o.1", "revision": 1, "value": {"qty": 2}},
    )
    assert missing[0] == 1
    assert "state bucket orders has no key 'o.2'" in missing[2]


async def test_state_watch_prints_the_current_value_then_each_change(
    nats_url: str, js: JetStreamContext, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = new_namespace()
    await provision(js, ns, "clerk", state=[{"name": "orders"}])
    kv = await js.key_value(naming.kv_bucket(ns, "orders"))
    await kv.put("o.1", b'{"qty": 1}')
    await kv.put("other", b"0")
    watch = ["--nats-url", nats_url, "-n", ns, "-o", "json", "state", "watch", "orders", "o.*"]
    watching = asyncio.create_task(amain([*watch, "--count", "2"]))
    printed: list[str] = []

    def printed_lines() -> int:
        printed.extend(capsys.readouterr().out.splitlines())
        return len(printed)

    # The current value is printed once the watch is subscribed; only then change it.
    await eventually(printed_lines, "the watch to print the current value")
    await kv.put("o.1", b'{"qty": 5}')
    code = await asyncio.wait_for(watching, DEADLINE)
    printed_lines()

    assert code == 0
    assert [(c["key"], c["value"], c["revision"]) for c in map(json.loads, printed)] == [
        ("o.1", {"qty": 1}, 1),
        ("o.1", {"qty": 5}, 3),
    ]


async def test_top_once_reports_each_agents_lag_and_dead_letters(
    nats_url: str, js: JetStreamContext, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = new_namespace()
    await provision(js, ns, "idle")
    await provision(js, ns, "busy")
    for _ in range(3):
        assert (await troupe(capsys, nats_url, ns, "send", "busy"))[0] == 0
    for sequence in (1, 2):
        await dead_letter(js, ns, "busy", None, sequence)

    code, out, _ = await troupe(
        capsys, nats_url, ns, "-o", "json", "top", "--once", "--interval", "0.1"
    )

    assert code == 0
    loads = {load["agent"]: load for load in json.loads(out)}
    assert loads == {
        "busy": {
            "agent": "busy",
            "throughput": 0.0,
            "lag": 3,
            "ackPending": 0,
            "redelivered": 0,
            "deadLetters": 2,
        },
        "idle": {
            "agent": "idle",
            "throughput": 0.0,
            "lag": 0,
            "ackPending": 0,
            "redelivered": 0,
            "deadLetters": 0,
        },
    }


async def test_the_installed_command_explains_a_workflow_without_an_engine(nats_url: str) -> None:
    ns = new_namespace()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "troupe_cli",
        "--nats-url",
        nats_url,
        "-n",
        ns,
        "run",
        "research",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), DEADLINE)

    assert process.returncode == 1
    assert err.decode().strip() == (
        f"error: workflow research has no stream TROUPE_WF_{ns}_research in namespace {ns}: "
        "is its engine running?"
    )


async def forged_letter(
    js: JetStreamContext, ns: str, agent: str, data: bytes, headers: dict[str, str]
) -> None:
    """A letter anyone allowed to publish on the dead-letter subject could store."""
    await js.publish(naming.dead_letter_subject(ns, agent), data, headers=headers)


async def test_dlq_replay_of_a_forged_letter_publishes_only_to_the_agents_own_inbox(
    nats_url: str, js: JetStreamContext, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = new_namespace()
    await provision(js, ns, "worker")
    await provision(js, ns, "victim")
    victim = naming.inbox_stream(ns, "victim")
    await js.publish(naming.inbox_subject(ns, "victim", 0), b"keep me")
    for target in (
        f"$JS.API.STREAM.PURGE.{victim}",
        naming.inbox_subject(ns, "victim", 0),
        naming.inbox_subject(f"{ns}x", "worker", 0),
        naming.inbox_subject(ns, "worker", 5),
    ):
        await forged_letter(
            js, ns, "worker", b'{"forged":true}', {"Troupe-Original-Subject": target}
        )

    code, out, err = await troupe(
        capsys, nats_url, ns, "-o", "json", "dlq", "replay", "worker", "--all"
    )

    assert code == 1
    assert json.loads(out) == {"replayed": [], "failed": [1, 2, 3, 4]}
    assert err.count("is not one of the agent's inbox subjects") == 4
    assert await stream_count(js, victim) == 1
    assert await stream_count(js, naming.inbox_stream(ns, "worker")) == 0
    assert await stream_count(js, naming.dead_letter_stream(ns, "worker")) == 4


async def test_dlq_replay_of_a_forged_letter_naming_the_own_inbox_goes_there(
    nats_url: str, js: JetStreamContext, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = new_namespace()
    await provision(js, ns, "worker", messaging={"priorityLevels": 2})
    own = naming.inbox_subject(ns, "worker", 1)
    await forged_letter(js, ns, "worker", b"{}", {"Troupe-Original-Subject": own})

    code, out, _ = await troupe(capsys, nats_url, ns, "dlq", "replay", "worker", "1")

    assert code == 0
    assert out.strip() == f"replayed 1 to {own}"
    (replayed,) = await stored(js, naming.inbox_stream(ns, "worker"))
    assert replayed.subject == own


async def test_every_dlq_command_survives_a_hostile_letter(
    nats_url: str, js: JetStreamContext, capsys: pytest.CaptureFixture[str]
) -> None:
    """Deep JSON, a lone surrogate, control characters, undecodable header bytes, a
    non-ASCII attempts count: listed, shown and refused for replay, never a traceback."""
    ns = new_namespace()
    await provision(js, ns, "worker")
    await forged_letter(
        js,
        ns,
        "worker",
        b"[" * 20000 + b"]" * 20000,
        {
            "Troupe-Error": "\x1b[2J" + "e" * 20000,
            "Troupe-Attempts": "²",
            "content-type": "application/json",
        },
    )
    await forged_letter(js, ns, "worker", b'{"text": "\\ud800"}', {"Troupe-Error": "lone"})
    nc = await nats.connect(nats_url)
    try:
        header = b"NATS/1.0\r\nTroupe-Error: caf\xc3\xa9 \xff\xfe\r\nX-Fold: a\r\n b\r\n\r\n"
        payload = b"\xed\xa0\x80 not utf-8"
        subject = naming.dead_letter_subject(ns, "worker").encode()
        size = len(header)
        await nc._send_command(  # a raw HPUB: bytes no client library would write
            b"HPUB %s %d %d\r\n" % (subject, size, size + len(payload)) + header + payload + b"\r\n"
        )
        await nc.flush()
    finally:
        await nc.close()
    await eventually(
        lambda: _count_is(stream_count(js, naming.dead_letter_stream(ns, "worker")), 3),
        "three letters",
    )

    listed = await troupe(capsys, nats_url, ns, "dlq", "list", "worker")
    listed_json = await troupe(capsys, nats_url, ns, "-o", "json", "dlq", "list", "worker")
    shown = [await troupe(capsys, nats_url, ns, "dlq", "show", "worker", str(s)) for s in (1, 2, 3)]
    shown_json = [
        await troupe(capsys, nats_url, ns, "-o", "json", "dlq", "show", "worker", str(s))
        for s in (1, 2, 3)
    ]
    replayed = await troupe(capsys, nats_url, ns, "dlq", "replay", "worker", "--all")

    for code, out, _ in (listed, listed_json, *shown, *shown_json):
        assert code == 0
        assert "\x1b" not in out
        out.encode("utf-8")
    letters = json.loads(listed_json[1])
    assert [letter["attempts"] for letter in letters] == [None, None, None]
    assert letters[0]["data"] == "[" * 20000 + "]" * 20000
    assert letters[1]["data"] == {"text": "\ud800"}
    assert letters[2]["error"] == "café \ufffd\ufffd"
    assert letters[2]["data"] == {"base64": "7aCAIG5vdCB1dGYtOA=="}
    assert replayed[0] == 1
    assert "has no Troupe-Original-Subject" in replayed[2]


async def _count_is(count: Any, expected: int) -> bool:
    return bool(await count == expected)
