"""LLM-aware settlement on the real runtime: deferrals that burn no attempt, model failures
dead-lettered with their reason, and ``ctx.attributes`` on every output and reply."""

from __future__ import annotations

import asyncio
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg, StreamConfig

from tests.integration.runtime_harness import (
    eventually,
    inbox_empty,
    make_config,
    output_stream,
    provisioned,
    running,
    sample,
    send,
    stored,
    stream_count,
)
from troupe_runtime.agent.context import Context
from troupe_runtime.agent.llm.types import DeferMessage, ModelRejected
from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.dead_letters import ATTEMPTS_HEADER, ERROR_HEADER, REASON_HEADER
from troupe_runtime.contract.llm import MAX_DEFERRALS
from troupe_runtime.contract.usage import Usage

# An LLM agent's runtime config: what makes its consumers allow the deferrals. The
# handler below is plain Python; only the config says "this agent may defer".
LLM = {"policy": {"model": {"provider": "local", "model": "smollm2"}}}
DEFER_SECONDS = 0.5
USAGE = Usage(tokens_in=120, tokens_out=7, cost_usd=0.00042)


def llm_config(nats_url: str, **fields: Any) -> RuntimeConfig:
    return make_config(nats_url, llm=LLM, **fields)


async def letters(js: JetStreamContext, config: RuntimeConfig) -> list[RawStreamMsg]:
    await eventually(lambda: stream_count(js, config.dead_letter_stream), "a dead letter")
    await eventually(lambda: inbox_empty(js, config), "the input to be acknowledged")
    return await stored(js, config.dead_letter_stream)


async def test_a_deferred_message_comes_back_after_the_delay_and_keeps_all_its_attempts(
    nats_url: str,
) -> None:
    config = llm_config(nats_url, retry={"maxAttempts": 3, "backoff": ["50ms"]})
    runs: list[tuple[int, int, float]] = []
    loop = asyncio.get_running_loop()

    async def rate_limited_twice_then_broken(ctx: Context) -> None:
        ctx.set_deferrals(min(ctx.deliveries - 1, 2))  # what a journal would say
        runs.append((ctx.deliveries, ctx.attempt, loop.time()))
        if ctx.deliveries <= 2:
            raise DeferMessage(
                "429, Retry-After 0.5s", delay=DEFER_SECONDS, deferrals=ctx.deliveries
            )
        raise RuntimeError("the model is on fire")

    async with (
        provisioned(config) as (_, js),
        running(config, rate_limited_twice_then_broken) as rt,
    ):
        await send(js, config, {"q": "why"})
        [letter] = await letters(js, config)
        deferred = sample(rt, "troupe_messages_total", outcome="deferred")
        retried = sample(rt, "troupe_retries_total")

    assert [(deliveries, attempt) for deliveries, attempt, _ in runs] == [
        (1, 1),
        (2, 1),
        (3, 1),
        (4, 2),
        (5, 3),
    ]
    assert runs[1][2] - runs[0][2] >= DEFER_SECONDS
    assert runs[2][2] - runs[1][2] >= DEFER_SECONDS
    assert (deferred, retried) == (2, 2)
    headers = letter.headers or {}
    assert headers[REASON_HEADER] == "exhausted"
    assert headers[ATTEMPTS_HEADER] == "5"  # deliveries, deferrals included


async def test_a_message_deferred_past_max_deferrals_is_dead_lettered_as_rate_limited(
    nats_url: str,
) -> None:
    config = llm_config(nats_url, retry={"maxAttempts": 2, "backoff": ["50ms"]})
    runs: list[int] = []

    async def always_rate_limited(ctx: Context) -> None:
        ctx.set_deferrals(ctx.deliveries - 1)
        runs.append(ctx.deliveries)
        raise DeferMessage("429 from every model", delay=0.0, deferrals=ctx.deliveries)

    async with provisioned(config) as (_, js), running(config, always_rate_limited):
        await send(js, config, {"q": "why"})
        [letter] = await letters(js, config)

    assert runs == list(range(1, MAX_DEFERRALS + 2))
    headers = letter.headers or {}
    assert headers[REASON_HEADER] == "rate-limited"
    assert headers[ERROR_HEADER].startswith(
        f"deferred {MAX_DEFERRALS + 1} times, more than the {MAX_DEFERRALS} an LLM agent allows"
    )


async def test_a_redelivery_whose_journal_leaves_no_attempt_stops_before_the_model_is_asked(
    nats_url: str,
) -> None:
    """The first delivery ended without a journaled deferral (as when it crashed the
    process): on the second, with one attempt allowed, ``set_deferrals`` stops the handler."""
    config = llm_config(nats_url, retry={"maxAttempts": 1, "backoff": ["50ms"]})
    calls: list[int] = []

    async def deferred_once_then_resumed(ctx: Context) -> None:
        calls.append(ctx.deliveries)
        if ctx.deliveries == 1:
            raise DeferMessage("429", delay=0.0, deferrals=1)
        ctx.set_deferrals(0)  # the journal holds no deferral: this would be attempt 2 of 1
        raise AssertionError("the handler went on with no attempt left")

    async with provisioned(config) as (_, js), running(config, deferred_once_then_resumed):
        await send(js, config, {"q": "why"})
        [letter] = await letters(js, config)

    assert calls == [1, 2]
    assert (letter.headers or {})[REASON_HEADER] == "max-deliveries"


async def test_attributes_a_handler_sets_are_headers_of_its_output_event(nats_url: str) -> None:
    config = llm_config(nats_url)

    async def answers_with_usage(ctx: Context) -> Any:
        ctx.attributes.update(USAGE.attributes())
        ctx.attributes["NotAnExtension"] = 1  # dropped and logged, not a failure
        return {"answer": 42}

    async with provisioned(config) as (_, js), running(config, answers_with_usage):
        await send(js, config, {"q": "why"})
        await eventually(lambda: stream_count(js, output_stream(config)), "the output")
        [output] = await stored(js, output_stream(config))
        await eventually(lambda: inbox_empty(js, config), "the input to be acknowledged")

    headers = output.headers or {}
    assert headers["ce-troupetokensin"] == "120"
    assert headers["ce-troupetokensout"] == "7"
    assert headers["ce-troupecostusd"] == "0.000420000"
    assert not any(name.lower() == "ce-notanextension" for name in headers)
    assert Usage.from_attributes(
        envelope.parse(headers, output.data or b"").model_extra or {}
    ) == Usage(tokens_in=120, tokens_out=7, cost_usd=0.00042)


async def test_a_refused_model_request_is_dead_lettered_as_rejected_and_the_failure_reply_carries_usage(  # noqa: E501
    nats_url: str,
) -> None:
    config = llm_config(nats_url, retry={"maxAttempts": 3, "backoff": ["50ms"]})
    replies = naming.workflow_subject(config.namespace, "research", "replies", ">")
    runs: list[int] = []

    async def refused(ctx: Context) -> None:
        runs.append(ctx.attempt)
        ctx.attributes.update(USAGE.attributes())
        raise ModelRejected("maximum context length is 2048 tokens", 400)

    async with provisioned(config) as (_, js):
        stream = naming.workflow_stream(config.namespace, "research")
        await js.add_stream(StreamConfig(name=stream, subjects=[replies]))
        async with running(config, refused):
            replyto = naming.workflow_subject(config.namespace, "research", "replies", "r1")
            await send(js, config, {"q": "why"}, replyto=replyto)
            [letter] = await letters(js, config)
            await eventually(lambda: stream_count(js, stream), "the failure reply")
            [reply] = await stored(js, stream)

    assert runs == [1]
    headers = letter.headers or {}
    assert headers[REASON_HEADER] == "rejected"
    assert headers[ERROR_HEADER] == (
        "the model rejected the request (HTTP 400): maximum context length is 2048 tokens"
    )
    event = envelope.parse(reply.headers, reply.data or b"")
    assert event.type == envelope.ERROR_TYPE
    assert event.data["reason"] == "rejected"
    assert (reply.headers or {})["ce-troupetokensin"] == "120"
