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

import functools
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import Field, model_validator

from troupe_runtime.contract import grammar, naming
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
        """Whether an object with ``labels`` is selected (every requirement holds); the
        empty selector selects everything, as in Kubernetes."""
        if any(labels.get(key) != value for key, value in self.match_labels.items()):
            return False
        for requirement in self.match_expressions:
            present = requirement.key in labels
            if requirement.operator == "Exists":
                ok = present
            elif requirement.operator == "DoesNotExist":
                ok = not present
            elif requirement.operator == "In":
                ok = present and labels[requirement.key] in requirement.values
            else:  # NotIn: an object without the key is not in any set of values.
                ok = not present or labels[requirement.key] not in requirement.values
            if not ok:
                return False
        return True


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
        """Whether a call made in ``spend`` counts against this budget. A Run-window budget
        does not count a call that is in no run (no correlation id)."""
        if self.window.type == "Run" and spend.run is None:
            return False
        if self.scope == "Agents":
            return self.agents is not None and spend.agent in self.agents
        if self.scope == "Workflow":
            return spend.workflow is not None and spend.workflow == self.workflow
        return True


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


LATEST_PROJECTION = 32503680000.0
"""Year 3000, epoch seconds: an exhaustion projected later is none (a Rolling window's
slow burn against a large limit lands past what a datetime holds)."""
MAX_AMOUNT_TOKENS = 2**53
"""Tokens one amount stored in a ledger may claim: past any real window, within a double's
exact range (status and metrics carry it as a number)."""
MAX_AMOUNT_USD = 1e12
"""Dollars one amount stored in a ledger may claim; sums of them stay finite."""


class Amount(WireModel):
    """Tokens and dollars."""

    tokens: int = Field(default=0, ge=0)
    cost_usd: float = Field(default=0.0, ge=0, allow_inf_nan=False)

    def __add__(self, other: Amount) -> Amount:
        return Amount(tokens=self.tokens + other.tokens, cost_usd=self.cost_usd + other.cost_usd)

    def within_bounds(self) -> bool:
        """Whether a stored amount is one a ledger could hold (``MAX_AMOUNT_*``)."""
        return self.tokens <= MAX_AMOUNT_TOKENS and self.cost_usd <= MAX_AMOUNT_USD


class Hold(WireModel):
    """What one model call in flight may spend, until ``expires`` (epoch seconds)."""

    amount: Amount
    expires: float = Field(allow_inf_nan=False)


class Ledger(WireModel):
    """One budget's window, as kept in KV under ``ledger_key``.

    ``slots`` is used by Rolling windows only: slot index (epoch seconds // slot length)
    to what was spent in it; ``spent`` is then their sum over the window."""

    window: str = Field(description="The window's id (``window_id``).")
    started: float = Field(
        ge=0,
        le=LATEST_PROJECTION,
        allow_inf_nan=False,
        description="Epoch seconds the window began (Run: first spend).",
    )
    updated: float = Field(default=0.0, ge=0, le=LATEST_PROJECTION, allow_inf_nan=False)
    spent: Amount = Field(default_factory=Amount)
    slots: dict[int, Amount] = Field(default_factory=dict)
    holds: dict[str, Hold] = Field(default_factory=dict)
    reaped: dict[str, Amount] = Field(default_factory=dict)
    """Holds charged in full at expiry; a late ``commit`` corrects the charge."""
    reaped_slots: dict[str, int] = Field(default_factory=dict)
    """Rolling windows: the slot each reaped hold was charged to, so that a late commit
    corrects that slot (and not one that would outlive it)."""
    refusals: int = Field(default=0, ge=0, description="Holds refused by a hard limit.")

    @model_validator(mode="after")
    def _amounts_in_bounds(self) -> Ledger:
        # A ledger is read from a bucket anyone may write: an amount no guard could have
        # stored is junk, not a figure to sum into a status.
        amounts = [
            self.spent,
            *self.slots.values(),
            *(hold.amount for hold in self.holds.values()),
            *self.reaped.values(),
        ]
        if not all(amount.within_bounds() for amount in amounts):
            raise ValueError(
                f"an amount past {MAX_AMOUNT_TOKENS} tokens or ${MAX_AMOUNT_USD:g} is junk"
            )
        return self


Unit = Literal["tokens", "costUsd"]


class BudgetExceeded(Exception):
    """A hard limit refused a model call's hold: the call was not made."""

    def __init__(
        self,
        budget: str,
        unit: Unit,
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
        self.spent = spent
        self.held = held
        self.asked = asked
        self.limit = limit


class BudgetUnavailable(Exception):
    """The ledger could not be read or advanced in time: the call is not made, and the
    message goes back (fail closed: no budget is ever skipped)."""


@dataclass(frozen=True)
class Refused:
    """Why ``reserve`` refused a hold, and the ledger to write if the caller records the
    refusal (expired holds reaped, ``refusals + 1``)."""

    error: BudgetExceeded
    ledger: Ledger


MAX_HOLD_TTL_SECONDS = 86400.0
"""No guard holds longer than this; a hold expiring later (plus clock skew) is junk and is
dropped uncharged: no guard wrote it, and held for good it would wedge the budget."""
CLOCK_SKEW_SECONDS = 5.0
"""How far ahead another replica's wall clock may plausibly be."""
MIN_BURN_SECONDS = 60.0
"""Burn rates are taken over at least this long, so a window's first call is no spike."""


ROLLING_WINDOW_ID = "rolling"
"""A Rolling window has one ledger for good; its slots roll."""

_CALENDAR = {"Hour": ("h", "%Y%m%d%H"), "Day": ("d", "%Y%m%d"), "Month": ("m", "%Y%m")}
_ZERO = Amount()


def _utc(now: float) -> datetime:
    # Whole seconds: fromtimestamp rounds to microseconds, which could put 09:59:59.9999996
    # in the next hour.
    return datetime.fromtimestamp(math.floor(now), UTC)


def window_id(window: BudgetWindow, now: float, run: str | None) -> str | None:
    """The id of the window ``now`` falls in: a KV-key-safe token such as ``h2026120201``,
    ``d20261202``, ``m202612``, ``rolling`` or ``run-<digest of run>``; None for a Run
    window when the call is in no run (it is not counted there). Calendar windows are UTC."""
    if window.type == "Run":
        return None if run is None else naming.run_window_token(run)
    if window.type == "Rolling":
        return ROLLING_WINDOW_ID
    return _calendar_id(window.type, math.floor(now))


@functools.lru_cache(maxsize=16)
def _calendar_id(window_type: str, second: int) -> str:
    """A calendar window's id, by the whole second (every call asks it: strftime is not
    free, and calendar windows turn over on whole seconds)."""
    prefix, pattern = _CALENDAR[window_type]
    return prefix + _utc(second).strftime(pattern)


def _calendar_start(window: BudgetWindow, wid: str, now: float) -> datetime:
    """The UTC start of calendar window ``wid``, or of the one ``now`` falls in when ``wid``
    is not one of ``window``'s ids."""
    prefix, pattern = _CALENDAR[window.type]
    if wid.startswith(prefix):
        try:
            return datetime.strptime(wid[1:], pattern).replace(tzinfo=UTC)
        except ValueError:
            pass
    current = _utc(now).strftime(pattern)
    return datetime.strptime(current, pattern).replace(tzinfo=UTC)


def _calendar_end(window: BudgetWindow, start: datetime) -> datetime:
    if window.type == "Hour":
        return start + timedelta(hours=1)
    if window.type == "Day":
        return start + timedelta(days=1)
    if start.month == 12:
        return start.replace(year=start.year + 1, month=1)
    return start.replace(month=start.month + 1)


def _rolling_seconds(window: BudgetWindow) -> float:
    assert window.duration is not None
    return window.duration.total_seconds()


def slot_seconds(window: BudgetWindow) -> float:
    """A Rolling window's slot length."""
    return _rolling_seconds(window) / ROLLING_SLOTS


def slot_index(window: BudgetWindow, now: float) -> int:
    """The Rolling slot ``now`` falls in."""
    return int(now // slot_seconds(window))


def _in_window(window: BudgetWindow, slot: int, now: float) -> bool:
    return slot > slot_index(window, now) - ROLLING_SLOTS


def window_bounds(window: BudgetWindow, ledger: Ledger, now: float) -> tuple[float, float | None]:
    """Start and end (epoch seconds) of the window ``ledger`` counts; end None for Run,
    ``now`` for Rolling (which always ends now)."""
    if window.type == "Run":
        return ledger.started, None
    if window.type == "Rolling":
        first = (slot_index(window, now) - ROLLING_SLOTS + 1) * slot_seconds(window)
        return max(first, min(ledger.started, now)), now
    start = _calendar_start(window, ledger.window, now)
    return start.timestamp(), _calendar_end(window, start).timestamp()


def fresh_ledger(window: BudgetWindow, wid: str, now: float) -> Ledger:
    """An empty ledger for window ``wid``."""
    calendar = window.type in _CALENDAR
    started = _calendar_start(window, wid, now).timestamp() if calendar else now
    return Ledger(window=wid, started=started, updated=now)


def _correct(a: Amount, minus: Amount, plus: Amount) -> Amount:
    """``a - minus + plus``, never below zero (floats may leave a -1e-18)."""
    return Amount(
        tokens=max(0, a.tokens - minus.tokens + plus.tokens),
        cost_usd=max(0.0, a.cost_usd - minus.cost_usd + plus.cost_usd),
    )


def _total(amounts: list[Amount]) -> Amount:
    return Amount(tokens=sum(a.tokens for a in amounts), cost_usd=sum(a.cost_usd for a in amounts))


def _plausible(hold: Hold, now: float) -> bool:
    """Whether any guard could have written ``hold``: one expiring later is junk."""
    return hold.expires <= now + MAX_HOLD_TTL_SECONDS + CLOCK_SKEW_SECONDS


def _expired(hold: Hold, now: float) -> bool:
    return hold.expires <= now


def _charged(
    ledger: Ledger, window: BudgetWindow, now: float, minus: Amount, plus: Amount
) -> tuple[Amount, dict[int, Amount]]:
    """``spent`` and ``slots`` after ``minus`` is taken back and ``plus`` charged now."""
    if window.type != "Rolling":
        return _correct(ledger.spent, minus, plus), ledger.slots
    slot = slot_index(window, now)
    slots = {i: a for i, a in ledger.slots.items() if _in_window(window, i, now)}
    slots[slot] = _correct(slots.get(slot, _ZERO), minus, plus)
    if slots[slot] == _ZERO:
        del slots[slot]
    return _total(list(slots.values())), slots


def reap(ledger: Ledger, window: BudgetWindow, now: float) -> Ledger:
    """The ledger with every expired hold charged in full (into ``reaped``), junk holds
    (expiring later than any guard holds) dropped uncharged, and a Rolling window's slots
    that fell out of it dropped. The same ledger when nothing changes."""
    expired = [(k, h) for k, h in ledger.holds.items() if _expired(h, now)]
    junk = [k for k, h in ledger.holds.items() if not _plausible(h, now)]
    rolled = window.type == "Rolling" and any(not _in_window(window, i, now) for i in ledger.slots)
    if not expired and not junk and not rolled:
        return ledger
    holds = {k: h for k, h in ledger.holds.items() if k not in junk}
    reaped = dict(ledger.reaped)
    reaped_slots = dict(ledger.reaped_slots)
    for key, hold in expired:
        del holds[key]
        reaped[key] = hold.amount
        if window.type == "Rolling":
            reaped_slots[key] = slot_index(window, now)
    # Remember the newest MAX_REAPED (dicts keep insertion order, so does JSON).
    for key in list(reaped)[: max(0, len(reaped) - MAX_REAPED)]:
        del reaped[key]
    reaped_slots = {
        k: s
        for k, s in reaped_slots.items()
        if k in reaped and window.type == "Rolling" and _in_window(window, s, now)
    }
    charge = _total([h.amount for _, h in expired])
    spent_now, slots = _charged(ledger, window, now, _ZERO, charge)
    return ledger.model_copy(
        update={
            "holds": holds,
            "reaped": reaped,
            "reaped_slots": reaped_slots,
            "spent": spent_now,
            "slots": slots,
        }
    )


def spent(ledger: Ledger, window: BudgetWindow, now: float) -> Amount:
    """What the window has spent by ``now`` (Rolling: the slots still inside it), counting
    expired holds in full, as the next write will."""
    current = reap(ledger, window, now)
    if window.type != "Rolling":
        return current.spent
    return _total([a for i, a in current.slots.items() if _in_window(window, i, now)])


def held(ledger: Ledger, now: float) -> Amount:
    """What the unexpired holds may still spend."""
    return _total(
        [h.amount for h in ledger.holds.values() if not _expired(h, now) and _plausible(h, now)]
    )


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
    ledger write (``refusals + 1``) is the caller's choice. Raises ``BudgetUnavailable``
    when the ledger already keeps ``MAX_HOLDS`` holds."""
    window = definition.window
    current = reap(ledger, window, now)
    if hold_id in current.holds or hold_id in current.reaped:
        return current
    spent_now = current.spent if window.type != "Rolling" else spent(current, window, now)
    held_now = held(current, now)
    limits = definition.limits
    checks: list[tuple[Unit, float, float, float, float | None]] = [
        (
            "tokens",
            spent_now.tokens,
            held_now.tokens,
            amount.tokens,
            limits.tokens.hard if limits.tokens else None,
        ),
        (
            "costUsd",
            spent_now.cost_usd,
            held_now.cost_usd,
            amount.cost_usd,
            limits.cost_usd.hard if limits.cost_usd else None,
        ),
    ]
    for unit, s, h, asked, hard in checks:
        if hard is not None and s + h + asked > hard:
            error = BudgetExceeded(definition.name, unit, s, h, asked, hard)
            return Refused(
                error,
                current.model_copy(update={"refusals": current.refusals + 1, "updated": now}),
            )
    if len(current.holds) >= MAX_HOLDS:
        raise BudgetUnavailable(
            f"budget {definition.name!r}: {MAX_HOLDS} holds in flight on one ledger already"
        )
    holds = dict(current.holds)
    holds[hold_id] = Hold(amount=amount, expires=now + min(ttl, MAX_HOLD_TTL_SECONDS))
    return current.model_copy(update={"holds": holds, "updated": now})


def commit(
    ledger: Ledger, window: BudgetWindow, hold_id: str, actual: Amount, now: float
) -> Ledger:
    """The ledger with ``hold_id``'s hold replaced by what the call spent. A hold already
    reaped is corrected (its full charge becomes ``actual``). An unknown id changes nothing:
    it was committed or released already (a write retried after its reply was lost must
    charge once), or its reaped charge was forgotten (then the full charge stands), or its
    hold went with a junk ledger (then so did everything else the window counted)."""
    if hold_id in ledger.reaped:
        corrected = _uncharge(ledger, hold_id, actual)
        return reap(corrected, window, now).model_copy(update={"updated": now})
    if hold_id not in ledger.holds:
        return ledger
    holds = {k: h for k, h in ledger.holds.items() if k != hold_id}
    spent_now, slots = _charged(ledger, window, now, _ZERO, actual)
    charged = ledger.model_copy(
        update={"holds": holds, "spent": spent_now, "slots": slots, "updated": now}
    )
    return reap(charged, window, now)


def _uncharge(ledger: Ledger, hold_id: str, actual: Amount) -> Ledger:
    """A reaped hold's full charge corrected to ``actual``, where it was charged."""
    full = ledger.reaped[hold_id]
    reaped = {k: a for k, a in ledger.reaped.items() if k != hold_id}
    reaped_slots = {k: s for k, s in ledger.reaped_slots.items() if k != hold_id}
    update: dict[str, object] = {"reaped": reaped, "reaped_slots": reaped_slots}
    slot = ledger.reaped_slots.get(hold_id)
    if ledger.window != ROLLING_WINDOW_ID:
        update["spent"] = _correct(ledger.spent, full, actual)
    elif slot is not None and slot in ledger.slots:
        # Rolling: correct the slot the charge went to; once it has left the window, the
        # charge has too, and so has the call's spending.
        slots = dict(ledger.slots)
        slots[slot] = _correct(slots[slot], full, actual)
        update["slots"] = slots
        update["spent"] = _correct(ledger.spent, full, actual)
    return ledger.model_copy(update=update)


def release(ledger: Ledger, hold_id: str) -> Ledger:
    """The ledger without ``hold_id``'s hold: the call spent nothing (a hold already reaped
    has its full charge taken back)."""
    if hold_id in ledger.reaped:
        return _uncharge(ledger, hold_id, _ZERO)
    if hold_id not in ledger.holds:
        return ledger
    holds = {k: h for k, h in ledger.holds.items() if k != hold_id}
    return ledger.model_copy(update={"holds": holds})


def crossed(before: Amount, after: Amount, limits: BudgetLimits) -> list[tuple[str, str]]:
    """The (level, unit) pairs, level ``soft`` or ``hard``, that ``after`` is past and
    ``before`` was not: what a commit tripped, for metrics. Reaching a limit is passing it."""
    found: list[tuple[str, str]] = []
    for level in ("soft", "hard"):
        pairs: list[tuple[str, float, float, float | None]] = [
            (
                "tokens",
                before.tokens,
                after.tokens,
                getattr(limits.tokens, level) if limits.tokens else None,
            ),
            (
                "costUsd",
                before.cost_usd,
                after.cost_usd,
                getattr(limits.cost_usd, level) if limits.cost_usd else None,
            ),
        ]
        for unit, was, now_is, limit in pairs:
            if limit is not None and was < limit <= now_is:
                found.append((level, unit))
    return found


def burn_rate(ledger: Ledger, window: BudgetWindow, now: float) -> Amount:
    """Spending per hour over the window so far (Rolling: over its duration, or since the
    ledger began if that is shorter), taken over at least ``MIN_BURN_SECONDS``."""
    total = spent(ledger, window, now)
    if window.type == "Rolling":
        elapsed = min(_rolling_seconds(window), now - ledger.started)
    else:
        elapsed = now - window_bounds(window, ledger, now)[0]
    hours = max(elapsed, MIN_BURN_SECONDS) / 3600.0
    return Amount(tokens=round(total.tokens / hours), cost_usd=total.cost_usd / hours)


def projected_exhaustion(
    ledger: Ledger, definition: BudgetDefinition, now: float
) -> datetime | None:
    """When the burn rate takes spent past the first hard limit, or None (no hard limit,
    no burn, or not before the window ends). A limit already reached is exhausted now."""
    window = definition.window
    total = spent(ledger, window, now)
    rate = burn_rate(ledger, window, now)
    end = window_bounds(window, ledger, now)[1]
    limits = definition.limits
    candidates: list[float] = []
    for used, per_hour, hard in (
        (float(total.tokens), float(rate.tokens), limits.tokens.hard if limits.tokens else None),
        (total.cost_usd, rate.cost_usd, limits.cost_usd.hard if limits.cost_usd else None),
    ):
        if hard is None:
            continue
        if used >= hard:
            candidates.append(now)
        elif per_hour > 0:
            candidates.append(now + (hard - used) / per_hour * 3600.0)
    if window.type == "Rolling":
        end = None  # A rolling window never ends; its burn is over its own span.
    horizon = LATEST_PROJECTION if end is None else min(end, LATEST_PROJECTION)
    reachable = [t for t in candidates if t <= horizon]
    return datetime.fromtimestamp(min(reachable), UTC) if reachable else None
