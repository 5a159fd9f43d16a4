"""The budget guard against a real nats-server: concurrent replicas never overspend past the
holds in flight and the ledger counts exactly what they committed; a refusal releases the
other budgets' holds; a nats-server killed and restarted keeps the ledger (and the
definitions' watch carries on); junk definitions and ledgers are survived; a call no budget
applies to does no I/O at all."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import random
import signal
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from troupe_devcluster import components, launcher, processes
from troupe_devcluster.layout import Layout
from troupe_runtime.contract import budget as plan
from troupe_runtime.contract import naming
from troupe_runtime.contract.budget import (
    Amount,
    BudgetDefinition,
    BudgetExceeded,
    BudgetUnavailable,
    Ledger,
    SpendContext,
)
from troupe_runtime.serving.metrics import RuntimeMetrics
from troupe_runtime.state.budgets import (
    BudgetGuard,
    Definitions,
    Reservation,
    decode,
    open_budget_bucket,
)

DEADLINE = 60.0


def definition(name: str, hard: int | None, **extra: object) -> BudgetDefinition:
    return BudgetDefinition.model_validate(
        {
            "name": name,
            "generation": 1,
            "scope": "Namespace",
            "window": {"type": "Day"},
            "limits": {"tokens": {"hard": hard}} if hard else {"costUsd": {"hard": 1e6}},
            **extra,
        }
    )


async def put_definition(kv: KeyValue, d: BudgetDefinition) -> None:
    await kv.put(naming.budget_definition_key(d.name), d.model_dump_json(by_alias=True).encode())


def spend(hold_id: str, agent: str = "agent", run: str | None = None) -> SpendContext:
    return SpendContext(agent=agent, workflow=None, run=run, hold_id=hold_id)


async def ledger_of(kv: KeyValue, d: BudgetDefinition, run: str | None = None) -> Ledger:
    wid = plan.window_id(d.window, plan_now(), run)
    assert wid is not None
    entry = await kv.get(naming.budget_ledger_key(d.name, wid))
    ledger = decode(entry.value, wid)
    assert ledger is not None
    return ledger


def plan_now() -> float:
    return time.time()


async def eventually(check: Callable[[], object], what: str) -> None:
    """Poll ``check()`` (its result awaited if awaitable; truthy when done) until the
    deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"not within {DEADLINE:g}s: {what}")
        await asyncio.sleep(0.05)


@dataclass
class Replica:
    """One runtime's budget machinery on a connection of its own."""

    nc: Client
    js: JetStreamContext
    definitions: Definitions
    guard: BudgetGuard
    metrics: RuntimeMetrics = field(default_factory=RuntimeMetrics)


@asynccontextmanager
async def replica(
    url: str, namespace: str, reserve_deadline: float = 10.0, linger: float = 0.0
) -> AsyncIterator[Replica]:
    nc = await nats.connect(url, reconnect_time_wait=0.2, max_reconnect_attempts=-1)
    js = nc.jetstream()
    metrics = RuntimeMetrics()
    definitions = Definitions(namespace, metrics.budget)
    await definitions.start(js)
    guard = BudgetGuard(
        namespace,
        definitions,
        metrics=metrics.budget,
        reserve_deadline=reserve_deadline,
        linger=linger,
    )
    guard.use(js)
    try:
        yield Replica(nc, js, definitions, guard, metrics)
    finally:
        await guard.aclose(grace=0)
        await definitions.stop()
        await nc.close()


@asynccontextmanager
async def bucket(url: str, namespace: str) -> AsyncIterator[KeyValue]:
    nc = await nats.connect(url)
    try:
        yield await open_budget_bucket(nc.jetstream(), namespace)
    finally:
        await nc.close()


def fresh_namespace() -> str:
    return f"bg{uuid.uuid4().hex[:10]}"


async def test_concurrent_replicas_never_overspend_past_holds_and_count_exactly(
    nats_url: str,
) -> None:
    """3 replicas, 10 concurrent callers on one budget. Every ledger revision (watched
    live) has spent + held ≤ hard while calls spend at most their hold; the callers that
    overran their hold (an estimate too low) take spent past hard by at most their
    overruns; at the end the ledger's spent is exactly what was committed, no hold is
    left, and its refusals are exactly the BudgetExceeded the callers saw."""
    namespace, hard = fresh_namespace(), 20_000
    d = definition("shared", hard)
    rng = random.Random(13)
    committed: list[int] = []
    overruns: list[int] = []
    refused: list[BudgetExceeded] = []
    revisions: list[Ledger] = []

    async with bucket(nats_url, namespace) as kv:
        await put_definition(kv, d)
        wid = plan.window_id(d.window, plan_now(), None)
        assert wid is not None
        watcher = await kv.watch(naming.budget_ledger_key(d.name, wid))

        async def follow() -> None:
            async for entry in watcher:
                if entry is not None and entry.value:
                    ledger = decode(entry.value, wid)
                    assert ledger is not None
                    revisions.append(ledger)

        following = asyncio.create_task(follow())

        async def caller(r: Replica, name: str) -> None:
            for turn in range(12):
                asked = rng.randint(100, 500)
                try:
                    reservation = await r.guard.reserve(
                        spend(f"{name}:{turn}"), Amount(tokens=asked)
                    )
                except BudgetExceeded as error:
                    refused.append(error)
                    continue
                await asyncio.sleep(rng.uniform(0, 0.005))  # the model call
                if rng.random() < 0.15:
                    await reservation.release()  # a 429: nothing spent
                    continue
                over = rng.randint(1, 50) if rng.random() < 0.1 else 0
                actual = rng.randint(0, asked) if not over else asked + over
                await reservation.commit(Amount(tokens=actual))
                await reservation.commit(Amount(tokens=actual))  # twice is once
                committed.append(actual)
                overruns.append(over)

        async with (
            replica(nats_url, namespace) as a,
            replica(nats_url, namespace) as b,
            replica(nats_url, namespace) as c,
        ):
            await asyncio.gather(
                *(
                    caller(r, f"{r_name}{i}")
                    for r, r_name in ((a, "a"), (b, "b"), (c, "c"))
                    for i in range(10)
                )
            )
            await asyncio.gather(*(r.guard.settled() for r in (a, b, c)))
            final = await ledger_of(kv, d)

        await eventually(lambda: revisions and revisions[-1] == final, "the watch saw the end")
        await watcher.stop()  # type: ignore[no-untyped-call]
        following.cancel()

    assert refused, "the budget was never exhausted: the test proves nothing"
    assert final.holds == {}
    assert final.reaped == {}
    assert final.spent.tokens == sum(committed)
    assert final.refusals == len(refused)
    # Only the calls that overran their hold can take the window past hard, by their overrun.
    assert any(overruns)
    assert final.spent.tokens <= hard + sum(overruns)
    for ledger in revisions:
        assert ledger.spent.tokens + plan.held(ledger, plan_now()).tokens <= hard + sum(overruns)
    assert max(
        ledger.spent.tokens + plan.held(ledger, plan_now()).tokens for ledger in revisions
    ) > (hard - 500), "the holds never came near the limit: the test proves nothing"


async def test_one_replicas_calls_never_race_each_other_and_a_cancelled_one_stops_none(
    nats_url: str,
) -> None:
    """50 concurrent calls in one replica: their holds and commits queue per ledger and go
    in shared writes, so not one compare-and-set is lost; the caller writing for the
    others being cancelled leaves the others' holds to be written all the same."""
    namespace = fresh_namespace()
    d = definition("cap", 10**9)
    async with bucket(nats_url, namespace) as kv, replica(nats_url, namespace) as r:
        await put_definition(kv, d)
        await eventually(lambda: r.definitions.all(), "the definition seen")

        async def call(index: int) -> None:
            reservation = await r.guard.reserve(spend(f"c{index}"), Amount(tokens=10))
            await reservation.commit(Amount(tokens=index))

        await asyncio.gather(*(call(i) for i in range(50)))
        await r.guard.settled()
        conflicts = r.metrics.registry.get_sample_value(
            "troupe_budget_conflicts_total", {"budget": "cap"}
        )
        assert conflicts is None  # never counted: not one race lost
        ledger = await ledger_of(kv, d)
        assert ledger.spent == Amount(tokens=sum(range(50)))
        assert ledger.holds == {}

        first = asyncio.create_task(r.guard.reserve(spend("cancelled"), Amount(tokens=1)))
        await asyncio.sleep(0)  # it runs to its first suspension: its write, in flight
        others = [
            asyncio.create_task(r.guard.reserve(spend(f"o{i}"), Amount(tokens=1)))
            for i in range(10)
        ]
        first.cancel()
        held = await asyncio.gather(*others)
        assert all(h.budgets == ["cap"] for h in held)
        assert {f"o{i}" for i in range(10)} <= set((await ledger_of(kv, d)).holds)
        for h in held:
            await h.release()

        # The cancelled caller's hold, if its write went out, is taken back.
        async def no_holds() -> bool:
            return (await ledger_of(kv, d)).holds == {}

        await eventually(no_holds, "no hold left")


async def test_a_refusal_releases_the_other_budgets_holds(nats_url: str) -> None:
    namespace = fresh_namespace()
    roomy, tight = definition("roomy", 10_000), definition("tight", 100)
    async with bucket(nats_url, namespace) as kv, replica(nats_url, namespace) as r:
        await put_definition(kv, roomy)
        await put_definition(kv, tight)
        await eventually(lambda: len(r.definitions.all()) == 2, "both definitions seen")
        with pytest.raises(BudgetExceeded) as refused:
            await r.guard.reserve(spend("big"), Amount(tokens=200))
        assert refused.value.budget == "tight"
        assert (await ledger_of(kv, roomy)).holds == {}
        assert (await ledger_of(kv, tight)).refusals == 1
        fits = await r.guard.reserve(spend("small"), Amount(tokens=60))
        assert sorted(fits.budgets) == ["roomy", "tight"]
        await fits.commit(Amount(tokens=50))
        await r.guard.settled()
        assert (await ledger_of(kv, roomy)).spent == Amount(tokens=50)
        assert (await ledger_of(kv, tight)).spent == Amount(tokens=50)
        counts = r.metrics.registry.get_sample_value
        assert counts("troupe_budget_holds_total", {"budget": "tight", "outcome": "refused"}) == 1
        assert counts("troupe_budget_spent_tokens_total", {"budget": "roomy"}) == 50


async def test_a_commit_goes_in_the_next_holds_write_and_is_never_lost(nats_url: str) -> None:
    """A commit does not wait for its write. With a linger, the next hold on the ledger
    carries it, in one compare-and-set that sees the room it freed, and ``aclose`` writes
    what is still queued; until then the ledger shows the hold (never less than was spent).
    By default it is written at once, in the background."""
    namespace = fresh_namespace()
    d = definition("cap", 1000)
    wid = plan.window_id(d.window, plan_now(), None)
    assert wid is not None
    key = naming.budget_ledger_key(d.name, wid)
    async with bucket(nats_url, namespace) as kv:
        await put_definition(kv, d)
        async with replica(nats_url, namespace, linger=3600.0) as r:
            first = await r.guard.reserve(spend("one"), Amount(tokens=600))
            written = (await kv.get(key)).revision or 0
            await first.commit(Amount(tokens=500))
            assert (await kv.get(key)).revision == written  # not written yet...
            assert set((await ledger_of(kv, d)).holds) == {"one"}  # ...the hold stands
            # 500 spent leaves room for 400: the hold sees the commit it carries.
            second = await r.guard.reserve(spend("two"), Amount(tokens=450))
            entry = await kv.get(key)
            assert entry.revision == written + 1  # one write: the commit and the hold
            ledger = decode(entry.value, wid)
            assert ledger is not None
            assert (ledger.spent, set(ledger.holds)) == (Amount(tokens=500), {"two"})
            await second.commit(Amount(tokens=400))
            await r.guard.aclose()  # shutting down: the queued commit is written
            ledger = await ledger_of(kv, d)
            assert (ledger.spent, ledger.holds) == (Amount(tokens=900), {})
        async with replica(nats_url, namespace) as r:  # no linger: written at once
            third = await r.guard.reserve(spend("three"), Amount(tokens=50))
            await third.commit(Amount(tokens=40))

            async def committed() -> bool:
                return (await ledger_of(kv, d)).spent == Amount(tokens=940)

            await eventually(committed, "the commit written alone")
            assert (await ledger_of(kv, d)).holds == {}


async def test_each_run_has_its_own_window_and_a_call_in_no_run_is_not_counted(
    nats_url: str,
) -> None:
    namespace = fresh_namespace()
    per_run = definition("per-run", 100, window={"type": "Run"})
    async with bucket(nats_url, namespace) as kv, replica(nats_url, namespace) as r:
        await put_definition(kv, per_run)
        await eventually(lambda: r.definitions.all(), "the definition seen")
        one = await r.guard.reserve(spend("1", run="run-1"), Amount(tokens=90))
        two = await r.guard.reserve(spend("2", run="run-2"), Amount(tokens=90))
        assert one.budgets == two.budgets == ["per-run"]
        with pytest.raises(BudgetExceeded):
            await r.guard.reserve(spend("3", run="run-1"), Amount(tokens=20))
        outside = await r.guard.reserve(spend("4"), Amount(tokens=10**6))
        assert outside.budgets == []
        await one.commit(Amount(tokens=80))
        await two.release()
        await r.guard.settled()
        assert (await ledger_of(kv, per_run, "run-1")).spent == Amount(tokens=80)
        assert (await ledger_of(kv, per_run, "run-2")).spent == Amount()


async def test_no_applicable_budget_means_no_io_at_all(nats_url: str) -> None:
    """The guard is never given a session: any KV call would raise BudgetUnavailable."""
    namespace = fresh_namespace()
    async with bucket(nats_url, namespace) as kv:
        await put_definition(kv, definition("theirs", 10, scope="Agents", agents=["other"]))
        nc = await nats.connect(nats_url)
        try:
            definitions = Definitions(namespace)
            await definitions.start(nc.jetstream())
            guard = BudgetGuard(namespace, definitions)
            reservation = await guard.reserve(spend("h", agent="mine"), Amount(tokens=10**9))
            assert reservation.budgets == []
            await reservation.commit(Amount(tokens=10**9))
            with pytest.raises(BudgetUnavailable, match="no NATS session"):
                await guard.reserve(spend("h", agent="other"), Amount(tokens=1))
            await definitions.stop()
        finally:
            await nc.close()


async def test_definitions_follow_changes_and_survive_junk(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    namespace = fresh_namespace()
    async with bucket(nats_url, namespace) as kv:
        await kv.put("def.junk", b"\xff{not json")
        await put_definition(kv, definition("cap", 100))
        async with replica(nats_url, namespace) as r:
            assert [x.name for x in r.definitions.all()] == ["cap"]
            await put_definition(kv, definition("cap", 50))
            await eventually(
                lambda: r.definitions.all()[0].limits.tokens.hard == 50,  # type: ignore[union-attr]
                "the lowered limit seen",
            )
            # Junk over a good definition keeps the good one.
            with caplog.at_level(logging.ERROR):
                await kv.put("def.cap", b'{"name": "cap"}')
                await put_definition(kv, definition("other", 10))
                await eventually(lambda: len(r.definitions.all()) == 2, "the next one seen")
            assert r.definitions.get("cap") is not None
            assert "does not parse" in caplog.text
            await kv.delete("def.cap")
            await eventually(lambda: r.definitions.get("cap") is None, "the deletion seen")
            counts = r.metrics.registry.get_sample_value
            assert counts("troupe_budget_junk_total", {"kind": "definition"}) == 2
            # A definition filed under another budget's key: its holds would never settle.
            misfiled = definition("cap", 5).model_dump_json(by_alias=True).encode()
            await kv.put("def.alias", misfiled)
            await eventually(
                lambda: counts("troupe_budget_junk_total", {"kind": "definition"}) == 3,
                "the misfiled definition counted as junk",
            )
            assert sorted(x.name for x in r.definitions.all()) == ["other"]


async def test_start_returns_with_every_definition_in(nats_url: str) -> None:
    """The initial values' end is counted, not taken from nats-py's early marker: 40 starts
    on 30 definitions (and a deleted one), each returns with all 30."""
    namespace = fresh_namespace()
    async with bucket(nats_url, namespace) as kv:
        for index in range(30):
            await put_definition(kv, definition(f"b{index}", 100 + index))
        await put_definition(kv, definition("gone", 1))
        await kv.delete(naming.budget_definition_key("gone"))
        nc = await nats.connect(nats_url)
        try:
            for _ in range(40):
                definitions = Definitions(namespace)
                await definitions.start(nc.jetstream())
                assert len(definitions.all()) == 30
                await definitions.stop()
        finally:
            await nc.close()


async def test_a_junk_ledger_is_replaced_not_obeyed(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    namespace = fresh_namespace()
    d = definition("cap", 1000)
    wid = plan.window_id(d.window, plan_now(), None)
    assert wid is not None
    key = naming.budget_ledger_key(d.name, wid)
    async with bucket(nats_url, namespace) as kv, replica(nats_url, namespace) as r:
        await put_definition(kv, d)
        await eventually(lambda: r.definitions.all(), "the definition seen")
        for junk in (
            b"garbage",
            b'{"window": "d19700101", "started": 0}',  # another window's
            b'{"window": "%s", "started": 0, "spent": {"tokens": -5}}' % wid.encode(),
        ):
            await kv.put(key, junk)
            caplog.clear()
            with caplog.at_level(logging.ERROR):
                reservation = await r.guard.reserve(spend(f"h{len(junk)}"), Amount(tokens=10))
            assert "is junk" in caplog.text
            await reservation.commit(Amount(tokens=10))
            await r.guard.settled()
            assert (await ledger_of(kv, d)).spent == Amount(tokens=10)
        # A parseable ledger with a hold no guard could have written: dropped, uncharged.
        wedge = plan.fresh_ledger(d.window, wid, plan_now()).model_copy(
            update={
                "holds": {"x": plan.Hold(amount=Amount(tokens=10**9), expires=plan_now() + 1e9)}
            }
        )
        await kv.put(key, wedge.model_dump_json(by_alias=True).encode())
        reservation = await r.guard.reserve(spend("after-wedge"), Amount(tokens=900))
        await reservation.commit(Amount(tokens=900))
        await r.guard.settled()
        assert (await ledger_of(kv, d)).spent == Amount(tokens=900)


# A nats-server of the test's own, killed and started again on the same storage.


@pytest.fixture
def own_nats() -> Iterator[Layout]:
    layout = launcher.up_nats()
    try:
        yield layout
    finally:
        launcher.down(layout)


def kill_nats(layout: Layout) -> None:
    pid = layout.pids.pop("nats-server")
    os.killpg(pid, signal.SIGKILL)  # its own session: the group is the server alone
    processes.stop([pid], grace_seconds=5)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


async def start_nats(layout: Layout) -> None:
    server = components.nats_server(layout)
    layout.pids[server.name] = processes.start(server.argv, layout.log_of(server.name))
    await eventually(
        lambda: asyncio.to_thread(healthy, server.health_url), "nats-server healthy again"
    )


async def test_a_killed_nats_server_loses_nothing_and_the_guard_fails_closed_meanwhile(
    own_nats: Layout,
) -> None:
    """Committed spending and a hold in flight survive SIGKILL; while the server is down a
    hold is BudgetUnavailable (never granted unchecked) and a commit goes on in the
    background; after the restart the late commit lands, the hold asked while down is taken
    back if it landed, the hold in flight commits on the same connection, and the
    definitions' watch sees a new Budget."""
    namespace, url = fresh_namespace(), own_nats.nats_url
    d = definition("cap", 10_000)
    async with replica(url, namespace, reserve_deadline=1.0) as r:
        kv = await open_budget_bucket(r.js, namespace)
        await put_definition(kv, d)
        await eventually(lambda: r.definitions.all(), "the definition seen")
        done = await r.guard.reserve(spend("done"), Amount(tokens=100))
        await done.commit(Amount(tokens=40))
        in_flight: Reservation = await r.guard.reserve(spend("flying"), Amount(tokens=300))
        answered = await r.guard.reserve(spend("answered"), Amount(tokens=200))

        await asyncio.to_thread(kill_nats, own_nats)
        with pytest.raises(BudgetUnavailable):
            await r.guard.reserve(spend("while-down"), Amount(tokens=1))
        await answered.commit(Amount(tokens=120))  # queued: written once the server is back
        await start_nats(own_nats)
        await eventually(lambda: r.nc.is_connected, "the connection is back")

        async def only_the_hold_in_flight() -> bool:
            ledger = await ledger_of(kv, d)
            assert ledger.spent.tokens in (40, 160)
            return ledger.spent.tokens == 160 and set(ledger.holds) == {"flying"}

        await eventually(only_the_hold_in_flight, "the late commit in, the one hold left")
        await in_flight.commit(Amount(tokens=250))
        await r.guard.settled()
        ledger = await ledger_of(kv, d)
        assert ledger.spent == Amount(tokens=410)
        assert ledger.holds == {}

        await put_definition(kv, definition("later", 5))
        await eventually(lambda: r.definitions.get("later") is not None, "the watch goes on")
        with pytest.raises(BudgetExceeded):
            await r.guard.reserve(spend("too-big"), Amount(tokens=6))
