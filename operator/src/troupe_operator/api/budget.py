"""The Budget API: a cap on what LLM calls in a scope may spend over a window.

The spec is the runtime contract's own model (``troupe_runtime.contract.budget.BudgetSpec``),
unchanged: the operator resolves it into the ``BudgetDefinition`` the runtimes enforce.
What the contract's validators check and OpenAPI cannot (a scope's target set exactly for
its type, a duration exactly for Rolling windows, soft at most hard, some limit at all) the
CRD checks with CEL rules on the whole object (``BUDGET_RULES``), so the API server and the
models refuse alike.

The status is what the operator last read of the current window's ledger: spent, reserved
(holds in flight), remaining, the burn rate and when it would exhaust the first hard limit.
"""

from __future__ import annotations

from pydantic import Field

from troupe_operator.api.common import ApiModel, rule
from troupe_operator.api.status import ObjectStatus
from troupe_runtime.contract.budget import BudgetSpec

BUDGET_RULES = [
    rule(
        "(self.spec.scope.type == 'Agents') == has(self.spec.scope.agents)",
        "scope.agents is set exactly when scope.type is Agents",
        ".spec.scope.agents",
    ),
    rule(
        "(self.spec.scope.type == 'Workflow') == has(self.spec.scope.workflow)",
        "scope.workflow is set exactly when scope.type is Workflow",
        ".spec.scope.workflow",
    ),
    rule(
        "(self.spec.window.type == 'Rolling') == has(self.spec.window.duration)",
        "window.duration is set exactly when window.type is Rolling",
        ".spec.window.duration",
    ),
    rule(
        "has(self.spec.limits.tokens) || has(self.spec.limits.costUsd)",
        "limits needs tokens or costUsd",
        ".spec.limits",
    ),
    rule(
        "!has(self.spec.limits.tokens) || !has(self.spec.limits.tokens.soft)"
        " || !has(self.spec.limits.tokens.hard)"
        " || self.spec.limits.tokens.soft <= self.spec.limits.tokens.hard",
        "limits.tokens.soft may not exceed limits.tokens.hard",
        ".spec.limits.tokens",
    ),
    rule(
        "!has(self.spec.limits.costUsd) || !has(self.spec.limits.costUsd.soft)"
        " || !has(self.spec.limits.costUsd.hard)"
        " || self.spec.limits.costUsd.soft <= self.spec.limits.costUsd.hard",
        "limits.costUsd.soft may not exceed limits.costUsd.hard",
        ".spec.limits.costUsd",
    ),
]
"""What ``BudgetSpec``'s validators refuse, in CEL."""


class Spent(ApiModel):
    """Tokens and dollars."""

    tokens: int = Field(default=0, description="Tokens, prompt plus completion.")
    cost_usd: float = Field(default=0.0, description="US dollars, rounded to a millionth.")


class Remaining(ApiModel):
    """What the hard limits leave: hard - spent - reserved, for each unit with a hard limit."""

    tokens: int | None = Field(
        default=None, description="Tokens; unset without a token hard limit."
    )
    cost_usd: float | None = Field(
        default=None, description="Dollars; unset without a cost hard limit."
    )


class BurnRate(ApiModel):
    """Spending per hour over the window so far (Rolling: over its duration)."""

    tokens_per_hour: float = Field(default=0.0, description="Tokens per hour.")
    cost_usd_per_hour: float = Field(default=0.0, description="Dollars per hour.")


class RunWindows(ApiModel):
    """Run windows: each run (correlation id) has a ledger of its own."""

    tracked: int = Field(default=0, description="Runs with a ledger kept.")
    exceeded: int = Field(
        default=0, description="Of those, runs at or past a hard limit, or refused a call."
    )
    largest: Spent = Field(
        default_factory=Spent, description="What the run that spent the most tokens spent."
    )


class BudgetStatus(ObjectStatus):
    """What the operator last read of the budget's ledger, refreshed every few seconds."""

    window: str = Field(
        default="",
        description="The current window's id (h2026120201, d20261202, m202612, rolling); Run "
        "windows: runs (each run is a window of its own, the figures sum them).",
    )
    window_start: str | None = Field(default=None, description="RFC 3339; unset for Run.")
    window_end: str | None = Field(
        default=None, description="RFC 3339; unset for Run and Rolling windows."
    )
    spent: Spent = Field(default_factory=Spent, description="Spent in the window.")
    reserved: Spent = Field(
        default_factory=Spent, description="Held by model calls in flight (their holds)."
    )
    remaining: Remaining = Field(
        default_factory=Remaining,
        description="hard - spent - reserved (Run windows: of the run closest to its limit); "
        "never below 0.",
    )
    burn_rate: BurnRate = Field(default_factory=BurnRate)
    projected_exhaustion: str | None = Field(
        default=None,
        description="RFC 3339: when the burn rate takes spending past the first hard limit; "
        "unset when it would not within the window.",
    )
    refusals: int = Field(default=0, description="Calls the hard limits refused in the window.")
    runs: RunWindows | None = Field(default=None, description="Run windows only.")
    agents: list[str] | None = Field(
        default=None, description="Agents scope only: the Agents the selector picks, sorted."
    )


__all__ = ["BUDGET_RULES", "BudgetSpec", "BudgetStatus"]
