"""The gateway's calls on a real nats-server: a call is a task whose record is filed before
the publish, whose answer is read from where the Agent stores it, and which any other
gateway (a second ``Calls`` on its own connection: another replica) sees the same.

The Agent here is the test itself, answering on the inbox as the runtime does (a reply on
``replyto`` caused by the call, from ``/<ns>/<agent>``): what is under test is the gateway's
side of the protocol, not the runtime's.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js.api import StreamConfig
from troupe_gateway.calls import CallRefused, Calls

from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.envelope import ERROR_TYPE, CloudEvent
from troupe_runtime.contract.gateway import GATEWAY_SOURCE, DirectoryEntry

NAMESPACE = "gw-calls"
AGENT = "echo"
TTL = 3600.0


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await nats.connect(nats_url)
    js = client.jetstream()
    suffix = uuid.uuid4().hex[:6]
    namespace = f"{NAMESPACE}-{suffix}"
    await js.add_stream(
        StreamConfig(
            name=naming.inbox_stream(namespace, AGENT),
            subjects=[naming.inbox_wildcard(namespace, AGENT)],
        )
    )
    await js.add_stream(
        StreamConfig(
            name=naming.event_log_stream(namespace),
            subjects=[naming.event_log_subject(namespace, ">")],
        )
    )
    client.namespace = namespace  # type: ignore[attr-defined]
    yield client
    await client.close()


def entry_of(nc: Client) -> DirectoryEntry:
    namespace = nc.namespace  # type: ignore[attr-defined]
    return DirectoryEntry(
        kind="Agent",
        namespace=namespace,
        name=AGENT,
        subject=naming.inbox_subject(namespace, AGENT, 0),
        ready=True,
    )


async def answer(nc: Client, entry: DirectoryEntry, count: int, fail: bool = False) -> list[str]:
    """Be the Agent: take ``count`` calls from the inbox and reply to each as the runtime
    does; the ids taken, in order."""
    js = nc.jetstream()
    sub = await js.pull_subscribe(naming.inbox_wildcard(entry.namespace, AGENT), durable="agent")
    taken: list[str] = []
    while len(taken) < count:
        for msg in await sub.fetch(count - len(taken), timeout=10):
            call = envelope.parse(dict(msg.headers or {}), msg.data)
            assert call.source == GATEWAY_SOURCE
            assert call.replyto == naming.gateway_reply_subject(entry.namespace, call.id)
            reply = CloudEvent(
                id=f"{call.id}-reply",
                source=f"/{entry.namespace}/{AGENT}",
                type=ERROR_TYPE if fail else "echo.done",
                datacontenttype=envelope.JSON_CONTENT_TYPE,
                causationid=call.id,
                correlationid=call.run_id,
                data={"error": "no", "reason": "handler-error"} if fail else {"echo": call.data},
            )
            headers, payload = envelope.to_binary(reply)
            await js.publish(call.replyto, payload, headers=headers)
            await msg.ack()
            taken.append(call.id)
    return taken


async def test_a_call_is_answered_and_another_replica_sees_the_same_task(
    nc: Client, nats_url: str
) -> None:
    entry = entry_of(nc)
    calls = Calls(nc, nc.jetstream(), TTL)
    record = await calls.submit(entry, {"q": 1}, caller="alice", context_id="ctx-1")
    agent = asyncio.create_task(answer(nc, entry, 1))
    view = await calls.wait(entry, record.task_id, 10)
    assert view.state == "completed"
    assert view.output == {"echo": {"q": 1}}
    assert await agent == [record.task_id]

    other = await nats.connect(nats_url)
    try:
        replica = Calls(other, other.jetstream(), TTL)
        seen = await replica.get(entry, record.task_id)
        assert seen is not None
        assert (seen.state, seen.output, seen.record.context_id) == (
            "completed",
            {"echo": {"q": 1}},
            "ctx-1",
        )
        listed = await replica.list(entry, context_id="ctx-1")
        assert [view.record.task_id for view in listed] == [record.task_id]
        assert await replica.list(entry, context_id="another") == []
    finally:
        await other.close()


async def test_the_same_task_id_twice_is_one_task_and_one_message(nc: Client) -> None:
    entry = entry_of(nc)
    calls = Calls(nc, nc.jetstream(), TTL)
    first = await calls.submit(entry, {"n": 1}, caller="a", task_id="task-1")
    again = await calls.submit(entry, {"n": 2}, caller="b", task_id="task-1")
    assert again == first
    info = await nc.jetstream().stream_info(naming.inbox_stream(entry.namespace, AGENT))
    assert info.state.messages == 1


async def test_a_failed_answer_is_a_failed_task_with_its_reason(nc: Client) -> None:
    entry = entry_of(nc)
    calls = Calls(nc, nc.jetstream(), TTL)
    record = await calls.submit(entry, None, caller="a")
    agent = asyncio.create_task(answer(nc, entry, 1, fail=True))
    view = await calls.wait(entry, record.task_id, 10)
    await agent
    assert (view.state, view.error, view.reason) == ("failed", "no", "handler-error")


async def test_a_forged_reply_does_not_end_the_task(nc: Client) -> None:
    entry = entry_of(nc)
    calls = Calls(nc, nc.jetstream(), TTL)
    record = await calls.submit(entry, None, caller="a")
    forged = CloudEvent(
        id="forged",
        source=f"/{entry.namespace}/someone-else",
        type="echo.done",
        causationid=record.task_id,
        data={"lie": True},
    )
    headers, payload = envelope.to_binary(forged)
    await nc.jetstream().publish(
        naming.gateway_reply_subject(entry.namespace, record.task_id), payload, headers=headers
    )
    view = await calls.wait(entry, record.task_id, 1.5)
    assert view.state == "working"


async def test_an_unanswered_call_is_working_then_an_agent_task_cannot_be_recalled(
    nc: Client,
) -> None:
    entry = entry_of(nc)
    calls = Calls(nc, nc.jetstream(), TTL)
    record = await calls.submit(entry, None, caller="a")
    assert (await calls.wait(entry, record.task_id, 0.2)).state == "working"
    with pytest.raises(CallRefused) as refused:
        await calls.cancel(entry, record.task_id)
    assert refused.value.status == 409
    with pytest.raises(CallRefused) as unknown:
        await calls.wait(entry, "no-such-task", 0.1)
    assert unknown.value.status == 404


@pytest.mark.parametrize("task_id", ["", "a b", "x" * 201, "a.b", "ü"])
async def test_a_task_id_that_cannot_be_a_message_id_is_refused(nc: Client, task_id: Any) -> None:
    entry = entry_of(nc)
    calls = Calls(nc, nc.jetstream(), TTL)
    if task_id == "":
        record = await calls.submit(entry, None, caller="a", task_id=task_id)
        assert record.task_id  # an empty id is no id: one is made
        return
    with pytest.raises(CallRefused) as refused:
        await calls.submit(entry, None, caller="a", task_id=task_id)
    assert refused.value.status == 400


async def test_an_input_past_the_servers_payload_limit_is_413_and_nothing_is_stored(
    nc: Client,
) -> None:
    entry = entry_of(nc)
    calls = Calls(nc, nc.jetstream(), TTL)
    with pytest.raises(CallRefused) as refused:
        await calls.submit(entry, "x" * nc.max_payload, caller="a", task_id="huge")
    assert refused.value.status == 413
    assert await calls.get(entry, "huge") is None
    info = await nc.jetstream().stream_info(naming.inbox_stream(entry.namespace, AGENT))
    assert info.state.messages == 0
