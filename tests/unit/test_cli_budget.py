"""``troupe budget``'s pure parts: the bucket's entries sorted into definitions and
ledgers (junk survived), and the figures computed by the contract's ledger functions."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from troupe_cli import render
from troupe_cli.views import budget_records, budget_view
from troupe_runtime.contract import budget, naming
from troupe_runtime.contract.budget import Amount, BudgetDefinition, Ledger, Refused

NOW = datetime(2026, 12, 2, 10, 30, tzinfo=UTC).timestamp()


def definition(name: str = "team", **fields: Any) -> BudgetDefinition:
    base: dict[str, Any] = {
        "name": name,
        "generation": 1,
        "scope": "Namespace",
        "window": {"type": "Day"},
        "limits": {"tokens": {"hard": 1000}, "costUsd": {"hard": 2.0}},
    }
    return BudgetDefinition.model_validate({**base, **fields})


def entry(value: BudgetDefinition | Ledger) -> bytes:
    return value.model_dump_json(by_alias=True).encode()


def ledger_with(
    defined: BudgetDefinition, wid: str, committed: list[int], held: list[int]
) -> Ledger:
    ledger = budget.fresh_ledger(defined.window, wid, NOW - 3600)
    for i, tokens in enumerate([*committed, *held]):
        reserved = budget.reserve(defined, ledger, f"h{i}", Amount(tokens=tokens), NOW - 60, 600)
        assert not isinstance(reserved, Refused)
        ledger = reserved
    for i, tokens in enumerate(committed):
        ledger = budget.commit(ledger, defined.window, f"h{i}", Amount(tokens=tokens), NOW - 30)
    return ledger


def test_definitions_and_their_ledgers_are_told_apart_by_key() -> None:
    team, other = definition("team"), definition("team-b")
    ledger = budget.fresh_ledger(team.window, "d20261202", NOW)
    yesterday = budget.fresh_ledger(team.window, "d20261201", NOW)
    records = budget_records(
        {
            naming.budget_definition_key("team"): entry(team),
            naming.budget_definition_key("team-b"): entry(other),
            naming.budget_ledger_key("team", "d20261202"): entry(ledger),
            naming.budget_ledger_key("team-b", "d20261201"): entry(yesterday),
            naming.budget_ledger_key("gone", "d20261202"): entry(ledger),  # no definition
        }
    )
    assert sorted(records.definitions) == ["team", "team-b"]
    assert list(records.ledgers["team"]) == ["d20261202"]
    assert list(records.ledgers["team-b"]) == ["d20261201"]
    assert records.unreadable == []


def test_a_definition_or_ledger_under_another_ones_key_is_not_believed() -> None:
    team = definition("team")
    today = budget.fresh_ledger(team.window, "d20261202", NOW)
    records = budget_records(
        {
            naming.budget_definition_key("x"): entry(team),
            naming.budget_definition_key("team"): entry(team),
            naming.budget_ledger_key("team", "d20261203"): entry(today),
        }
    )
    assert list(records.definitions) == ["team"]
    assert records.ledgers["team"] == {}
    assert records.unreadable == ["def.x", "ledger.team.d20261203"]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=8,
)
LEDGERISH = st.fixed_dictionaries(
    {"window": st.text(), "started": st.floats(allow_nan=False)},
    optional={"spent": JSON, "holds": JSON, "refusals": JSON, "slots": JSON},
)
VALUES = st.binary() | (JSON | LEDGERISH).map(lambda value: json.dumps(value).encode())


WINDOWS = [{"type": "Day"}, {"type": "Run"}, {"type": "Rolling", "duration": "1h"}]
KEYS = ["def.team", "ledger.team.d20261202", "ledger.team.rolling", "ledger.team.run-ab", "x"]


@settings(max_examples=300)
@given(st.sampled_from(WINDOWS), st.dictionaries(st.sampled_from(KEYS), VALUES))
def test_no_bytes_in_the_bucket_break_the_listing(
    window: dict[str, Any], entries: dict[str, bytes]
) -> None:
    team = definition(window=window)
    records = budget_records({naming.budget_definition_key("team"): entry(team), **entries})
    for name, found in records.definitions.items():
        budget_view(found, records.ledgers[name], NOW)


def test_the_current_day_is_shown_with_its_holds_and_what_is_left() -> None:
    team = definition()
    today = budget.window_id(team.window, NOW, None)
    assert today == "d20261202"
    ledgers = {
        today: ledger_with(team, today, [300, 100], [200]),
        "d20261201": ledger_with(team, "d20261201", [999], []),
    }
    view = budget_view(team, ledgers, NOW)
    assert view.window == "d20261202"
    assert view.spent.tokens == 400
    assert view.held.tokens == 200
    assert view.remaining_tokens == 400
    assert view.window_start == datetime(2026, 12, 2, tzinfo=UTC)
    assert view.window_end == datetime(2026, 12, 3, tzinfo=UTC)
    assert [w.window for w in view.windows] == ["d20261202", "d20261201"]
    assert view.runs is None
    text = render.budget_text(view)
    assert "spent:       400 tokens, $0" in text
    assert "remaining:   400 / $2" in text


def test_a_day_nothing_was_spent_in_yet_shows_the_whole_limit() -> None:
    view = budget_view(definition(), {}, NOW)
    assert (view.spent, view.held) == (Amount(), Amount())
    assert (view.remaining_tokens, view.remaining_cost) == (1000, 2.0)
    assert view.projected_exhaustion is None
    assert "nothing spent yet" in render.budget_text(view)


def test_run_windows_sum_the_runs_and_remaining_is_the_closest_runs() -> None:
    per_run = definition(
        "per-run",
        scope="Workflow",
        workflow="wf",
        window={"type": "Run"},
        limits={"tokens": {"hard": 500}},
    )
    a, b = naming.run_window_token("a"), naming.run_window_token("b")
    ledgers = {
        a: ledger_with(per_run, a, [100], []),
        b: ledger_with(per_run, b, [300], [100]),
        "d20261202": ledger_with(definition(), "d20261202", [50], []),  # an older window type
    }
    view = budget_view(per_run, ledgers, NOW)
    assert view.spent.tokens == 400
    assert view.held.tokens == 100
    assert view.remaining_tokens == 100
    assert view.remaining_cost is None
    assert (view.runs, view.runs_exceeded) == (2, 0)
    assert view.largest_run == Amount(tokens=300)
    assert [w.window for w in view.windows] == [b, a]
    assert render.budget_json(view)["runs"]["tracked"] == 2


def test_a_refused_run_counts_as_exceeded() -> None:
    per_run = definition(window={"type": "Run"}, limits={"tokens": {"hard": 100}})
    wid = naming.run_window_token("r")
    ledger = ledger_with(per_run, wid, [90], [])
    refused = budget.reserve(per_run, ledger, "more", Amount(tokens=50), NOW, 600)
    assert isinstance(refused, Refused)
    view = budget_view(per_run, {wid: refused.ledger}, NOW)
    assert view.runs_exceeded == 1
    assert view.refusals == 1


def test_the_listing_table_and_json() -> None:
    rolling = definition(
        "burst", scope="Agents", agents=["writer"], window={"type": "Rolling", "duration": "6h"}
    )
    views = [budget_view(d, {}, NOW) for d in (definition(), rolling)]
    text = render.budgets_text(views)
    assert text.splitlines()[0].split()[:4] == ["NAME", "SCOPE", "WINDOW", "TOKENS"]
    assert "Agents (writer)" in text
    assert "Rolling 6h" in text
    documents = render.budgets_json(views)
    assert documents[1]["window"] == {"type": "Rolling", "duration": "6h"}
    assert documents[1]["windowEnd"] is None
    assert render.budgets_text([]) == "no budgets"


@settings(max_examples=200, deadline=None)
@given(
    committed=st.lists(st.integers(min_value=0, max_value=300), max_size=4),
    held=st.lists(st.integers(min_value=0, max_value=300), max_size=4),
)
def test_remaining_is_hard_less_spent_less_held_never_below_zero(
    committed: list[int], held: list[int]
) -> None:
    team = definition(limits={"tokens": {"hard": 100_000}})
    wid = "d20261202"
    view = budget_view(team, {wid: ledger_with(team, wid, committed, held)}, NOW)
    assert view.spent.tokens == sum(committed)
    assert view.held.tokens == sum(held)
    assert view.remaining_tokens == max(0, 100_000 - sum(committed) - sum(held))


def test_a_slow_burn_against_a_large_rolling_limit_projects_no_exhaustion() -> None:
    """A billionth of a dollar in an hour against $1000: the projection lands a million
    years out, past what a datetime holds; it is none (it used to raise ValueError)."""
    rolling = definition(
        window={"type": "Rolling", "duration": "1h"}, limits={"costUsd": {"hard": 1000.0}}
    )
    ledger = budget.fresh_ledger(rolling.window, "rolling", NOW - 30)
    tiny = Amount(tokens=1, cost_usd=1e-9)
    held = budget.reserve(rolling, ledger, "h", tiny, NOW - 20, 600)
    assert not isinstance(held, Refused)
    ledger = budget.commit(held, rolling.window, "h", tiny, NOW - 10)
    assert budget.projected_exhaustion(ledger, rolling, NOW) is None
    assert budget_view(rolling, {"rolling": ledger}, NOW).projected_exhaustion is None
