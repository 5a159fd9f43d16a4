"""GCRA with a cost, as provider token budgets use it: per-minute limits as buckets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from troupe_runtime.agent.llm.router import per_minute_limit
from troupe_runtime.agent.ratelimit import LocalLimiter, Throttled, debit, gcra

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
