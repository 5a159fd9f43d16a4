"""A circuit breaker per provider: stop asking a provider that keeps failing.

Closed, it counts consecutive outages (5xx, timeouts, refused connections); at
``threshold`` it opens and every call skips the provider (the router falls back at once
instead of waiting on a dead endpoint). After ``reset_after`` seconds it lets one trial
call through (half-open): success closes it, failure opens it for another period.
Any answer that is not an outage (a completion, a 429, a 400) proves the provider is up.
Process-local on purpose: each replica learns an outage from its own calls, in seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

DEFAULT_THRESHOLD = 5
DEFAULT_RESET_AFTER_SECONDS = 30.0

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Allow, then report the call's end with ``success``, ``failure`` or ``release``."""

    def __init__(
        self,
        threshold: int = DEFAULT_THRESHOLD,
        reset_after: float = DEFAULT_RESET_AFTER_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.reset_after = reset_after
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial = False

    @property
    def state(self) -> State:
        if self._opened_at is None:
            return "closed"
        if self._trial or self._clock() - self._opened_at >= self.reset_after:
            return "half_open"
        return "open"

    @property
    def failures(self) -> int:
        """Consecutive outages counted so far."""
        return self._failures

    def allow(self) -> bool:
        """May a call go to the provider now? Half-open, only the one trial may."""
        if self._opened_at is None:
            return True
        if self._trial or self._clock() - self._opened_at < self.reset_after:
            return False
        self._trial = True
        return True

    def success(self) -> None:
        """The provider answered (anything but an outage): close."""
        self._failures = 0
        self._opened_at = None
        self._trial = False

    def failure(self) -> None:
        """An outage: count it; at the threshold, or on a failed trial, open."""
        self._failures += 1
        if self._trial or self._failures >= self.threshold:
            self._opened_at = self._clock()
        self._trial = False

    def release(self) -> None:
        """The call ended without telling (cancelled, throttled before it went out)."""
        self._trial = False
