"""Shared-state buckets against a real nats-server: each conflict policy, access and watches.

A "rival" writer commits from its own connection inside the update function,
that is between our read and our write, so every conflict here is certain,
not a matter of timing.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import nats
import pytest
from nats.aio.client import Client as NATS

from troupe_runtime.contract.agent_config import RuntimeConfig
from troupe_runtime.contract.agent_resources import build_agent_resources
from troupe_runtime.contract.policies import StateBucket
from troupe_runtime.nats.provision import ensure_agent_resources
from troupe_runtime.state import (
    Bucket,
    BucketNotProvisionedError,
    Change,
    ConflictError,
    KeyExistsError,
    LockTimeoutError,
    ReadOnlyBucketError,
    StateStore,
    Tuning,
    UnknownBucketError,
)

Policy = Literal["retry", "fail", "lastWriterWins", "merge", "lock"]
DEADLINE = 30.0
BUCKET = "shared"


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    connection = await nats.connect(nats_url)
    yield connection
    await connection.close()


def _config(
    policy: Policy = "retry", access: Literal["ReadOnly", "ReadWrite"] = "ReadWrite"
) -> RuntimeConfig:
    return RuntimeConfig(
        agent="writer",
        namespace=f"state-{uuid.uuid4().hex[:10]}",
        state=[StateBucket(name=BUCKET, access=access, conflict_policy=policy)],
    )


async def _provisioned(nc: NATS, policy: Policy, **access: Any) -> RuntimeConfig:
    config = _config(policy, **access)
    await ensure_agent_resources(nc.jetstream(), build_agent_resources(config))
    return config


def _rival_put(nats_url: str, config: RuntimeConfig, key: str, value: Any) -> None:
    """Commit ``value`` from another connection, and return only once it is committed."""

    async def put() -> None:
        connection = await nats.connect(nats_url)
        try:
            kv = await connection.jetstream().key_value(config.bucket(BUCKET))
            await kv.put(key, json.dumps(value).encode())
        finally:
            await connection.close()

    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(lambda: asyncio.run(put())).result(timeout=DEADLINE)


def _raced(
    nats_url: str,
    config: RuntimeConfig,
    key: str,
    rival: Any,
    fn: Callable[[Any], Any],
    races: int = 1,
) -> tuple[Callable[[Any], Any], list[Any]]:
    """``fn``, but its first ``races`` calls let the rival commit first; and what it was given."""
    seen: list[Any] = []

    def raced(current: Any) -> Any:
        seen.append(current)
        if len(seen) <= races:
            _rival_put(nats_url, config, key, rival)
        return fn(current)

    return raced, seen


async def _value(bucket: Bucket, key: str) -> Any:
    entry = await bucket.get(key)
    assert entry is not None, f"{key} is absent"
    return entry.value


async def _count_concurrently(
    nats_url: str, config: RuntimeConfig, writers: int, increments: int
) -> list[str]:
    """Increment one counter from ``writers`` connections at once; return the conflicts seen."""
    conflicts: list[str] = []

    async def writer() -> None:
        connection = await nats.connect(nats_url)
        try:
            store = StateStore(connection.jetstream(), config, conflicts.append)
            bucket = await store.bucket(BUCKET)
            for _ in range(increments):
                await bucket.update("counter", lambda n: (n or 0) + 1)
        finally:
            await connection.close()

    async with asyncio.timeout(DEADLINE):
        await asyncio.gather(*(writer() for _ in range(writers)))
    return conflicts


async def test_retry_reapplies_the_function_to_the_value_a_rival_committed(
    nc: NATS, nats_url: str
) -> None:
    config = await _provisioned(nc, "retry")
    conflicts: list[str] = []
    bucket = await StateStore(nc.jetstream(), config, conflicts.append).bucket(BUCKET)
    await bucket.put("n", 0)
    bump, seen = _raced(nats_url, config, "n", 10, lambda n: n + 1)

    entry = await bucket.update("n", bump)

    assert seen == [0, 10]
    assert entry.value == 11
    assert (await bucket.get("n")) == entry
    assert conflicts == [BUCKET]


async def test_retry_gives_up_with_a_conflict_error_after_its_attempts(
    nc: NATS, nats_url: str
) -> None:
    config = await _provisioned(nc, "retry")
    conflicts: list[str] = []
    store = StateStore(nc.jetstream(), config, conflicts.append, tuning=Tuning(attempts=3))
    bucket = await store.bucket(BUCKET)
    bump, seen = _raced(nats_url, config, "n", 10, lambda n: (n or 0) + 1, races=3)

    with pytest.raises(ConflictError) as raised:
        await bucket.update("n", bump)

    assert (raised.value.key, raised.value.attempts) == ("n", 3)
    assert len(seen) == 3
    assert conflicts == [BUCKET] * 3
    assert await _value(bucket, "n") == 10


async def test_racing_writers_under_retry_lose_no_increment(nc: NATS, nats_url: str) -> None:
    config = await _provisioned(nc, "retry")

    await _count_concurrently(nats_url, config, writers=3, increments=50)

    bucket = await StateStore(nc.jetstream(), config).bucket(BUCKET)
    assert await _value(bucket, "counter") == 150


async def test_fail_raises_a_conflict_error_naming_the_stale_and_the_actual_revision(
    nc: NATS, nats_url: str
) -> None:
    config = await _provisioned(nc, "fail")
    conflicts: list[str] = []
    bucket = await StateStore(nc.jetstream(), config, conflicts.append).bucket(BUCKET)
    read = await bucket.update("n", lambda n: 1)
    bump, _ = _raced(nats_url, config, "n", 10, lambda n: n + 1)

    with pytest.raises(ConflictError) as raised:
        await bucket.update("n", bump)

    committed = await bucket.get("n")
    assert committed is not None
    assert (raised.value.key, raised.value.expected) == ("n", read.revision)
    assert (raised.value.actual, committed.value) == (committed.revision, 10)
    assert conflicts == [BUCKET]


async def test_merge_combines_concurrent_edits_of_different_fields(nc: NATS, nats_url: str) -> None:
    config = await _provisioned(nc, "merge")
    bucket = await StateStore(nc.jetstream(), config).bucket(BUCKET)
    await bucket.put("doc", {"title": "draft", "tags": ["a"], "owner": "ann"})
    retitle, _ = _raced(
        nats_url,
        config,
        "doc",
        {"title": "draft", "tags": ["a", "b"], "owner": "bob"},
        lambda doc: {**doc, "title": "final"},
    )

    entry = await bucket.update("doc", retitle)

    assert entry.value == {"title": "final", "tags": ["a", "b"], "owner": "bob"}
    assert (await bucket.get("doc")) == entry


async def test_a_registered_merge_function_resolves_conflicts(nc: NATS, nats_url: str) -> None:
    config = await _provisioned(nc, "merge")
    store = StateStore(nc.jetstream(), config)
    store.register_merge(BUCKET, lambda base, ours, theirs: theirs + ours - base)
    bucket = await store.bucket(BUCKET)
    await bucket.put("total", 100)
    add_five, _ = _raced(nats_url, config, "total", 130, lambda n: n + 5)

    entry = await bucket.update("total", add_five)

    assert entry.value == 135


async def test_last_writer_wins_overwrites_a_concurrent_write_without_conflict(
    nc: NATS, nats_url: str
) -> None:
    config = await _provisioned(nc, "lastWriterWins")
    conflicts: list[str] = []
    bucket = await StateStore(nc.jetstream(), config, conflicts.append).bucket(BUCKET)
    await bucket.put("n", 1)
    bump, _ = _raced(nats_url, config, "n", 10, lambda n: n + 1)

    entry = await bucket.update("n", bump)

    assert entry.value == 2
    assert (await bucket.get("n")) == entry
    assert conflicts == []


async def test_lock_serialises_racing_writers_so_none_conflicts(nc: NATS, nats_url: str) -> None:
    config = await _provisioned(nc, "lock")

    conflicts = await _count_concurrently(nats_url, config, writers=3, increments=20)

    bucket = await StateStore(nc.jetstream(), config).bucket(BUCKET)
    assert await _value(bucket, "counter") == 60
    assert conflicts == []


async def test_a_crashed_holders_lease_blocks_writers_until_its_ttl_expires(nc: NATS) -> None:
    config = await _provisioned(nc, "lock")
    kv = await nc.jetstream().key_value(config.bucket(BUCKET))
    await kv.create("__lock__.n", b'{"holder":"crashed"}', msg_ttl=1)
    impatient = StateStore(nc.jetstream(), config, tuning=Tuning(lock_wait=0.2))
    patient = StateStore(nc.jetstream(), config, tuning=Tuning(lock_wait=DEADLINE))

    with pytest.raises(LockTimeoutError):
        await (await impatient.bucket(BUCKET)).update("n", lambda n: 1)
    entry = await (await patient.bucket(BUCKET)).update("n", lambda n: 2)

    assert entry.value == 2


async def test_a_read_only_bucket_reads_but_refuses_every_write(nc: NATS) -> None:
    config = await _provisioned(nc, "retry", access="ReadOnly")
    kv = await nc.jetstream().key_value(config.bucket(BUCKET))
    await kv.put("n", b"1")
    bucket = await StateStore(nc.jetstream(), config).bucket(BUCKET)

    assert await _value(bucket, "n") == 1
    for write in (
        bucket.create("m", 1),
        bucket.put("n", 2),
        bucket.update("n", lambda n: n + 1),
        bucket.delete("n"),
    ):
        with pytest.raises(ReadOnlyBucketError, match="ReadOnly"):
            await write
    assert await _value(bucket, "n") == 1


async def test_an_undeclared_bucket_is_refused_naming_the_declared_ones(nc: NATS) -> None:
    store = StateStore(nc.jetstream(), _config())

    with pytest.raises(UnknownBucketError, match=r"'ledger' \(declared: shared\)"):
        await store.bucket("ledger")


async def test_a_declared_but_unprovisioned_bucket_names_the_missing_jetstream_bucket(
    nc: NATS,
) -> None:
    config = _config()

    with pytest.raises(BucketNotProvisionedError, match=config.bucket(BUCKET)):
        await StateStore(nc.jetstream(), config).bucket(BUCKET)


async def test_create_refuses_a_key_that_exists(nc: NATS) -> None:
    bucket = await StateStore(nc.jetstream(), await _provisioned(nc, "retry")).bucket(BUCKET)
    revision = await bucket.create("n", 1)

    with pytest.raises(KeyExistsError) as raised:
        await bucket.create("n", 2)

    assert raised.value.revision == revision


@pytest.mark.parametrize("policy", ["retry", "fail", "merge", "lock"])
async def test_update_of_a_deleted_key_starts_from_none(nc: NATS, policy: Policy) -> None:
    bucket = await StateStore(nc.jetstream(), await _provisioned(nc, policy)).bucket(BUCKET)
    await bucket.put("n", 5)
    await bucket.delete("n")
    seen: list[Any] = []

    def one(current: Any) -> int:
        seen.append(current)
        return 1

    entry = await bucket.update("n", one)

    assert (seen, entry.value) == ([None], 1)


async def test_a_watch_sees_the_current_value_then_puts_and_deletes_but_no_leases(
    nc: NATS,
) -> None:
    bucket = await StateStore(nc.jetstream(), await _provisioned(nc, "lock")).bucket(BUCKET)
    first = await bucket.put("orders.1", {"state": "new"})

    async with asyncio.timeout(DEADLINE), bucket.watch(">") as changes:
        assert await anext(changes) == Change("orders.1", {"state": "new"}, first, False)
        second = await bucket.update("orders.1", lambda order: {"state": "paid"})
        assert await anext(changes) == Change("orders.1", {"state": "paid"}, second.revision, False)
        await bucket.delete("orders.1")
        deleted = await anext(changes)

    assert (deleted.key, deleted.value, deleted.deleted) == ("orders.1", None, True)
