"""Where a runtime publishes: outputs sized with their headers, replies on an allow-list,
and a subject no stream stores dead-lettered once instead of re-running the handler."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import nats
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg, StreamConfig

from tests.integration.runtime_harness import (
    eventually,
    http_get,
    inbox_empty,
    make_config,
    output_stream,
    provisioned,
    running,
    send,
    stored,
    stream_count,
)
from tests.integration.test_runtime_health import agent_process, ready
from troupe_devcluster.layout import free_port
from troupe_runtime.agent.context import Context
from troupe_runtime.contract import naming
from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.dead_letters import ERROR_HEADER, REASON_HEADER

HANDLERS = "tests.integration.target_handlers"


async def letter(js: JetStreamContext, config: RuntimeConfig) -> tuple[str, str]:
    """The reason and error of the agent's one dead letter."""
    letters: list[RawStreamMsg] = await stored(js, config.dead_letter_stream)
    assert len(letters) == 1, [m.headers for m in letters]
    headers = letters[0].headers or {}
    return headers[REASON_HEADER], headers[ERROR_HEADER]


async def letters_stored(js: JetStreamContext, config: RuntimeConfig, count: int) -> bool:
    return await stream_count(js, config.dead_letter_stream) == count


class Counting:
    """A handler that counts its runs (its side effect) and echoes."""

    def __init__(self) -> None:
        self.runs = 0

    async def __call__(self, ctx: Context) -> Any:
        self.runs += 1
        return ctx.event.data


async def test_an_output_over_max_payload_only_with_its_headers_is_dead_lettered_and_the_process_stays_live(  # noqa: E501
    nats_url: str, tmp_path: Path
) -> None:
    config = make_config(
        nats_url,
        handler={"type": "python", "entrypoint": f"{HANDLERS}:fill_to"},
        healthPort=free_port(),
    )
    async with provisioned(config) as (nc, js):
        limit = nc.max_payload
        near_the_limit = {"outputBytes": limit - 50, "fill": "x" * (limit - 4096)}
        with agent_process(config, tmp_path) as process:
            await eventually(lambda: ready(config), "the runtime to be ready")
            await send(js, config, near_the_limit)
            await eventually(lambda: stream_count(js, config.dead_letter_stream), "the letter")
            await send(js, config, {"outputBytes": 10})
            await eventually(lambda: stream_count(js, output_stream(config)), "the next output")
            healthz = (await http_get(config.health_port, "/healthz")).status_code
            still_ready = await ready(config)
            alive = process.poll() is None
        reason, error = await letter(js, config)

    assert reason == "undeliverable"
    assert f"(payload {limit - 50}, headers " in error
    assert f"over the server's max_payload of {limit} bytes" in error
    assert (healthz, still_ready, alive) == (200, True, True)


async def test_a_replyto_into_the_jetstream_api_purges_nothing_and_is_dead_lettered(
    nats_url: str,
) -> None:
    config = make_config(nats_url)
    handler = Counting()
    unrelated = f"UNRELATED_{config.namespace}"
    async with provisioned(config) as (_, js):
        await js.add_stream(
            StreamConfig(name=unrelated, subjects=[f"unrelated.{config.namespace}"])
        )
        for _ in range(3):
            await js.publish(f"unrelated.{config.namespace}", b"keep me")
        async with running(config, handler):
            await send(js, config, "purge it", replyto=f"$JS.API.STREAM.PURGE.{unrelated}")
            await eventually(lambda: stream_count(js, config.dead_letter_stream), "the letter")
            kept = await stream_count(js, unrelated)
        reason, error = await letter(js, config)

    assert kept == 3
    assert reason == "invalid-input"
    assert f"replyto '$JS.API.STREAM.PURGE.{unrelated}' is not a workflow reply subject" in error
    assert handler.runs == 0


async def test_a_replyto_into_another_namespace_publishes_nothing_there(nats_url: str) -> None:
    config = make_config(nats_url)
    other = make_config(nats_url)
    handler = Counting()
    async with provisioned(other) as (_, other_js), provisioned(config) as (_, js):
        other_workflow = naming.workflow_stream(other.namespace, "checkout")
        await other_js.add_stream(
            StreamConfig(
                name=other_workflow,
                subjects=[naming.workflow_subject(other.namespace, "checkout", "replies", ">")],
            )
        )
        async with running(config, handler):
            await send(js, config, "to their inbox", replyto=other.inbox_subject(0))
            await send(
                js,
                config,
                "to their engine",
                replyto=naming.workflow_subject(other.namespace, "checkout", "replies", "r1"),
            )
            await eventually(lambda: letters_stored(js, config, 2), "both letters")
            published = (
                await stream_count(js, other.inbox_stream),
                await stream_count(js, other_workflow),
            )
        reasons = {
            (m.headers or {})[REASON_HEADER] for m in await stored(js, config.dead_letter_stream)
        }

    assert published == (0, 0)
    assert reasons == {"invalid-input"}
    assert handler.runs == 0


async def test_an_output_subject_no_stream_stores_is_dead_lettered_once(nats_url: str) -> None:
    probe = make_config(nats_url)
    nowhere = f"nowhere.{probe.namespace}.x"
    config = probe.model_copy(
        update={"contract": probe.contract.model_copy(update={"output_subjects": [nowhere]})}
    )
    handler = Counting()
    async with provisioned(config) as (_, js), running(config, handler):
        await send(js, config, "lost")
        await eventually(lambda: stream_count(js, config.dead_letter_stream), "the letter")
        await eventually(lambda: inbox_empty(js, config), "the input acknowledged")
        reason, error = await letter(js, config)

    assert reason == "undeliverable"
    assert f"no stream stores subject {nowhere!r}" in error
    assert handler.runs == 1


async def test_an_output_subject_something_only_subscribes_to_is_dead_lettered_once(
    nats_url: str,
) -> None:
    # JetStream's publish timeout (5s) must not outlast ackWait, or the input is redelivered
    # while the first attempt still waits; the default ackWait is 30s.
    probe = make_config(nats_url, messaging={"ackWait": "30s"})
    listened = f"listened.{probe.namespace}.x"
    config = probe.model_copy(
        update={"contract": probe.contract.model_copy(update={"output_subjects": [listened]})}
    )
    handler = Counting()
    listener = await nats.connect(nats_url)
    try:
        await listener.subscribe(listened)  # interest without a stream: the publish times out
        async with provisioned(config) as (_, js), running(config, handler):
            await send(js, config, "heard, never stored")
            await eventually(lambda: stream_count(js, config.dead_letter_stream), "the letter")
            reason, error = await letter(js, config)
    finally:
        await listener.close()

    assert reason == "undeliverable"
    assert "the publish timed out, and no stream lists it" in error
    assert handler.runs == 1


async def test_a_workflow_reply_subject_no_stream_stores_is_dead_lettered_once(
    nats_url: str,
) -> None:
    config = make_config(nats_url)
    handler = Counting()
    gone = naming.workflow_subject(config.namespace, "deleted", "replies", uuid.uuid4().hex)
    async with provisioned(config) as (_, js), running(config, handler):
        await send(js, config, "reply to a deleted workflow", replyto=gone)
        await eventually(lambda: stream_count(js, config.dead_letter_stream), "the letter")
        await eventually(lambda: inbox_empty(js, config), "the input acknowledged")
        reason, error = await letter(js, config)

    assert reason == "undeliverable"
    assert f"no stream stores subject {gone!r}" in error
    assert handler.runs == 1
