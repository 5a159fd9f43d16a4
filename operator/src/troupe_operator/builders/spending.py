"""A Budget's pass, planned purely: its definition, which ledgers to read and prune, and
what they come to in status, conditions, Events and gauges.

(``builders.budgets`` is about something else: the time budgets of nested timeouts.)

The operator resolves a Budget's label selector to Agent names and writes the resulting
``BudgetDefinition`` only when it differs from the stored one, so runtimes watching the key
see a change only when there is one. Status is read from the current window's ledger (Run
windows: every run's ledger, summed, with remaining, burn rate and exhaustion those of the
run closest to its limit). The figures are rounded and the burn rate is evaluated on a clock
that ticks every ``BURN_RESOLUTION_SECONDS`` (or at the ledger's last write), so an idle
budget's status does not change from one pass to the next and no pass writes it. Ledgers of
windows that ended more than ``PRUNE_GRACE_SECONDS`` ago are pruned (a hold taken just before
the end may still be committed there); a run's ledger once its last write is
``RUN_LEDGER_RETENTION_SECONDS`` old and no hold is in flight on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from troupe_operator.api.budget import (
    BudgetStatus,
    BurnRate,
    Remaining,
    RunWindows,
    Spent,
)
from troupe_operator.api.status import Condition
from troupe_operator.builders.status import (
    COST_DIGITS,
    SPEC_VALID,
    SPEC_VALID_OK,
    Observation,
    Transition,
    merge_conditions,
    timestamp,
    transitions,
)
from troupe_runtime.contract import budget as ledgers
from troupe_runtime.contract.budget import (
    Amount,
    BudgetDefinition,
    BudgetLimits,
    BudgetSpec,
    LabelSelector,
    Ledger,
)

MESSAGING_READY = "MessagingReady"
SOFT_LIMIT_EXCEEDED = "SoftLimitExceeded"
HARD_LIMIT_EXCEEDED = "HardLimitExceeded"
BUDGET_SUBCONDITIONS = (SPEC_VALID, MESSAGING_READY)
BUDGET_ADVISORIES = (SOFT_LIMIT_EXCEEDED, HARD_LIMIT_EXCEEDED)
"""Reported after the sub-conditions without holding Ready back: an exceeded budget is
enforced, which is what Ready says."""
ENFORCED = "Enforced"
LIMITS = frozenset(BUDGET_ADVISORIES)

BURN_RESOLUTION_SECONDS = 300.0
"""The burn rate and projected exhaustion are evaluated at most this often while nothing is
spent: they decay with time alone, and status must not change on every pass."""
PRUNE_GRACE_SECONDS = 3600.0
"""How long an ended calendar window's ledger is kept: a hold taken in its last moments is
committed or reaped there (a hold lives 10 minutes by default)."""
RUN_LEDGER_RETENTION_SECONDS = 86400.0
"""How long a run's ledger is kept after its last write: a run's end is not in the ledger."""
RATE_DIGITS = 3
"""Significant digits of a burn rate in status."""

_CALENDAR = {"h": ("%Y%m%d%H", "Hour"), "d": ("%Y%m%d", "Day"), "m": ("%Y%m", "Month")}
_RUN_PREFIX = "run-"


# The definition.


def resolve_agents(selector: LabelSelector, agents: Sequence[Mapping[str, Any]]) -> list[str]:
    """The names of the Agents (as the API server lists them) the selector picks, sorted;
    Agents being deleted are not counted."""
    picked = []
    for agent in agents:
        meta = agent.get("metadata") or {}
        if "deletionTimestamp" in meta:
            continue
        labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
        if selector.matches(labels):
            picked.append(str(meta["name"]))
    return sorted(picked)


def definition(
    name: str, generation: int, spec: BudgetSpec, agents: list[str] | None
) -> BudgetDefinition:
    """What the runtimes enforce: the spec with its selector resolved to ``agents``."""
    return BudgetDefinition(
        name=name,
        generation=generation,
        scope=spec.scope.type,
        agents=agents if spec.scope.type == "Agents" else None,
        workflow=spec.scope.workflow,
        window=spec.window,
        limits=spec.limits,
    )


def encode_definition(wanted: BudgetDefinition) -> bytes:
    return wanted.model_dump_json(by_alias=True, exclude_none=True).encode()


def definition_stale(stored: bytes | None, wanted: BudgetDefinition) -> bool:
    """Whether the stored value must be rewritten: missing, junk, or another definition."""
    if stored is None:
        return True
    try:
        return BudgetDefinition.model_validate_json(stored) != wanted
    except (ValidationError, ValueError):
        return True


# Which ledgers.


def current_window(wanted: BudgetDefinition, now: float) -> str | None:
    """The window id whose ledger status shows; None for Run windows (every run's)."""
    if wanted.window.type == "Run":
        return None
    return ledgers.window_id(wanted.window, now, None)


def to_read(wanted: BudgetDefinition, windows: Sequence[str], now: float) -> list[str]:
    """The ledgers of the ``windows`` present that a pass reads: the current window's, or
    for Run windows every run's."""
    current = current_window(wanted, now)
    if current is None:
        return sorted(w for w in windows if w.startswith(_RUN_PREFIX))
    return [current] if current in windows else []


def calendar_end(wid: str) -> float | None:
    """The end (epoch seconds) of calendar window ``wid`` (``h2026120201``, ``d20261202``,
    ``m202612``), or None when ``wid`` is not one."""
    found = _CALENDAR.get(wid[:1])
    if found is None:
        return None
    pattern, _ = found
    try:
        start = datetime.strptime(wid[1:], pattern).replace(tzinfo=UTC)
    except ValueError:
        return None
    if start.strftime(pattern) != wid[1:]:
        return None
    if wid[0] == "h":
        return start.timestamp() + 3600.0
    if wid[0] == "d":
        return start.timestamp() + 86400.0
    month = start.replace(year=start.year + 1, month=1) if start.month == 12 else None
    return (month or start.replace(month=start.month + 1)).timestamp()


def to_prune(
    wanted: BudgetDefinition,
    windows: Sequence[str],
    read: Mapping[str, Ledger],
    now: float,
) -> list[str]:
    """The ledgers of ended windows: a calendar window's once it ended ``PRUNE_GRACE_SECONDS``
    ago, a run's once idle for ``RUN_LEDGER_RETENTION_SECONDS`` with no hold in flight, and
    those of another window type than the budget's (its window changed). The current window
    and any id this module cannot place are kept: pruning is never a guess."""
    current = current_window(wanted, now)
    kind = wanted.window.type
    pruned = []
    for wid in windows:
        if wid == current:
            continue
        if wid.startswith(_RUN_PREFIX):
            if kind != "Run":
                pruned.append(wid)
                continue
            ledger = read.get(wid)
            idle = ledger is not None and ledger.updated + RUN_LEDGER_RETENTION_SECONDS < now
            if idle and ledger is not None and not ledgers.held(ledger, now).tokens:
                pruned.append(wid)
        elif wid == ledgers.ROLLING_WINDOW_ID:
            if kind != "Rolling":
                pruned.append(wid)
        elif (end := calendar_end(wid)) is not None:
            of_this_kind = _CALENDAR[wid[0]][1] == kind
            if not of_this_kind or end + PRUNE_GRACE_SECONDS < now:
                pruned.append(wid)
    return sorted(pruned)


def parse_ledgers(values: Mapping[str, bytes]) -> tuple[dict[str, Ledger], list[str]]:
    """The ledgers read, by window id, and the ids whose values are not ledgers (a runtime
    recreates a junk ledger; status counts it as empty meanwhile)."""
    parsed: dict[str, Ledger] = {}
    junk: list[str] = []
    for wid, value in values.items():
        try:
            parsed[wid] = Ledger.model_validate_json(value)
        except (ValidationError, ValueError):
            junk.append(wid)
    return parsed, sorted(junk)


# What they come to.


@dataclass(frozen=True)
class Figures:
    """What the ledgers read come to, rounded as status shows them."""

    window: str
    start: float | None = None
    end: float | None = None
    spent: Amount = field(default_factory=Amount)
    reserved: Amount = field(default_factory=Amount)
    remaining: Remaining = field(default_factory=Remaining)
    burn: Amount = field(default_factory=Amount)
    exhaustion: datetime | None = None
    refusals: int = 0
    soft_exceeded: list[str] = field(default_factory=list)
    """Units at or past their soft limit."""
    hard_exceeded: list[str] = field(default_factory=list)
    """Units at or past their hard limit; ``refused`` when a call was refused below it."""
    runs: RunWindows | None = None
    unreadable: list[str] = field(default_factory=list)


def _as_of(ledger: Ledger, now: float) -> float:
    """The clock of the burn rate: ``now`` rounded down to ``BURN_RESOLUTION_SECONDS``, or the
    ledger's last write when later (so a spend shows at once)."""
    ticked = math.floor(now / BURN_RESOLUTION_SECONDS) * BURN_RESOLUTION_SECONDS
    return min(now, max(ticked, ledger.updated))


def _significant(value: float, digits: int = RATE_DIGITS) -> float:
    if value <= 0 or not math.isfinite(value):
        return 0.0
    return round(value, digits - 1 - math.floor(math.log10(value)))


def _cost(value: float) -> float:
    return round(value, COST_DIGITS)


def _reached(used: Amount, limits: BudgetLimits, level: str) -> list[str]:
    reached = []
    tokens = getattr(limits.tokens, level) if limits.tokens else None
    if tokens is not None and used.tokens >= tokens:
        reached.append("tokens")
    cost = getattr(limits.cost_usd, level) if limits.cost_usd else None
    if cost is not None and used.cost_usd >= cost:
        reached.append("costUsd")
    return reached


def _remaining(used: Amount, limits: BudgetLimits) -> Remaining:
    tokens = limits.tokens.hard if limits.tokens else None
    cost = limits.cost_usd.hard if limits.cost_usd else None
    return Remaining(
        tokens=None if tokens is None else max(0, tokens - used.tokens),
        cost_usd=None if cost is None else _cost(max(0.0, cost - used.cost_usd)),
    )


@dataclass(frozen=True)
class _One:
    """One ledger's figures, unrounded."""

    spent: Amount
    held: Amount
    burn: Amount
    exhaustion: datetime | None
    refusals: int
    start: float
    end: float | None

    def pressure(self, limits: BudgetLimits) -> float:
        """How close to its hard limits: the largest of (spent + held) / hard."""
        used = self.spent + self.held
        ratios = [0.0]
        if limits.tokens and limits.tokens.hard:
            ratios.append(used.tokens / limits.tokens.hard)
        if limits.cost_usd and limits.cost_usd.hard:
            ratios.append(used.cost_usd / limits.cost_usd.hard)
        return max(ratios)


def _one(wanted: BudgetDefinition, ledger: Ledger, now: float) -> _One:
    window = wanted.window
    as_of = _as_of(ledger, now)
    start, end = ledgers.window_bounds(window, ledger, now)
    return _One(
        spent=ledgers.spent(ledger, window, now),
        held=ledgers.held(ledger, now),
        burn=ledgers.burn_rate(ledger, window, as_of),
        exhaustion=ledgers.projected_exhaustion(ledger, wanted, as_of),
        refusals=ledger.refusals,
        start=start,
        end=end,
    )


def _rounded(amount: Amount) -> Amount:
    return Amount(tokens=amount.tokens, cost_usd=_cost(amount.cost_usd))


def figures(
    wanted: BudgetDefinition,
    read: Mapping[str, Ledger],
    now: float,
    unreadable: Sequence[str] = (),
) -> Figures:
    """Status figures of the ledgers ``read`` (window id → ledger; those of ``to_read``)."""
    limits = wanted.limits
    current = current_window(wanted, now)
    if current is not None:
        ledger = read.get(current) or ledgers.fresh_ledger(wanted.window, current, now)
        one = _one(wanted, ledger, now)
        used = one.spent + one.held
        hard = _reached(one.spent, limits, "hard")
        if one.refusals and not hard:
            hard = ["refused"]
        return Figures(
            window=current,
            start=one.start,
            end=None if wanted.window.type == "Rolling" else one.end,
            spent=_rounded(one.spent),
            reserved=_rounded(one.held),
            remaining=_remaining(used, limits),
            burn=one.burn,
            exhaustion=one.exhaustion,
            refusals=one.refusals,
            soft_exceeded=_reached(one.spent, limits, "soft"),
            hard_exceeded=hard,
            unreadable=list(unreadable),
        )
    runs = {wid: _one(wanted, ledger, now) for wid, ledger in sorted(read.items())}
    spent = sum((r.spent for r in runs.values()), Amount())
    held = sum((r.held for r in runs.values()), Amount())
    soft = sorted({u for r in runs.values() for u in _reached(r.spent, limits, "soft")})
    exceeded = [r for r in runs.values() if _reached(r.spent, limits, "hard") or r.refusals]
    hard = sorted({u for r in runs.values() for u in _reached(r.spent, limits, "hard")})
    if exceeded and not hard:
        hard = ["refused"]
    largest = max(runs.values(), key=lambda r: (r.spent.tokens, r.spent.cost_usd), default=None)
    tightest = max(runs.values(), key=lambda r: r.pressure(limits), default=None)
    return Figures(
        window="runs",
        spent=_rounded(spent),
        reserved=_rounded(held),
        remaining=_remaining(
            Amount() if tightest is None else tightest.spent + tightest.held, limits
        ),
        burn=Amount() if tightest is None else tightest.burn,
        exhaustion=None if tightest is None else tightest.exhaustion,
        refusals=sum(r.refusals for r in runs.values()),
        soft_exceeded=soft,
        hard_exceeded=hard,
        runs=RunWindows(
            tracked=len(runs),
            exceeded=len(exceeded),
            largest=_spent(Amount() if largest is None else largest.spent),
        ),
        unreadable=list(unreadable),
    )


def _spent(amount: Amount) -> Spent:
    return Spent(tokens=amount.tokens, cost_usd=_cost(amount.cost_usd))


def _units(units: Sequence[str]) -> str:
    named = {"tokens": "tokens", "costUsd": "dollars", "refused": "a call was refused"}
    return " and ".join(named.get(u, u) for u in units)


def limit_observations(wanted: BudgetDefinition, found: Figures) -> list[Observation]:
    """SoftLimitExceeded and HardLimitExceeded, True while the window is past them."""
    limits = wanted.limits
    spent = f"spent {found.spent.tokens} tokens and ${found.spent.cost_usd:g}"
    where = "in a run" if found.runs is not None else f"in window {found.window}"
    has_soft = bool(
        (limits.tokens and limits.tokens.soft) or (limits.cost_usd and limits.cost_usd.soft)
    )
    if found.soft_exceeded:
        soft = Observation(
            SOFT_LIMIT_EXCEEDED,
            True,
            SOFT_LIMIT_EXCEEDED,
            f"the soft limit in {_units(found.soft_exceeded)} is reached {where}: {spent}",
        )
    elif has_soft:
        soft = Observation(SOFT_LIMIT_EXCEEDED, False, "WithinSoftLimit", f"{spent} {where}")
    else:
        soft = Observation(SOFT_LIMIT_EXCEEDED, False, "NoSoftLimit", "no soft limit is set")
    if found.hard_exceeded == ["refused"]:
        hard = Observation(
            HARD_LIMIT_EXCEEDED,
            True,
            HARD_LIMIT_EXCEEDED,
            f"{found.refusals} calls were refused {where}: their holds would have passed the "
            f"hard limit; {spent}",
        )
    elif found.hard_exceeded:
        hard = Observation(
            HARD_LIMIT_EXCEEDED,
            True,
            HARD_LIMIT_EXCEEDED,
            f"the hard limit in {_units(found.hard_exceeded)} is reached {where}: calls are "
            f"refused; {spent}",
        )
    else:
        has_hard = bool(
            (limits.tokens and limits.tokens.hard) or (limits.cost_usd and limits.cost_usd.hard)
        )
        reason = "WithinHardLimit" if has_hard else "NoHardLimit"
        said = f"{spent} {where}" if has_hard else "no hard limit is set: no call is refused"
        hard = Observation(HARD_LIMIT_EXCEEDED, False, reason, said)
    return [soft, hard]


@dataclass(frozen=True)
class Messaging:
    """What the pass's NATS step came to: ``error`` when NATS failed it."""

    bucket: str
    url: str
    error: str | None = None

    def condition(self, wanted: BudgetDefinition) -> Observation:
        if self.error is not None:
            return Observation(
                MESSAGING_READY,
                False,
                "MessagingUnavailable",
                f"NATS at {self.url}: {self.error}; retrying",
            )
        return Observation(
            MESSAGING_READY,
            True,
            "DefinitionWritten",
            f"definition generation {wanted.generation} in bucket {self.bucket}",
        )


def _time(epoch: float | None) -> str | None:
    return None if epoch is None else timestamp(datetime.fromtimestamp(epoch, UTC))


def budget_status(
    previous: BudgetStatus,
    generation: int,
    now: datetime,
    wanted: BudgetDefinition,
    messaging: Messaging,
    found: Figures | None,
) -> BudgetStatus:
    """The next status; ``found`` None (NATS failed) keeps the figures last read."""
    observed = [SPEC_VALID_OK, messaging.condition(wanted)]
    if found is not None:
        observed += limit_observations(wanted, found)
    conditions = merge_conditions(
        previous.conditions,
        observed,
        BUDGET_SUBCONDITIONS,
        generation,
        now,
        BUDGET_ADVISORIES,
        ready_reason=ENFORCED,
    )
    update: dict[str, Any] = {
        "observed_generation": generation,
        "conditions": conditions,
        "agents": wanted.agents,
    }
    if found is not None:
        update |= {
            "window": found.window,
            "window_start": _time(found.start),
            "window_end": _time(found.end),
            "spent": _spent(found.spent),
            "reserved": _spent(found.reserved),
            "remaining": found.remaining,
            "burn_rate": BurnRate(
                tokens_per_hour=_significant(found.burn.tokens),
                cost_usd_per_hour=_significant(found.burn.cost_usd),
            ),
            "projected_exhaustion": (
                None if found.exhaustion is None else timestamp(found.exhaustion)
            ),
            "refusals": found.refusals,
            "runs": found.runs,
        }
    return previous.model_copy(update=update)


def budget_transitions(
    previous: Sequence[Condition], current: Sequence[Condition]
) -> list[Transition]:
    """The Events of a status write: the usual ones for Ready and the sub-conditions, and
    for the limits a Warning when one turns True (reason SoftLimitExceeded or
    HardLimitExceeded) and a Normal one when it turns False again (a new window)."""
    usual = transitions(
        [c for c in previous if c.type not in LIMITS],
        [c for c in current if c.type not in LIMITS],
    )
    by_type = {c.type: c for c in previous}
    limits = []
    for condition in current:
        if condition.type not in LIMITS:
            continue
        old = by_type.get(condition.type)
        was = old is not None and old.status == "True"
        now_is = condition.status == "True"
        if was == now_is:
            continue
        if not now_is and old is None:
            continue
        limits.append(
            Transition(
                condition.type, condition.status, condition.reason, condition.message, now_is
            )
        )
    return [*usual, *limits]


def gauges(found: Figures) -> dict[str, dict[str, float]]:
    """The operator's budget gauges: spent and remaining by unit, exceeded by level."""
    remaining: dict[str, float] = {}
    if found.remaining.tokens is not None:
        remaining["tokens"] = found.remaining.tokens
    if found.remaining.cost_usd is not None:
        remaining["costUsd"] = found.remaining.cost_usd
    return {
        "spent": {"tokens": found.spent.tokens, "costUsd": found.spent.cost_usd},
        "remaining": remaining,
        "exceeded": {
            "soft": 1.0 if found.soft_exceeded else 0.0,
            "hard": 1.0 if found.hard_exceeded else 0.0,
        },
    }


def spec_invalid_status(
    previous: BudgetStatus, generation: int, now: datetime, message: str
) -> BudgetStatus:
    """A spec the models refuse: Stalled, and the figures last read kept."""
    observed = Observation(SPEC_VALID, False, "SpecInvalid", message, stalled=True)
    return failed_status(previous, generation, now, observed)


def failed_status(
    previous: BudgetStatus, generation: int, now: datetime, observed: Observation
) -> BudgetStatus:
    """A pass that got no further than ``observed``: the figures last read kept."""
    conditions = merge_conditions(
        previous.conditions,
        [observed],
        BUDGET_SUBCONDITIONS,
        generation,
        now,
        BUDGET_ADVISORIES,
        ready_reason=ENFORCED,
    )
    return previous.model_copy(update={"observed_generation": generation, "conditions": conditions})
