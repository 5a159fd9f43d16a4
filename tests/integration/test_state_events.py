"""Event logs per correlation id against a real nats-server: order, idempotence, following."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import nats
import pytest

from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.agent_resources import build_agent_resources
from troupe_runtime.nats.provision import ensure_agent_resources
from troupe_runtime.state import StateStore

DEADLINE = 10.0


@pytest.fixture
async def store(nats_url: str) -> AsyncIterator[StateStore]:
    """A store of a fresh namespace whose event-log stream is provisioned."""
    connection = await nats.connect(nats_url)
    config = RuntimeConfig(agent="logger", namespace=f"events-{uuid.uuid4().hex[:10]}")
    await ensure_agent_resources(connection.jetstream(), build_agent_resources(config))
    yield StateStore(connection.jetstream(), config)
    await connection.close()


async def test_replay_returns_one_correlation_ids_events_in_append_order(
    store: StateStore,
) -> None:
    run, other = store.events("run-1"), store.events("run-2")
    appended = []
    for step in range(3):
        appended.append(await run.append("step", {"n": step}))
        await other.append("noise", {"n": step})

    events = await run.replay()

    assert [(e.seq, e.type, e.data) for e in events] == [
        (seq, "step", {"n": step}) for step, seq in enumerate(appended)
    ]


async def test_appending_an_event_id_again_adds_nothing(store: StateStore) -> None:
    log = store.events("run-1")

    first = await log.append("charged", {"amount": 5}, event_id="input-42")
    again = await log.append("charged", {"amount": 5}, event_id="input-42")

    assert again == first
    assert [(e.id, e.seq) for e in await log.replay()] == [("input-42", first)]


async def test_the_same_event_id_in_two_correlation_ids_is_two_events(store: StateStore) -> None:
    await store.events("run-1").append("started", None, event_id="e1")
    await store.events("run-2").append("started", None, event_id="e1")

    assert len(await store.events("run-2").replay()) == 1


async def test_replay_of_a_log_never_appended_to_is_empty(store: StateStore) -> None:
    assert await store.events("run-1").replay() == []


async def test_follow_yields_past_events_then_new_ones(store: StateStore) -> None:
    log = store.events("run-1")
    await log.append("started", {})

    async with asyncio.timeout(DEADLINE), log.follow() as events:
        assert (await anext(events)).type == "started"
        seq = await log.append("finished", {"ok": True})
        latest = await anext(events)

    assert (latest.seq, latest.type, latest.data) == (seq, "finished", {"ok": True})


def test_a_correlation_id_that_is_a_wildcard_is_refused(store: StateStore) -> None:
    with pytest.raises(ValueError, match="correlation id"):
        store.events("run.>")
