"""The session store on a real nats-server: compare-and-set writes from two replicas lose no
turn, junk under a key is overwritten, and a running message's slot is renewed, but only once
half its lease has passed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import nats
import pytest
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from troupe_runtime.agent.llm.sessions import SessionStore
from troupe_runtime.contract import naming
from troupe_runtime.contract.sessions import Exchange, SessionPolicy, SessionQueue


@pytest.fixture
async def kv(nats_url: str) -> AsyncIterator[KeyValue]:
    nc = await nats.connect(nats_url)
    bucket = await nc.jetstream().create_key_value(
        KeyValueConfig(bucket=f"sessions_{uuid.uuid4().hex[:10]}", history=1)
    )
    yield bucket
    await nc.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_two_replicas_writing_one_session_at_once_lose_no_turn(kv: KeyValue) -> None:
    policy = SessionPolicy(max_turns=100)
    replicas = [SessionStore(kv, policy, 30.0), SessionStore(kv, policy, 30.0)]

    async def write(store: SessionStore, name: str) -> None:
        for index in range(15):
            await store.record("s", Exchange(event=f"{name}{index}", user="u", assistant="a"))

    await asyncio.gather(*(write(store, name) for store, name in zip(replicas, "ab", strict=True)))
    kept = await replicas[0].history("s")
    assert sorted(turn.event for turn in kept.turns) == sorted(
        f"{name}{index}" for name in "ab" for index in range(15)
    )


async def test_junk_under_a_key_is_an_empty_history_overwritten_by_the_next_write(
    kv: KeyValue,
) -> None:
    await kv.put(naming.session_history_key("s"), b"\xff not json")
    store = SessionStore(kv, SessionPolicy(), 30.0)
    assert (await store.history("s")).turns == ()
    await store.record("s", Exchange(event="e1", user="u", assistant="a"))
    assert [turn.event for turn in (await store.history("s")).turns] == ["e1"]


async def test_a_running_slot_is_renewed_once_half_its_lease_has_passed(kv: KeyValue) -> None:
    clock = Clock()
    store = SessionStore(kv, SessionPolicy(), 10.0, clock=clock)

    async def nothing() -> None:
        return None

    await store.enter("s", "m1", nothing)
    key = naming.session_queue_key("s")
    first = await kv.get(key)
    clock.now += 4
    await store.renew("s", "m1")  # under half the lease: no I/O
    assert (await kv.get(key)).revision == first.revision
    clock.now += 2
    await store.renew("s", "m1")
    renewed = await kv.get(key)
    slot = SessionQueue.model_validate_json(renewed.value or b"").slot("m1")
    assert slot is not None
    assert slot.expires == clock.now + 10.0
    await store.leave("s", "m1")
    assert SessionQueue.model_validate_json((await kv.get(key)).value or b"").slots == ()
