"""Handler isolation and the limiter's bounds: sync handler threads, cancellation, backoff."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import random
import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from troupe_runtime.agent.handlers import LoadedHandler
from troupe_runtime.agent.handlers.python import SyncHandler
from troupe_runtime.agent.handlers.threads import HandlerThreads, HandlerThreadsExhausted
from troupe_runtime.agent.processing import cancelled_by_us
from troupe_runtime.agent.ratelimit import (
    CLOCK_SKEW_SECONDS,
    CONFLICT_BACKOFF_BASE,
    CONFLICT_BACKOFF_CAP,
    MIN_DEADLINE_SECONDS,
    acquire_deadline,
    conflict_backoff,
    gcra,
    plausible_tat,
)
from troupe_runtime.contract.policies import RateLimit

SHORT = 0.05
"""A timeout long enough for a thread to start, short enough to keep the tests fast."""

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")


async def eventually(condition: Any, within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


# Sync handler threads: examples.


async def test_a_thread_call_returns_the_functions_result_in_the_callers_context() -> None:
    threads = HandlerThreads(capacity=1)
    request_id.set("r-1")

    assert await threads.call(lambda n: (n + 1, request_id.get()), 41) == (42, "r-1")


@pytest.mark.parametrize("error", [SystemExit(3), KeyboardInterrupt(), ValueError("bad")])
async def test_whatever_a_thread_raises_reaches_the_caller(error: BaseException) -> None:
    def raises() -> None:
        raise error

    with pytest.raises(type(error)):
        await HandlerThreads(capacity=1).call(raises)


async def test_a_timed_out_call_frees_its_slot_and_counts_as_stuck_until_it_returns() -> None:
    threads, release = HandlerThreads(capacity=1), threading.Event()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(threads.call(release.wait), SHORT)

    assert (threads.stuck, threads.running) == (1, 0)
    assert await asyncio.wait_for(threads.call(lambda: "next"), 1.0) == "next"
    release.set()
    await eventually(lambda: threads.stuck == 0)


async def test_when_every_spare_thread_is_stuck_calls_are_refused_and_it_says_wedged() -> None:
    threads, release = HandlerThreads(capacity=1, stuck_limit=2), threading.Event()
    for _ in range(2):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(threads.call(release.wait), SHORT)
    loaded = LoadedHandler(SyncHandler(lambda ctx: None, threads))

    assert loaded.wedged()
    assert loaded.stuck_threads() == 2
    with pytest.raises(HandlerThreadsExhausted, match="2 sync handler threads are still running"):
        await threads.call(lambda: None)
    release.set()
    await eventually(lambda: not loaded.wedged())


def test_only_plain_functions_have_threads_to_count() -> None:
    async def coroutine(ctx: Any) -> None:
        return None

    assert LoadedHandler(coroutine).threads is None
    assert LoadedHandler(coroutine).stuck_threads() == 0
    assert not LoadedHandler(coroutine).wedged()
    assert HandlerThreads(capacity=3).stuck_limit == 12


# Sync handler threads: a property.


@settings(max_examples=25, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=8), st.integers(1, 3))
def test_stuck_counts_exactly_the_abandoned_calls_still_running(
    blocks: list[bool], capacity: int
) -> None:
    """Calls that block time out and stay stuck until released; the rest never count."""

    async def scenario() -> None:
        threads, release = HandlerThreads(capacity, stuck_limit=len(blocks) + 1), threading.Event()

        async def one(block: bool) -> None:
            if not block:
                assert await threads.call(int) == 0
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(threads.call(release.wait), SHORT)

        for start in range(0, len(blocks), capacity):  # never more than capacity at once
            await asyncio.gather(*(one(block) for block in blocks[start : start + capacity]))
        assert threads.stuck == sum(blocks)
        assert threads.running == 0
        release.set()
        await eventually(lambda: threads.stuck == 0)

    asyncio.run(scenario())


# Who cancelled: the handler or us.


async def test_a_cancelled_error_the_code_raises_itself_is_not_a_cancellation_of_the_task() -> None:
    async def raises() -> bool:
        try:
            raise asyncio.CancelledError
        except asyncio.CancelledError:
            return cancelled_by_us()

    assert await asyncio.create_task(raises()) is False


async def test_a_task_being_cancelled_is_told_apart() -> None:
    seen: list[bool] = []

    async def waits() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append(cancelled_by_us())
            raise

    task = asyncio.create_task(waits())
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

    assert seen == [True]


async def test_a_timeout_is_not_taken_for_a_cancellation_once_it_fired() -> None:
    async def times_out() -> bool:
        try:
            async with asyncio.timeout(0.001):
                await asyncio.Event().wait()
        except TimeoutError:
            return cancelled_by_us()
        return True

    assert await asyncio.create_task(times_out()) is False


# The shared limiter's bounds: properties.


@given(st.integers(min_value=0, max_value=10_000), st.integers())
def test_conflict_backoff_is_jittered_within_its_exponential_cap(conflicts: int, seed: int) -> None:
    delay = conflict_backoff(conflicts, random.Random(seed))

    assert (
        0 <= delay <= min(CONFLICT_BACKOFF_CAP, CONFLICT_BACKOFF_BASE * 2.0 ** min(conflicts, 32))
    )


def test_conflict_backoff_spreads_racing_replicas() -> None:
    rng = random.Random(7)
    assert len({conflict_backoff(5, rng) for _ in range(20)}) == 20


rates = st.floats(min_value=0.001, max_value=10_000)
bursts = st.integers(min_value=1, max_value=10_000)
clocks = st.floats(min_value=0, max_value=4e9)


@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), clocks), clocks, rates, bursts)
def test_a_stored_tat_never_throttles_longer_than_one_interval_plus_skew(
    tat: float, now: float, rate: float, burst: int
) -> None:
    decision = gcra(plausible_tat(tat, now, rate, burst), now, rate, burst)

    assert math.isfinite(decision.wait)
    assert decision.wait <= 1.0 / rate + CLOCK_SKEW_SECONDS + 1e-6 * max(1.0, now)


@given(clocks, rates, bursts, st.floats(min_value=0, max_value=1))
def test_any_tat_a_replica_can_write_is_kept(
    now: float, rate: float, burst: int, share: float
) -> None:
    tat = now + share * burst / rate

    assert plausible_tat(tat, now, rate, burst) == tat


@given(rates, bursts)
def test_one_acquire_is_bounded_but_outlasts_any_fair_wait(rate: float, burst: int) -> None:
    deadline = acquire_deadline(RateLimit(rate=rate, burst=burst))

    assert deadline >= MIN_DEADLINE_SECONDS
    assert deadline >= 4.0 / rate
    assert math.isfinite(deadline)
