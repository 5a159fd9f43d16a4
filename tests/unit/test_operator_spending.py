"""A Budget's pass, planned purely (``builders.spending``): the definition with its selector
resolved, rewritten only when it changed; which ledgers are read and which pruned (never the
current window's); what a ledger comes to in status, conditions, Events and gauges; and an
idle budget's status that does not change from one pass to the next."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from troupe_operator.api.budget import BudgetStatus
from troupe_operator.builders import spending
from troupe_operator.builders.status import READY, RECONCILING
from troupe_runtime.contract import budget as ledgers
from troupe_runtime.contract.budget import (
    Amount,
    BudgetDefinition,
    BudgetSpec,
    Hold,
    LabelSelector,
    Ledger,
)

NOW = datetime(2026, 12, 2, 10, 30, tzinfo=UTC).timestamp()
"""10:30 UTC, 2 December 2026."""
HOUR = 3600.0


def spec(window: dict[str, Any] | None = None, **limits: Any) -> BudgetSpec:
    return BudgetSpec.model_validate(
        {
            "scope": {"type": "Namespace"},
            "window": window or {"type": "Day"},
            "limits": limits or {"tokens": {"soft": 800, "hard": 1000}},
        }
    )


def define(window: dict[str, Any] | None = None, **limits: Any) -> BudgetDefinition:
    return spending.definition("team", 3, spec(window, **limits), None)


def agent(
    name: str, labels: dict[str, str] | None = None, deleting: bool = False
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels or {}}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-02T10:00:00Z"
    return {"metadata": meta}


def ledger(
    wid: str = "d20261202",
    tokens: int = 0,
    cost: float = 0.0,
    held: int = 0,
    refusals: int = 0,
    updated: float = NOW - 60,
    started: float | None = None,
) -> Ledger:
    holds = {}
    if held:
        holds["h1"] = Hold(amount=Amount(tokens=held), expires=NOW + 300)
    return Ledger(
        window=wid,
        started=started if started is not None else datetime(2026, 12, 2, tzinfo=UTC).timestamp(),
        updated=updated,
        spent=Amount(tokens=tokens, cost_usd=cost),
        holds=holds,
        refusals=refusals,
    )


# The definition.


def test_the_selector_picks_agents_by_label_sorted_and_not_those_being_deleted() -> None:
    selector = LabelSelector.model_validate({"matchLabels": {"team": "research"}})
    listed = [
        agent("writer", {"team": "research"}),
        agent("analyst", {"team": "research", "tier": "a"}),
        agent("retriever", {"team": "support"}),
        agent("leaving", {"team": "research"}, deleting=True),
        agent("bare"),
    ]

    assert spending.resolve_agents(selector, listed) == ["analyst", "writer"]


LABELS = st.dictionaries(
    st.sampled_from(["team", "tier", "app"]), st.sampled_from(["a", "b"]), max_size=3
)


@given(
    selector=st.builds(
        lambda labels, key, op, values: LabelSelector.model_validate(
            {
                "matchLabels": labels,
                "matchExpressions": [{"key": key, "operator": op, "values": values}] if op else [],
            }
        ),
        LABELS,
        st.sampled_from(["team", "tier"]),
        st.sampled_from(["", "In", "NotIn", "Exists", "DoesNotExist"]),
        st.lists(st.sampled_from(["a", "b"]), max_size=2),
    ),
    agents=st.lists(LABELS, max_size=6),
)
def test_resolution_is_the_selector_applied_to_each_agent(
    selector: LabelSelector, agents: list[dict[str, str]]
) -> None:
    listed = [agent(f"a{i}", labels) for i, labels in enumerate(agents)]

    resolved = spending.resolve_agents(selector, listed)

    assert resolved == sorted(
        f"a{i}" for i, labels in enumerate(agents) if selector.matches(labels)
    )


def test_the_definition_carries_the_resolved_agents_only_for_an_agents_scope() -> None:
    agents_spec = BudgetSpec.model_validate(
        {
            "scope": {"type": "Agents", "agents": {"matchLabels": {"team": "a"}}},
            "window": {"type": "Hour"},
            "limits": {"costUsd": {"hard": 5}},
        }
    )
    flow_spec = BudgetSpec.model_validate(
        {
            "scope": {"type": "Workflow", "workflow": "research"},
            "window": {"type": "Run"},
            "limits": {"tokens": {"hard": 5}},
        }
    )

    picked = spending.definition("b", 2, agents_spec, ["x", "y"])
    flow = spending.definition("f", 1, flow_spec, None)

    assert (picked.scope, picked.agents, picked.generation) == ("Agents", ["x", "y"], 2)
    assert (flow.scope, flow.workflow, flow.agents) == ("Workflow", "research", None)


def test_the_definition_is_rewritten_only_when_it_changed() -> None:
    wanted = define()
    other = spending.definition("team", 4, spec(), None)

    assert spending.definition_stale(None, wanted)
    assert spending.definition_stale(b"{not json", wanted)
    assert spending.definition_stale(b'{"name": "team"}', wanted)
    assert spending.definition_stale(spending.encode_definition(other), wanted)
    assert not spending.definition_stale(spending.encode_definition(wanted), wanted)


WINDOWS = st.sampled_from(
    [
        {"type": "Run"},
        {"type": "Hour"},
        {"type": "Day"},
        {"type": "Month"},
        {"type": "Rolling", "duration": "6h"},
    ]
)
LIMITS = st.fixed_dictionaries(
    {},
    optional={
        "tokens": st.fixed_dictionaries({}, optional={"hard": st.integers(1, 10**9)}),
        "costUsd": st.fixed_dictionaries(
            {}, optional={"hard": st.floats(0.01, 1e6, allow_nan=False)}
        ),
    },
).filter(lambda limits: bool(limits))


@given(window=WINDOWS, limits=LIMITS, agents=st.none() | st.lists(st.text(min_size=1)))
def test_a_definition_written_is_never_stale(
    window: dict[str, Any], limits: dict[str, Any], agents: list[str] | None
) -> None:
    wanted = spending.definition("b", 1, spec(window, **limits), agents)

    assert not spending.definition_stale(spending.encode_definition(wanted), wanted)


# Which ledgers.


def test_a_calendar_window_reads_its_current_ledger_and_a_run_window_every_run() -> None:
    present = ["d20261201", "d20261202", "run-1", "rolling"]

    assert spending.to_read(define(), present, NOW) == ["d20261202"]
    assert spending.to_read(define(), ["d20261201"], NOW) == []
    assert spending.to_read(define({"type": "Run"}), [*present, "run-0"], NOW) == [
        "run-0",
        "run-1",
    ]
    rolling = define({"type": "Rolling", "duration": "1h"})
    assert spending.to_read(rolling, present, NOW) == ["rolling"]


@pytest.mark.parametrize(
    ("wid", "end"),
    [
        ("h2026120210", datetime(2026, 12, 2, 11, tzinfo=UTC)),
        ("d20261231", datetime(2027, 1, 1, tzinfo=UTC)),
        ("m202612", datetime(2027, 1, 1, tzinfo=UTC)),
        ("m202602", datetime(2026, 3, 1, tzinfo=UTC)),
    ],
)
def test_a_calendar_windows_end(wid: str, end: datetime) -> None:
    assert spending.calendar_end(wid) == end.timestamp()


@pytest.mark.parametrize("wid", ["rolling", "run-ab", "h20261302", "d2026120", "x1", "", "h1"])
def test_what_is_no_calendar_window_has_no_end(wid: str) -> None:
    assert spending.calendar_end(wid) is None


def test_ended_windows_are_pruned_after_a_grace_and_the_current_one_never() -> None:
    day = define()
    present = [
        "d20261202",  # today
        "d20261201",  # ended 10.5 h ago
        "h2026120209",  # another window kind (the budget was Hourly)
        "rolling",  # likewise
        "run-x",  # likewise
        "junk",  # unknown: kept
    ]

    assert spending.to_prune(day, present, {}, NOW) == [
        "d20261201",
        "h2026120209",
        "rolling",
        "run-x",
    ]
    hourly = define({"type": "Hour"})
    just_ended = ["h2026120210", "h2026120209", "h2026120208"]
    # 09's ended 30 minutes ago (within the grace); 08's 1.5 hours ago.
    assert spending.to_prune(hourly, just_ended, {}, NOW) == ["h2026120208"]


def test_a_runs_ledger_is_pruned_once_idle_with_no_hold_in_flight() -> None:
    runs = define({"type": "Run"})
    idle = NOW - spending.RUN_LEDGER_RETENTION_SECONDS - 1
    read = {
        "run-old": ledger("run-old", tokens=5, updated=idle),
        "run-held": ledger("run-held", tokens=5, held=10, updated=idle),
        "run-new": ledger("run-new", tokens=5),
    }

    assert spending.to_prune(runs, [*read, "run-unread"], read, NOW) == ["run-old"]


@settings(max_examples=200)
@given(
    window=WINDOWS,
    offsets=st.lists(st.integers(-90 * 24, 24), max_size=8),
    now=st.floats(NOW - 400 * 86400, NOW + 400 * 86400),
)
def test_the_current_window_is_never_pruned_nor_anything_not_present(
    window: dict[str, Any], offsets: list[int], now: float
) -> None:
    wanted = define(window)
    present = [
        ledgers.window_id(ledgers.BudgetWindow.model_validate(w), now + h * HOUR, "run")
        for h in offsets
        for w in ({"type": "Hour"}, {"type": "Day"}, {"type": "Month"}, window)
    ]
    current = spending.current_window(wanted, now)
    windows = sorted({w for w in present if w is not None} | ({current} if current else set()))

    pruned = spending.to_prune(wanted, windows, {}, now)

    assert current not in pruned
    assert set(pruned) <= set(windows)


def test_ledgers_that_are_not_ledgers_are_set_apart() -> None:
    good = ledger(tokens=7)
    parsed, junk = spending.parse_ledgers(
        {"d20261202": good.model_dump_json().encode(), "d20261201": b"[1, 2", "x": b"{}"}
    )

    assert parsed == {"d20261202": good}
    assert junk == ["d20261201", "x"]


# What they come to.


def test_a_days_ledger_comes_to_spent_reserved_remaining_and_burn() -> None:
    wanted = define(tokens={"soft": 800, "hard": 1000}, costUsd={"hard": 2.0})
    found = spending.figures(wanted, {"d20261202": ledger(tokens=630, cost=0.5, held=70)}, NOW)

    assert found.window == "d20261202"
    assert found.start == datetime(2026, 12, 2, tzinfo=UTC).timestamp()
    assert found.end == datetime(2026, 12, 3, tzinfo=UTC).timestamp()
    assert (found.spent.tokens, found.spent.cost_usd) == (630, 0.5)
    assert found.reserved.tokens == 70
    assert (found.remaining.tokens, found.remaining.cost_usd) == (300, 1.5)
    assert found.burn.tokens == round(630 / 10.5)
    assert found.soft_exceeded == []
    assert found.hard_exceeded == []
    assert found.exhaustion is not None


def test_no_ledger_yet_is_nothing_spent() -> None:
    found = spending.figures(define(), {}, NOW)

    assert found.spent == Amount()
    assert found.remaining.tokens == 1000
    assert found.remaining.cost_usd is None
    assert found.exhaustion is None


def test_soft_and_hard_limits_reached_and_a_refusal_below_the_hard_limit() -> None:
    wanted = define()
    soft = spending.figures(wanted, {"d20261202": ledger(tokens=800)}, NOW)
    hard = spending.figures(wanted, {"d20261202": ledger(tokens=1000)}, NOW)
    refused = spending.figures(wanted, {"d20261202": ledger(tokens=900, refusals=2)}, NOW)

    assert (soft.soft_exceeded, soft.hard_exceeded) == (["tokens"], [])
    assert (hard.soft_exceeded, hard.hard_exceeded) == (["tokens"], ["tokens"])
    assert hard.remaining.tokens == 0
    assert refused.hard_exceeded == ["refused"]
    assert refused.refusals == 2


def test_run_windows_sum_their_runs_and_remaining_is_the_tightest_runs() -> None:
    wanted = define({"type": "Run"}, tokens={"hard": 1000})
    read = {
        "run-a": ledger("run-a", tokens=100, started=NOW - 600),
        "run-b": ledger("run-b", tokens=900, held=50, started=NOW - 600),
        "run-c": ledger("run-c", tokens=1000, started=NOW - 600),
        "run-d": ledger("run-d", tokens=10, refusals=1, started=NOW - 600),
    }

    found = spending.figures(wanted, read, NOW)

    assert found.window == "runs"
    assert found.spent.tokens == 2010
    assert found.reserved.tokens == 50
    assert found.remaining.tokens == 0  # run-c is at its limit
    assert found.runs is not None
    assert (found.runs.tracked, found.runs.exceeded) == (4, 2)
    assert found.runs.largest.tokens == 1000
    assert found.hard_exceeded == ["tokens"]
    assert (found.start, found.end) == (None, None)


def _status(
    wanted: BudgetDefinition,
    read: dict[str, Ledger],
    now: float,
    previous: BudgetStatus | None = None,
    error: str | None = None,
) -> BudgetStatus:
    messaging = spending.Messaging("troupe_team_budgets", "nats://nats:4222", error)
    found = None if error else spending.figures(wanted, read, now)
    return spending.budget_status(
        previous or BudgetStatus(),
        wanted.generation,
        datetime.fromtimestamp(now, UTC),
        wanted,
        messaging,
        found,
    )


def _condition(status: BudgetStatus, kind: str) -> tuple[str, str]:
    (found,) = [c for c in status.conditions if c.type == kind]
    return found.status, found.reason


def test_a_budget_written_to_nats_is_ready_enforced_and_says_how_it_stands() -> None:
    status = _status(define(), {"d20261202": ledger(tokens=850)}, NOW)

    assert _condition(status, READY) == ("True", "Enforced")
    assert _condition(status, spending.SOFT_LIMIT_EXCEEDED) == ("True", "SoftLimitExceeded")
    assert _condition(status, spending.HARD_LIMIT_EXCEEDED) == ("False", "WithinHardLimit")
    assert status.window_start == "2026-12-02T00:00:00Z"
    assert status.window_end == "2026-12-03T00:00:00Z"
    assert status.observed_generation == 3
    dumped = status.model_dump(by_alias=True, exclude_none=True)
    assert dumped["spent"] == {"tokens": 850, "costUsd": 0.0}
    assert dumped["remaining"] == {"tokens": 150}


def test_nats_unreachable_keeps_the_figures_and_reconciles() -> None:
    first = _status(define(), {"d20261202": ledger(tokens=850)}, NOW)
    later = _status(define(), {}, NOW + 10, first, error="connection refused")

    assert _condition(later, READY) == ("False", "MessagingUnavailable")
    assert _condition(later, RECONCILING) == ("True", "MessagingUnavailable")
    assert later.spent.tokens == 850


def test_an_idle_budget_gives_the_same_status_pass_after_pass() -> None:
    wanted = define()
    read = {"d20261202": ledger(tokens=400, updated=NOW - 30)}
    first = _status(wanted, read, NOW)
    again = _status(wanted, read, NOW + 10, first)

    assert again == first


@settings(max_examples=200)
@given(
    window=WINDOWS,
    tokens=st.integers(0, 5000),
    cost=st.floats(0, 50, allow_nan=False),
    written=st.floats(0, 1),
    later=st.floats(0, 1),
)
def test_between_spends_status_changes_only_when_the_burn_clock_ticks(
    window: dict[str, Any], tokens: int, cost: float, written: float, later: float
) -> None:
    """Within one tick of ``BURN_RESOLUTION_SECONDS`` after the last write, with no hold to
    expire and no rolling slot leaving, two passes give the same status."""
    tick = spending.BURN_RESOLUTION_SECONDS
    start = (NOW // tick) * tick
    updated = start + written * (tick / 2)
    first_pass = updated + later * (tick / 4)
    second_pass = first_pass + tick / 4 - 1
    wanted = define(window, tokens={"soft": 2000, "hard": 4000}, costUsd={"hard": 40})
    wid = spending.current_window(wanted, first_pass) or "run-x"
    one = ledger(wid, tokens=tokens, cost=cost, updated=updated, started=start - 7200)
    if window["type"] == "Rolling":
        slot = ledgers.slot_index(wanted.window, updated)
        one = one.model_copy(update={"slots": {slot: one.spent}})

    first = _status(wanted, {wid: one}, first_pass)
    second = _status(wanted, {wid: one}, second_pass, first)

    assert second == first


def _conditions(status: BudgetStatus) -> list[Any]:
    return list(status.conditions)


def test_limits_turning_true_are_warnings_and_turning_false_again_normal() -> None:
    wanted = define()
    within = _status(wanted, {"d20261202": ledger(tokens=100)}, NOW)
    soft = _status(wanted, {"d20261202": ledger(tokens=850)}, NOW + 10, within)
    hard = _status(wanted, {"d20261202": ledger(tokens=1000)}, NOW + 20, soft)
    next_day = _status(wanted, {}, NOW + 86400, hard)

    first = spending.budget_transitions([], _conditions(within))
    assert [(t.type, t.status, t.warning) for t in first] == [("Ready", "True", False)]
    to_soft = spending.budget_transitions(_conditions(within), _conditions(soft))
    assert [(t.reason, t.warning) for t in to_soft] == [("SoftLimitExceeded", True)]
    to_hard = spending.budget_transitions(_conditions(soft), _conditions(hard))
    assert [(t.reason, t.warning) for t in to_hard] == [("HardLimitExceeded", True)]
    assert "calls are refused" in to_hard[0].message
    cleared = spending.budget_transitions(_conditions(hard), _conditions(next_day))
    assert [(t.reason, t.warning) for t in cleared] == [
        ("WithinSoftLimit", False),
        ("WithinHardLimit", False),
    ]
    assert spending.budget_transitions(_conditions(hard), _conditions(hard)) == []


def test_a_budget_born_exceeded_warns_at_once() -> None:
    exceeded = _status(define(), {"d20261202": ledger(tokens=2000)}, NOW)

    reasons = [t.reason for t in spending.budget_transitions([], _conditions(exceeded))]

    assert reasons == ["Enforced", "SoftLimitExceeded", "HardLimitExceeded"]


def test_gauges_by_unit_and_level() -> None:
    wanted = define(tokens={"hard": 1000})
    found = spending.figures(wanted, {"d20261202": ledger(tokens=1000, cost=0.25)}, NOW)

    assert spending.gauges(found) == {
        "spent": {"tokens": 1000, "costUsd": 0.25},
        "remaining": {"tokens": 0},
        "exceeded": {"soft": 0.0, "hard": 1.0},
    }


def test_a_spec_the_models_refuse_stalls_and_keeps_the_figures() -> None:
    first = _status(define(), {"d20261202": ledger(tokens=850)}, NOW)

    refused = spending.spec_invalid_status(
        first, 4, datetime.fromtimestamp(NOW, UTC), "spec.limits: limits needs tokens or costUsd"
    )

    assert _condition(refused, READY) == ("False", "SpecInvalid")
    assert _condition(refused, "Stalled") == ("True", "SpecInvalid")
    assert refused.spent.tokens == 850
