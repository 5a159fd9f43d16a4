"""Budgets at run time: the definitions the operator writes, watched; the ledgers, advanced
by compare-and-set; and the guard every model call passes first.

``BudgetGuard.reserve`` takes a hold on the ledger of every budget that applies to the call
(``BudgetDefinition.applies``), in parallel; one refusal releases the others and raises
``BudgetExceeded``. The returned ``Reservation`` is committed with the call's actual usage or
released. The planning is ``contract.budget``'s; this module is its I/O.
"""

from __future__ import annotations

from collections.abc import Callable

from nats.js import JetStreamContext

from troupe_runtime.contract.budget import Amount, BudgetDefinition, SpendContext

Clock = Callable[[], float]

DEFAULT_HOLD_TTL_SECONDS = 600.0
"""How long a hold lives without its holder: past the longest model call, then charged."""


class Definitions:
    """The namespace's budget definitions, kept current by a KV watch on ``def.*``.

    ``ready`` is set once the watch has delivered every existing definition: no call is
    checked against a partial set. A definition that does not parse is logged and ignored
    (it is the operator's to write; the watch goes on)."""

    def __init__(self, namespace: str) -> None:
        raise NotImplementedError

    async def start(self, js: JetStreamContext) -> None:
        """(Re)start the watch on this session; returns once the initial values are in."""
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    def applicable(self, spend: SpendContext) -> list[BudgetDefinition]:
        raise NotImplementedError


class Reservation:
    """The holds one model call took; commit or release exactly once (more is a no-op)."""

    async def commit(self, actual: Amount) -> None:
        raise NotImplementedError

    async def release(self) -> None:
        raise NotImplementedError


class BudgetGuard:
    """What every model call passes first; cheap (no I/O at all) when no budget applies."""

    def __init__(
        self,
        namespace: str,
        definitions: Definitions,
        hold_ttl: float = DEFAULT_HOLD_TTL_SECONDS,
    ) -> None:
        raise NotImplementedError

    def use(self, js: JetStreamContext) -> None:
        """Write ledgers through this session from now on."""
        raise NotImplementedError

    async def reserve(self, spend: SpendContext, amount: Amount) -> Reservation:
        """Hold ``amount`` on every applicable budget; raises ``BudgetExceeded`` (a hard
        limit) or ``BudgetUnavailable`` (the ledger could not be advanced in time)."""
        raise NotImplementedError
