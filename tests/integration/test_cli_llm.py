"""The CLI with LLM agents, on a real nats-server and a real workflow engine: token usage
from replies in ``troupe runs``, and ``--stream`` printing the deltas agents publish.

The agents here speak the wire contract by hand (``contract/usage.py``'s reply attributes,
``naming.token_stream_subject``'s deltas), so each test controls exactly what arrives."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from tests.integration.workflow_harness import agent_config, engine, engine_config, new_namespace
from troupe_cli.main import amain
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.agent_resources import build_agent_resources
from troupe_runtime.contract.envelope import CloudEvent
from troupe_runtime.contract.usage import Usage
from troupe_runtime.nats.provision import ensure_agent_resources

Output = tuple[int, str, str]
Answer = Callable[[Client, CloudEvent], Any]


async def troupe(capsys: pytest.CaptureFixture[str], nats_url: str, ns: str, *args: str) -> Output:
    code = await amain(["--nats-url", nats_url, "-n", ns, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


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
                assert event.replyto is not None
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
    assert [step[6:8] for step in steps] == [["100/20", "$0.0012"], ["7/3", "$0.0001"]]
    run = json.loads(shown_json[1])
    assert run["usage"] == {"tokensIn": 107, "tokensOut": 23, "costUsd": pytest.approx(0.0013)}
    assert [s["usage"]["tokensIn"] for s in run["steps"]] == [100, 7]
    code, out, _ = listed
    assert code == 0
    assert out.splitlines()[1].split()[-2:] == ["107/23", "$0.0013"]


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
