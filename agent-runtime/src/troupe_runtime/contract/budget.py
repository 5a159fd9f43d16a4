"""Budgets: caps on what LLM calls may spend, in tokens and dollars, and their ledger.

A ``Budget`` (``BudgetSpec``) caps a scope (the namespace, Agents by label, or one
Workflow) over a window (each run, a UTC hour, day or month, or a rolling duration). The
operator resolves each Budget into a ``BudgetDefinition`` (label selectors become Agent
names) and writes it to the namespace's budget KV bucket under ``definition_key``; the
runtimes watch those keys, so a Budget changes nothing in any Deployment.

Every model call first takes a *hold* (its estimated prompt tokens plus ``max_tokens``,
and what that would cost) on the ``Ledger`` of every budget that applies, by
compare-and-set on ``ledger_key``; a hold that would take spent plus held past a hard
limit is refused (``BudgetExceeded``). After the call the hold is replaced by the
actual usage (``commit``), or dropped if nothing was spent (``release``). A hold whose
holder never came back (it crashed mid-call) expires and is charged in full: the ledger
never counts less than was spent. So across any number of replicas a budget is overspent
by at most the holds in flight, and a restart loses nothing: the ledger is in KV.

The functions here are pure planning over a ``Ledger`` value, shared by the runtime (which
writes ledgers), the operator (which reads them into status) and the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import Field, model_validator

from troupe_runtime.contract import grammar
from troupe_runtime.contract.durations import Duration
from troupe_runtime.contract.policies import WireModel

ScopeType = Literal["Namespace", "Agents", "Workflow"]
WindowType = Literal["Run", "Hour", "Day", "Month", "Rolling"]

MAX_TOKENS_LIMIT = 10**15
MAX_COST_LIMIT = 1e9
"""Dollars; far above any real bill, far below where float sums lose cents."""
ROLLING_SLOTS = 60
"""A rolling window is kept as this many slots of ``duration / ROLLING_SLOTS`` each."""
MAX_HOLDS = 4096
"""Holds one ledger keeps at most; a hold past that is refused as ``BudgetUnavailable``
(the value must stay well inside the server's max_payload)."""
MAX_REAPED = 256
"""Expired holds a ledger remembers, so a holder that comes back late is charged once."""


class LabelSelectorRequirement(WireModel):
    """One ``matchExpressions`` entry, as in every Kubernetes label selector."""

    key: str = Field(max_length=317, description="The label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="In, NotIn, Exists or DoesNotExist."
    )
    values: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="The values for In and NotIn; empty for Exists and DoesNotExist.",
    )


class LabelSelector(WireModel):
    """Which Agents: by their labels, as a Deployment's selector picks Pods."""

    match_labels: dict[str, str] = Field(
        default_factory=dict, description="Labels an Agent must have, key and value."
    )
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list, max_length=64, description="Requirements an Agent must meet."
    )

    def matches(self, labels: dict[str, str]) -> bool:
        """Whether an object with ``labels`` is selected (every requirement holds)."""
        raise NotImplementedError


class BudgetScope(WireModel):
    """What the budget caps: the namespace, some Agents, or one Workflow."""

    type: ScopeType = Field(
        description="Namespace: every LLM call in the namespace; Agents: the calls of the "
        "Agents the selector picks; Workflow: the calls made in the runs of one Workflow."
    )
    agents: LabelSelector | None = Field(
        default=None, description="For type Agents: which Agents (an empty selector: all)."
    )
    workflow: str | None = Field(
        default=None,
        pattern=grammar.DNS_LABEL_PATTERN,
        max_length=63,
        description="For type Workflow: the Workflow's name, in the Budget's namespace.",
    )

    @model_validator(mode="after")
    def _one_target(self) -> BudgetScope:
        if (self.type == "Agents") != (self.agents is not None):
            raise ValueError("scope.agents is set exactly when scope.type is Agents")
        if (self.type == "Workflow") != (self.workflow is not None):
            raise ValueError("scope.workflow is set exactly when scope.type is Workflow")
        return self


class BudgetWindow(WireModel):
    """Over what the limits count: each run, a calendar period in UTC, or a rolling span."""

    type: WindowType = Field(
        description="Run: each workflow run (each correlation id) on its own; Hour, Day, "
        "Month: the current UTC hour, day or month; Rolling: the last `duration`."
    )
    duration: Duration | None = Field(
        default=None,
        description="For type Rolling: how far back, a duration such as 30m, 6h or 168h.",
    )

    @model_validator(mode="after")
    def _duration_for_rolling(self) -> BudgetWindow:
        if (self.type == "Rolling") != (self.duration is not None):
            raise ValueError("window.duration is set exactly when window.type is Rolling")
        return self


class TokenLimits(WireModel):
    """Tokens (prompt plus completion) the window may spend."""

    soft: int | None = Field(
        default=None,
        ge=1,
        le=MAX_TOKENS_LIMIT,
        description="Past this: an Event, the SoftLimitExceeded condition and a metric; "
        "calls go on.",
    )
    hard: int | None = Field(
        default=None,
        ge=1,
        le=MAX_TOKENS_LIMIT,
        description="A call whose hold would take spent plus held past this is refused "
        "(BudgetExceeded).",
    )

    @model_validator(mode="after")
    def _soft_below_hard(self) -> TokenLimits:
        if self.soft is not None and self.hard is not None and self.soft > self.hard:
            raise ValueError("limits.tokens.soft may not exceed limits.tokens.hard")
        return self


class CostLimits(WireModel):
    """US dollars the window may spend, priced by each ModelProvider's model pricing."""

    soft: float | None = Field(
        default=None,
        gt=0,
        le=MAX_COST_LIMIT,
        allow_inf_nan=False,
        description="Dollars past which an Event, a condition and a metric say so.",
    )
    hard: float | None = Field(
        default=None,
        gt=0,
        le=MAX_COST_LIMIT,
        allow_inf_nan=False,
        description="Dollars past which calls are refused (BudgetExceeded).",
    )

    @model_validator(mode="after")
    def _soft_below_hard(self) -> CostLimits:
        if self.soft is not None and self.hard is not None and self.soft > self.hard:
            raise ValueError("limits.costUsd.soft may not exceed limits.costUsd.hard")
        return self


class BudgetLimits(WireModel):
    """The caps; at least one of tokens and costUsd."""

    tokens: TokenLimits | None = Field(default=None, description="Caps in tokens.")
    cost_usd: CostLimits | None = Field(default=None, description="Caps in US dollars.")

    @model_validator(mode="after")
    def _some_limit(self) -> BudgetLimits:
        if self.tokens is None and self.cost_usd is None:
            raise ValueError("limits needs tokens or costUsd")
        return self


class BudgetSpec(WireModel):
    """A cap on what LLM calls in a scope may spend over a window."""

    scope: BudgetScope = Field(description="Whose calls count.")
    window: BudgetWindow = Field(description="Over what span they count.")
    limits: BudgetLimits = Field(description="Soft and hard caps in tokens and dollars.")


class BudgetDefinition(WireModel):
    """A Budget as the runtimes enforce it: what the operator writes to ``definition_key``.

    Label selectors are resolved: ``agents`` names the Agents the selector picked when the
    operator last looked (it rewrites the definition when that changes)."""

    name: str = Field(pattern=grammar.DNS_LABEL_PATTERN, max_length=253)
    generation: int = Field(ge=0)
    scope: ScopeType
    agents: list[str] | None = None
    workflow: str | None = None
    window: BudgetWindow
    limits: BudgetLimits

    def applies(self, spend: SpendContext) -> bool:
        """Whether a call made in ``spend`` counts against this budget."""
        raise NotImplementedError


@dataclass(frozen=True)
class SpendContext:
    """Who makes a model call, and in which run: what picks the budgets that apply.

    ``workflow`` comes from the event's ``troupeworkflow`` extension (the engine sets it on
    step events, agents carry it on); ``run`` is the event's correlation id; ``hold_id`` is
    unique per call and deterministic (the message's event id, the turn, the route), so a
    hold taken twice for one call is one hold."""

    agent: str
    workflow: str | None
    run: str | None
    hold_id: str


class Amount(WireModel):
    """Tokens and dollars."""

    tokens: int = Field(default=0, ge=0)
    cost_usd: float = Field(default=0.0, ge=0, allow_inf_nan=False)

    def __add__(self, other: Amount) -> Amount:
        return Amount(tokens=self.tokens + other.tokens, cost_usd=self.cost_usd + other.cost_usd)


class Hold(WireModel):
    """What one model call in flight may spend, until ``expires`` (epoch seconds)."""

    amount: Amount
    expires: float = Field(allow_inf_nan=False)


class Ledger(WireModel):
    """One budget's window, as kept in KV under ``ledger_key``.

    ``slots`` is used by Rolling windows only: slot index (epoch seconds // slot length)
    to what was spent in it; ``spent`` is then their sum over the window."""

    window: str = Field(description="The window's id (``window_id``).")
    started: float = Field(description="Epoch seconds the window began (Run: first spend).")
    updated: float = 0.0
    spent: Amount = Field(default_factory=Amount)
    slots: dict[int, Amount] = Field(default_factory=dict)
    holds: dict[str, Hold] = Field(default_factory=dict)
    reaped: dict[str, Amount] = Field(default_factory=dict)
    """Holds charged in full at expiry; a late ``commit`` corrects the charge."""
    refusals: int = Field(default=0, ge=0, description="Holds refused by a hard limit.")


class BudgetExceeded(Exception):
    """A hard limit refused a model call's hold: the call was not made."""

    def __init__(
        self,
        budget: str,
        unit: Literal["tokens", "costUsd"],
        spent: float,
        held: float,
        asked: float,
        limit: float,
    ) -> None:
        super().__init__(
            f"budget {budget!r}: {unit} spent {spent:g} + held {held:g} + this call's "
            f"{asked:g} would pass the hard limit {limit:g}"
        )
        self.budget = budget
        self.unit = unit


class BudgetUnavailable(Exception):
    """The ledger could not be read or advanced in time: the call is not made, and the
    message goes back (fail closed: no budget is ever skipped)."""


@dataclass(frozen=True)
class Refused:
    """Why ``reserve`` refused a hold."""

    error: BudgetExceeded


def window_id(window: BudgetWindow, now: float, run: str | None) -> str | None:
    """The id of the window ``now`` falls in: a KV-key-safe token such as ``h2026120201``,
    ``d20261202``, ``m202612``, ``rolling`` or ``run-<digest of run>``; None for a Run
    window when the call is in no run (it is not counted there)."""
    raise NotImplementedError


def window_bounds(window: BudgetWindow, ledger: Ledger, now: float) -> tuple[float, float | None]:
    """Start and end (epoch seconds) of the window ``ledger`` counts; end None for Run."""
    raise NotImplementedError


def fresh_ledger(window: BudgetWindow, wid: str, now: float) -> Ledger:
    """An empty ledger for window ``wid``."""
    raise NotImplementedError


def spent(ledger: Ledger, window: BudgetWindow, now: float) -> Amount:
    """What the window has spent by ``now`` (Rolling: the slots still inside it)."""
    raise NotImplementedError


def held(ledger: Ledger, now: float) -> Amount:
    """What the unexpired holds may still spend."""
    raise NotImplementedError


def reserve(
    definition: BudgetDefinition,
    ledger: Ledger,
    hold_id: str,
    amount: Amount,
    now: float,
    ttl: float,
) -> Ledger | Refused:
    """The ledger with a hold of ``amount`` for ``hold_id`` (expiring ``now + ttl``), or why
    the hard limits refuse it. Expired holds are charged in full first (into ``reaped``);
    a ``hold_id`` already held or already charged is kept as it is (idempotent). A refusal's
    ledger write (``refusals + 1``) is the caller's choice."""
    raise NotImplementedError


def commit(
    ledger: Ledger, window: BudgetWindow, hold_id: str, actual: Amount, now: float
) -> Ledger:
    """The ledger with ``hold_id``'s hold replaced by what the call spent. A hold already
    reaped is corrected (its full charge becomes ``actual``); an unknown id is charged
    ``actual`` (its hold was lost, the spending was not)."""
    raise NotImplementedError


def release(ledger: Ledger, hold_id: str) -> Ledger:
    """The ledger without ``hold_id``'s hold: the call spent nothing."""
    raise NotImplementedError


def crossed(before: Amount, after: Amount, limits: BudgetLimits) -> list[tuple[str, str]]:
    """The (level, unit) pairs, level ``soft`` or ``hard``, that ``after`` is past and
    ``before`` was not: what a commit tripped, for metrics."""
    raise NotImplementedError


def burn_rate(ledger: Ledger, window: BudgetWindow, now: float) -> Amount:
    """Spending per hour over the window so far (Rolling: over its duration)."""
    raise NotImplementedError


def projected_exhaustion(
    ledger: Ledger, definition: BudgetDefinition, now: float
) -> datetime | None:
    """When the burn rate takes spent past the first hard limit, or None (no hard limit,
    no burn, or not before the window ends)."""
    raise NotImplementedError
