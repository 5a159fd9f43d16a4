"""GCRA with a cost, as provider token budgets use it: per-minute limits as buckets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from troupe_runtime.agent.llm.router import per_minute_limit
from troupe_runtime.agent.ratelimit import (
    MAX_DEBT_BUCKETS,
    LocalLimiter,
    Throttled,
    debit,
    gcra,
    next_take,
    owed_after,
    unpaid,
)

RATE = st.floats(min_value=0.01, max_value=1e6)
BURST = st.integers(min_value=1, max_value=10_000)
TIME = st.floats(min_value=0, max_value=1e6)


@given(TIME, TIME, RATE, BURST)
def test_a_cost_of_one_is_the_plain_step(tat: float, now: float, rate: float, burst: int) -> None:
    assert gcra(tat, now, rate, burst, 1.0) == gcra(tat, now, rate, burst)


@given(TIME, TIME, RATE, BURST, st.floats(min_value=0, max_value=1e9))
def test_the_tat_never_runs_more_than_a_burst_ahead(
    tat: float, now: float, rate: float, burst: int, cost: float
) -> None:
    decision = gcra(min(tat, now + burst / rate), now, rate, burst, cost)
    if decision.allowed:
        # What plausible_tat relies on to tell a real TAT from junk in the KV key.
        ceiling = now + burst / rate
        assert decision.tat <= ceiling + 1e-9 * ceiling
    else:
        assert decision.wait > 0


def test_a_cost_above_the_burst_takes_the_whole_bucket() -> None:
    assert gcra(0.0, 100.0, rate=1, burst=10, cost=50).allowed
    assert not gcra(110.0, 100.0, rate=1, burst=10, cost=50).allowed


@pytest.mark.parametrize(("per_minute", "burst"), [(1, 1), (6, 1), (60, 10), (90_000, 15_000)])
def test_a_minute_budget_bursts_ten_seconds_worth(per_minute: int, burst: int) -> None:
    limit = per_minute_limit(per_minute, "replica")
    assert limit.rate == pytest.approx(per_minute / 60)
    assert limit.burst == burst


async def test_a_wait_beyond_max_wait_raises_at_once() -> None:
    now = [0.0]
    limiter = LocalLimiter(per_minute_limit(6, "replica"), clock=lambda: now[0])
    assert not await limiter.acquire(1.0, max_wait=0.1)
    with pytest.raises(Throttled) as caught:
        await limiter.acquire(1.0, max_wait=0.1)
    assert caught.value.wait == pytest.approx(10.0)


@given(TIME, TIME, RATE, BURST, st.floats(min_value=0, max_value=1e9))
def test_a_debit_is_never_refused_and_never_runs_more_than_a_burst_ahead(
    tat: float, now: float, rate: float, burst: int, cost: float
) -> None:
    after = debit(tat, now, rate, burst, cost)
    ceiling = now + burst / rate
    slack = 1e-9 * max(1.0, ceiling)
    assert after >= min(max(tat, now), ceiling) - slack
    assert after <= ceiling + slack


@given(
    TIME, st.floats(min_value=0, max_value=1e3), RATE, BURST, st.floats(min_value=0, max_value=1e9)
)
def test_what_a_debit_has_no_room_for_is_owed_and_the_rest_charged(
    now: float, ahead: float, rate: float, burst: int, cost: float
) -> None:
    tat = now + min(ahead, burst / rate)  # any TAT a limiter can hold
    owed = unpaid(tat, now, rate, burst, cost)
    after = debit(tat, now, rate, burst, cost)
    assert 0 <= owed <= cost
    charged = (after - max(tat, now)) * rate
    assert charged + owed == pytest.approx(cost, rel=1e-6, abs=1e-3 * max(1.0, burst))


@given(st.floats(min_value=0, max_value=50), BURST, st.floats(min_value=0, max_value=1e9))
def test_an_acquire_pays_its_debt_a_bucket_at_a_time_then_its_cost(
    buckets: float, burst: int, cost: float
) -> None:
    owed = buckets * burst
    paid, steps = 0.0, 0
    while True:
        take, done = next_take(cost, owed - paid, burst)
        steps += 1
        if done:
            break
        assert 0 < take <= burst  # each take fits a bucket, so GCRA lets it through
        paid += take
    assert take == pytest.approx(cost + owed - paid)
    assert take <= burst or owed - paid == 0  # a cost alone may be larger: gcra caps it
    assert steps <= 2 + owed / burst


async def spent_over(
    per_minute: int, estimate: int, over: int, latency: float, horizon: float
) -> float:
    """Tokens one caller spends in ``horizon`` seconds, asking as fast as the limit lets it:
    each call takes ``estimate`` and, ``latency`` later, is charged ``over`` more."""
    now = [0.0]
    limiter = LocalLimiter(per_minute_limit(per_minute, "replica"), clock=lambda: now[0])
    spent = 0.0
    while now[0] < horizon:
        try:
            await limiter.acquire(float(estimate), max_wait=0.0)
        except Throttled as throttled:
            now[0] += throttled.wait
            continue
        now[0] += latency
        await limiter.charge(float(over))
        spent += estimate + over
    return spent


@settings(deadline=None, max_examples=50)
@given(
    estimate=st.integers(20, 500),
    over=st.integers(0, 2000),
    latency=st.floats(min_value=0.0, max_value=3.0),
)
async def test_completions_using_more_than_their_estimate_keep_to_the_limit(
    estimate: int, over: int, latency: float
) -> None:
    """A bucket kept empty forgave every overage: spending ran past the limit by as much as
    the answers used beyond their estimates. Owed, it is paid by the next call."""
    per_minute, horizon = 6000, 120.0
    limit = per_minute_limit(per_minute, "replica")
    spent = await spent_over(per_minute, estimate, over, latency, horizon)
    # The burst, the rate over the horizon, and the last call's whole cost at most.
    assert spent <= limit.burst + limit.rate * horizon + 2 * (estimate + over)


@given(
    overages=st.lists(st.floats(min_value=0, max_value=1e12), min_size=1, max_size=20),
    burst=st.integers(min_value=1, max_value=10_000),
)
def test_debt_stays_within_a_few_buckets(overages: list[float], burst: int) -> None:
    """A provider reporting absurd usage makes the next calls wait a minute, not years."""
    owed = 0.0
    for overage in overages:
        owed = owed_after(owed, overage, burst)
        assert 0 <= owed <= MAX_DEBT_BUCKETS * burst
