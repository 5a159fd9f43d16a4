"""A blocking call listens before it sends: a new task's answer comes to the subscription
with nothing read back, and the same task id sent again (a caller's retry after the answer)
is not new and is answered from where the Agent stored its reply."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client
from troupe_gateway.calls import Calls

from tests.integration.test_gateway_calls import TTL, answer, entry_of
from tests.integration.test_gateway_calls import nc as nc  # the fixture

WAIT = 10.0


async def test_a_new_task_is_answered_to_the_listener_and_a_retry_from_the_store(
    nc: Client,
) -> None:
    entry = entry_of(nc)
    calls = Calls(nc, nc.jetstream(), TTL)
    async with calls.listening(entry, "task-1") as listener:
        submitted = await calls.send(entry, {"q": 1}, caller="alice", task_id="task-1")
        agent = asyncio.create_task(answer(nc, entry, 1))
        view = await listener.wait(WAIT, submitted)
    assert submitted.new
    assert (view.state, view.output) == ("completed", {"echo": {"q": 1}})
    assert await agent == ["task-1"]

    async with calls.listening(entry, "task-1") as listener:
        again = await calls.send(entry, {"q": 1}, caller="alice", task_id="task-1")
        view = await listener.wait(WAIT, again)
    assert not again.new
    assert again.record == submitted.record
    assert (view.state, view.output) == ("completed", {"echo": {"q": 1}})
