"""The circuit breaker: open after 5 consecutive outages, one trial after 30 s."""

from __future__ import annotations

from troupe_runtime.agent.llm.breaker import CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def opened(clock: FakeClock) -> CircuitBreaker:
    breaker = CircuitBreaker(clock=clock)
    for _ in range(5):
        assert breaker.allow()
        breaker.failure()
    return breaker


def test_four_outages_keep_it_closed() -> None:
    breaker = CircuitBreaker(clock=FakeClock())
    for _ in range(4):
        breaker.failure()
    assert breaker.state == "closed"
    assert breaker.allow()


def test_five_consecutive_outages_open_it() -> None:
    breaker = opened(FakeClock())
    assert breaker.state == "open"
    assert not breaker.allow()


def test_a_success_resets_the_count() -> None:
    breaker = CircuitBreaker(clock=FakeClock())
    for _ in range(4):
        breaker.failure()
    breaker.success()
    for _ in range(4):
        breaker.failure()
    assert breaker.state == "closed"


def test_after_30_seconds_exactly_one_trial_goes_through() -> None:
    clock = FakeClock()
    breaker = opened(clock)
    clock.now += 29.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.state == "half_open"
    assert breaker.allow()
    assert not breaker.allow()


def test_a_successful_trial_closes_it() -> None:
    clock = FakeClock()
    breaker = opened(clock)
    clock.now += 30
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed"
    assert breaker.allow()


def test_a_failed_trial_opens_it_for_another_period() -> None:
    clock = FakeClock()
    breaker = opened(clock)
    clock.now += 30
    assert breaker.allow()
    breaker.failure()
    assert breaker.state == "open"
    clock.now += 29
    assert not breaker.allow()
    clock.now += 1
    assert breaker.allow()


def test_a_released_trial_frees_the_slot() -> None:
    clock = FakeClock()
    breaker = opened(clock)
    clock.now += 30
    assert breaker.allow()
    breaker.release()
    assert breaker.allow()
