"""Which priority level the next free slot is offered to.

Weights double per level (2^p), so higher priorities are taken first, and
every level is floored at a minimum share, so a steady stream of urgent
messages never starves the lowest level. Smooth weighted round-robin turns
the weights into an order that interleaves levels evenly instead of in bursts.
"""

from __future__ import annotations

MIN_SHARE = 0.05


def priority_weights(levels: int, min_share: float = MIN_SHARE) -> list[float]:
    """Each level's share of the slots while every level has messages; sums to 1."""
    raw = [2.0**priority for priority in range(levels)]
    floored = [max(weight / sum(raw), min_share) for weight in raw]
    return [weight / sum(floored) for weight in floored]


class PriorityScheduler:
    """Smooth weighted round-robin over priority levels (as in nginx's upstreams)."""

    def __init__(self, levels: int, min_share: float = MIN_SHARE) -> None:
        self._weights = priority_weights(levels, min_share)
        self._current = [0.0] * levels

    def next(self) -> int:
        for priority, weight in enumerate(self._weights):
            self._current[priority] += weight
        chosen = max(range(len(self._current)), key=lambda p: (self._current[p], p))
        self._current[chosen] -= 1.0
        return chosen

    def allot(self, slots: int) -> list[int]:
        """How many of ``slots`` to offer each level, first, in one fetch round."""
        counts = [0] * len(self._weights)
        for _ in range(slots):
            counts[self.next()] += 1
        return counts
