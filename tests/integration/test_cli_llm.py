"""The CLI with LLM agents, on a real nats-server and a real workflow engine: token usage
from replies in ``troupe runs``, and ``--stream`` printing the deltas agents publish.

The agents here speak the wire contract by hand (``contract/usage.py``'s reply attributes,
``naming.token_stream_subject``'s deltas), so each test controls exactly what arrives."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from tests.integration.llm_harness import CallableTools, llm_config, running_llm, tool
from tests.integration.runtime_harness import DEADLINE, provisioned
from tests.integration.workflow_harness import (
    agent_config,
    agents,
    engine,
    engine_config,
    new_namespace,
)
from troupe_cli.main import amain
from troupe_devcluster.scripted_llm import (
    DEFAULT_USAGE,
    ScriptedLlm,
    ScriptedToolCall,
    Text,
    ToolCalls,
)
from troupe_runtime.agent.context import Context
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.agent_resources import build_agent_resources
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.run_state import RunState, run_usage
from troupe_runtime.contract.usage import Usage
from troupe_runtime.nats.provision import ensure_agent_resources

Output = tuple[int, str, str]
Answer = Callable[[Client, CloudEvent], Any]


async def troupe(capsys: pytest.CaptureFixture[str], nats_url: str, ns: str, *args: str) -> Output:
    code = await amain(["--nats-url", nats_url, "-n", ns, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(nats_url)
    yield nc.jetstream()
    await nc.close()


async def echo(ctx: Context) -> Any:
    return ctx.event.data


async def broken(ctx: Context) -> Any:
    raise RuntimeError("the disk is full")


@asynccontextmanager
async def wire_agent(nats_url: str, ns: str, agent: str, answer: Answer) -> AsyncIterator[None]:
    """An agent that takes its inbox (priority 0) and replies as an LLM agent does: the
    ``answer`` coroutine may stream deltas first and returns the reply's extension
    attributes and data."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    config = agent_config(nats_url, ns, agent)
    await ensure_agent_resources(js, build_agent_resources(config))
    inbox = await js.pull_subscribe_bind(
        naming.consumer_name(agent, 0), stream=naming.inbox_stream(ns, agent)
    )

    async def serve() -> None:
        while True:
            try:
                messages = await inbox.fetch(1, timeout=1)
            except nats.errors.TimeoutError:
                continue
            for msg in messages:
                event = envelope.parse(msg.headers, msg.data)
                attributes, data = await answer(nc, event)
                reply = CloudEvent(
                    id=f"reply-{event.id}".replace("/", "-"),
                    source=f"/{ns}/{agent}",
                    type=f"{event.type}.output",
                    correlationid=event.run_id,
                    causationid=event.id,
                    data=data,
                    **attributes,
                )
                headers, payload = envelope.to_binary(reply)
                if event.replyto is not None:  # a workflow's step; a plain send has none
                    await js.publish(event.replyto, payload, headers=headers)
                await msg.ack()

    task = asyncio.create_task(serve())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await nc.close()


def costing(tokens_in: int, tokens_out: int, cost: float) -> Answer:
    async def answer(nc: Client, event: CloudEvent) -> Any:
        usage = Usage(tokens_in=tokens_in, tokens_out=tokens_out, cost_usd=cost)
        return usage.attributes(), {"from": event.id}

    return answer


async def test_runs_show_gives_the_tokens_and_cost_each_step_reported_and_the_total(
    nats_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = new_namespace()
    config = engine_config(nats_url, ns, [{"name": "a"}, {"name": "b", "dependsOn": ["a"]}])
    async with (
        wire_agent(nats_url, ns, "a", costing(100, 20, 0.0012)),
        wire_agent(nats_url, ns, "b", costing(7, 3, 0.0001)),
        engine(config),
    ):
        ran = await troupe(capsys, nats_url, ns, "run", "wf", "--id", "r1", "--wait")
        shown = await troupe(capsys, nats_url, ns, "runs", "show", "wf", "r1")
        shown_json = await troupe(capsys, nats_url, ns, "-o", "json", "runs", "show", "wf", "r1")
        listed = await troupe(capsys, nats_url, ns, "runs", "list", "wf")

    assert ran[0] == 0, ran
    code, out, _ = shown
    assert code == 0
    lines = out.splitlines()
    assert "tokens:    107/23 (in/out)" in lines
    assert "cost:      $0.0013" in lines
    steps = [line.split() for line in lines if line.startswith(("a ", "b "))]
    # STEP ATTEMPT AGENT STATUS DISPATCHED FINISHED DURATION TOKENS COST ERROR
    assert [step[2] for step in steps] == ["a", "b"]
    assert [step[7:9] for step in steps] == [["100/20", "$0.0012"], ["7/3", "$0.0001"]]
    run = json.loads(shown_json[1])
    assert run["usage"] == {"tokensIn": 107, "tokensOut": 23, "costUsd": pytest.approx(0.0013)}
    assert [s["usage"]["tokensIn"] for s in run["steps"]] == [100, 7]
    code, out, _ = listed
    assert code == 0
    assert out.splitlines()[1].split()[-2:] == ["107/23", "$0.0013"]


def counted(tokens_in: int) -> Any:
    async def handle(ctx: Context) -> Any:
        ctx.attributes.update(Usage(tokens_in=tokens_in, tokens_out=1, cost_usd=0.5).attributes())
        return [*(ctx.event.data or []), tokens_in]

    return handle


async def test_usage_a_real_agent_puts_on_its_reply_reaches_the_run_and_its_projection(
    nats_url: str, js: JetStreamContext, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real runtime (ctx.attributes on the reply) and the real engine: the runs
    bucket's projection, which the operator reads for the Workflow's status, has the total."""
    ns = new_namespace()
    config = engine_config(nats_url, ns, [{"name": "a"}, {"name": "b", "dependsOn": ["a"]}])
    async with agents(nats_url, ns, {"a": counted(10), "b": counted(20)}), engine(config):
        ran = await troupe(capsys, nats_url, ns, "run", "wf", "--id", "r1", "--wait")
        shown = await troupe(capsys, nats_url, ns, "-o", "json", "runs", "show", "wf", "r1")

    assert ran[0] == 0, ran
    run = json.loads(shown[1])
    assert run["usage"] == {"tokensIn": 30, "tokensOut": 2, "costUsd": 1.0}
    entry = await (await js.key_value(config.runs_bucket)).get("r1")
    projected = RunState.model_validate_json(entry.value or b"")
    assert run_usage(projected) == Usage(tokens_in=30, tokens_out=2, cost_usd=1.0)


async def test_a_reply_with_garbage_usage_still_moves_the_run_on_and_counts_nothing(
    nats_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def garbage(nc: Client, event: CloudEvent) -> Any:
        return {"troupetokensin": "lots", "troupecostusd": "NaN"}, "ok"

    ns = new_namespace()
    config = engine_config(nats_url, ns, [{"name": "a"}])
    async with wire_agent(nats_url, ns, "a", garbage), engine(config):
        ran = await troupe(capsys, nats_url, ns, "run", "wf", "--id", "r1", "--wait")
        shown = await troupe(capsys, nats_url, ns, "-o", "json", "runs", "show", "wf", "r1")

    assert ran[0] == 0, ran
    run = json.loads(shown[1])
    assert (run["status"], run["usage"], run["steps"][0]["usage"]) == ("Succeeded", None, None)


GARBAGE = [
    b"not json",
    b"\xff\xfe",
    b"[1, 2]",
    b'{"delta": 5}',
    b'{"tool": ["x"]}',
    b'{"done": "yes", "final": true}',
    b"[" * 50000,
    b'{"delta": "' + b"x" * 200_000 + b'"}',
]


def streaming(ns: str, chunks: list[dict[str, Any] | bytes], usage: Usage | None = None) -> Answer:
    """An agent that streams ``chunks`` on its answer's subject, then replies."""

    async def answer(nc: Client, event: CloudEvent) -> Any:
        subject = naming.token_stream_subject(ns, event.run_id, event.id)
        for chunk in chunks:
            data = chunk if isinstance(chunk, bytes) else json.dumps(chunk).encode()
            await nc.publish(subject, data)
        await nc.flush()
        return ({} if usage is None else usage.attributes()), "done"

    return answer


def answer_chunks(first_turn: list[str], last: str = " world") -> list[dict[str, Any] | bytes]:
    """Deltas of a turn that calls a tool, then a final turn; garbage before each chunk."""
    script: list[dict[str, Any]] = [
        *({"delta": text, "turn": 1} for text in first_turn),
        {"tool": "search\x1b[2J", "turn": 1},
        {"done": True, "turn": 1, "final": False},
        {"delta": last, "turn": 2},
        {"done": True, "turn": 2, "final": True},
    ]
    chunks: list[dict[str, Any] | bytes] = []
    for index, chunk in enumerate(script):
        chunks += [GARBAGE[index % len(GARBAGE)], chunk]
    return chunks


async def test_send_stream_prints_the_deltas_in_order_skipping_garbage_until_the_final_turn(
    nats_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = new_namespace()
    chunks = answer_chunks(["Hel", "\x1b[31mlo\x1b[0m\x1b]0;pwned\x07"])
    usage = Usage(tokens_in=5, tokens_out=2, cost_usd=0.001)
    async with wire_agent(nats_url, ns, "analyst", streaming(ns, chunks, usage)):
        code, out, err = await troupe(
            capsys, nats_url, ns, "send", "analyst", "--data", '"hi"', "--id", "q1", "--stream"
        )

    assert code == 0, err
    inbox = naming.inbox_subject(ns, "analyst", 0)
    assert out == (
        "Hello\n[tool: search]\n world\n"
        f"analyst answered q1 (sent to {inbox}, sequence 1)\n"
        "tokens: 5/2 (in/out), cost $0.001\n"
        '"done"\n'
    )
    assert "warning: ignored 6 stream messages that were not deltas" in err


async def test_send_stream_as_json_gives_one_sanitised_chunk_a_line_then_the_send(
    nats_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = new_namespace()
    chunks = answer_chunks(["a\x07b"])
    async with wire_agent(nats_url, ns, "analyst", streaming(ns, chunks)):
        code, out, _ = await troupe(
            capsys, nats_url, ns, "-o", "json", "send", "analyst", "--id", "q1", "--stream"
        )

    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[:-1] == [
        {"delta": "ab", "turn": 1},
        {"tool": "search", "turn": 1},
        {"done": True, "turn": 1, "final": False},
        {"delta": " world", "turn": 2},
        {"done": True, "turn": 2, "final": True},
    ]
    assert (lines[-1]["id"], lines[-1]["reply"]["data"]) == ("q1", "done")


async def test_send_stream_prints_the_reply_of_an_agent_that_does_not_stream(
    nats_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = new_namespace()
    async with agents(nats_url, ns, {"echo": echo}):
        code, out, err = await troupe(
            capsys, nats_url, ns, "send", "echo", "--id", "q1", "--data", '{"x": 1}', "--stream"
        )

    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith("echo answered q1 (sent to ")
    assert json.loads("\n".join(lines[1:])) == {"x": 1}


async def test_send_stream_exits_1_with_the_failure_when_the_agent_dead_letters_the_message(
    nats_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = new_namespace()
    async with agents(nats_url, ns, {"broken": broken}):
        code, out, _ = await troupe(
            capsys, nats_url, ns, "send", "broken", "--id", "q9", "--stream", "--timeout", "20"
        )

    assert code == 1
    assert out.startswith("broken failed q9 (sent to ")
    assert "the disk is full" in out


async def test_send_stream_gives_up_after_its_timeout(
    nats_url: str, js: JetStreamContext, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = new_namespace()
    config = agent_config(nats_url, ns, "idle")
    await ensure_agent_resources(js, build_agent_resources(config))

    code, _, err = await troupe(capsys, nats_url, ns, "send", "idle", "--stream", "--timeout", "1")

    assert code == 1
    assert "agent idle did not answer" in err


async def test_run_stream_names_each_steps_deltas_then_prints_the_result(
    nats_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = new_namespace()
    config = engine_config(nats_url, ns, [{"name": "a"}, {"name": "b", "dependsOn": ["a"]}])
    async with (
        wire_agent(nats_url, ns, "a", streaming(ns, answer_chunks(["one\ntwo"], " A"))),
        wire_agent(nats_url, ns, "b", streaming(ns, answer_chunks(["three"], " B"))),
        engine(config),
    ):
        code, out, err = await troupe(capsys, nats_url, ns, "run", "wf", "--id", "r1", "--stream")

    assert code == 0, err
    assert out.splitlines() == [
        "[a] one",
        "[a] two",
        "[a] [tool: search]",
        "[a]  A",
        "[b] three",
        "[b] [tool: search]",
        "[b]  B",
        "run r1: Succeeded",
        '"done"',
    ]


async def test_send_stream_ends_on_the_reply_while_garbage_keeps_pouring_in(
    nats_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = new_namespace()
    flooding: list[asyncio.Task[None]] = []

    async def flood(nc: Client, subject: str) -> None:
        while True:
            await nc.publish(subject, b"\x1b[2J garbage")
            await asyncio.sleep(0.001)

    async def answer(nc: Client, event: CloudEvent) -> Any:
        subject = naming.token_stream_subject(ns, event.run_id, event.id)
        flooding.append(asyncio.create_task(flood(nc, subject)))
        await nc.publish(subject, json.dumps({"delta": "still here", "turn": 1}).encode())
        return {}, "ok"

    try:
        async with wire_agent(nats_url, ns, "analyst", answer):
            code, out, err = await asyncio.wait_for(
                troupe(capsys, nats_url, ns, "send", "analyst", "--id", "q1", "--stream"),
                DEADLINE,
            )
    finally:
        for task in flooding:
            task.cancel()

    assert code == 0, err
    assert out.startswith("still here\nanalyst answered q1")
    assert "\x1b" not in out
    assert "stream messages that were not deltas" in err


# The real LLM agent (the loop, its streaming publisher, its usage attributes) over the
# scripted model.


async def echo_tool(arguments: dict[str, Any]) -> str:
    return "echoed"


def script_tool_then_answer(server: ScriptedLlm) -> None:
    server.script(
        ToolCalls([ScriptedToolCall("echo", "{}", "c1")]),
        Text("one two three", chunks=["one", " two", " three"]),
    )


TWO_CALLS = (2 * DEFAULT_USAGE[0], 2 * DEFAULT_USAGE[1])
"""The tool-call turn and the answer, each reporting the scripted server's usage."""


def reported(text: str) -> tuple[int, int]:
    """The tokens (in, out) a ``tokens: IN/OUT (in/out), cost $X`` line reports."""
    found = re.search(r"tokens:\s+(\d+)/(\d+) \(in/out\)", text)
    assert found is not None, text
    return int(found.group(1)), int(found.group(2))


async def test_send_stream_shows_a_real_llm_agent_answering_then_its_reply_and_tokens(
    nats_url: str, scripted_llm: ScriptedLlm, capsys: pytest.CaptureFixture[str]
) -> None:
    config = llm_config(nats_url, scripted_llm.base_url)
    script_tool_then_answer(scripted_llm)
    async with (
        provisioned(config),
        running_llm(config, CallableTools(tool("echo", echo_tool))),
    ):
        code, out, err = await troupe(
            capsys, nats_url, config.namespace, "send", config.agent, "--id", "q1", "--stream"
        )

    assert code == 0, err
    lines = out.splitlines()
    assert lines[:3] == [
        "[tool: echo]",
        "one two three",
        f"{config.agent} answered q1 (sent to {config.inbox_subject(0)}, sequence 1)",
    ]
    assert reported(lines[3]) == TWO_CALLS


async def test_run_stream_and_runs_show_with_a_real_llm_agent_as_a_step(
    nats_url: str, scripted_llm: ScriptedLlm, capsys: pytest.CaptureFixture[str]
) -> None:
    config = llm_config(nats_url, scripted_llm.base_url)
    ns = config.namespace
    workflow = engine_config(nats_url, ns, [{"name": "ask", "agent": config.agent}])
    script_tool_then_answer(scripted_llm)
    async with (
        provisioned(config),
        running_llm(config, CallableTools(tool("echo", echo_tool))),
        engine(workflow),
    ):
        ran = await troupe(capsys, nats_url, ns, "run", "wf", "--id", "r1", "--stream")
        shown = await troupe(capsys, nats_url, ns, "runs", "show", "wf", "r1")

    code, out, err = ran
    assert code == 0, err
    assert out.splitlines()[:3] == [
        "[ask] [tool: echo]",
        "[ask] one two three",
        "run r1: Succeeded",
    ]
    code, out, _ = shown
    assert code == 0
    assert reported(out) == TWO_CALLS
    assert "cost:      $0.000184" in out.splitlines()  # 22 x $2/M in + 14 x $10/M out
