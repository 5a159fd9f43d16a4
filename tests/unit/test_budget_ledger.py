"""The budget ledger's pure planning (``contract.budget``): windows, holds, commits,
releases, reaping, limits crossed, burn rate; examples and properties."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from troupe_runtime.contract import budget as b
from troupe_runtime.contract import naming
from troupe_runtime.contract.budget import (
    Amount,
    BudgetDefinition,
    BudgetLimits,
    BudgetUnavailable,
    BudgetWindow,
    CostLimits,
    LabelSelector,
    LabelSelectorRequirement,
    Ledger,
    Refused,
    SpendContext,
    TokenLimits,
)
from troupe_runtime.state.budgets import decode, encode

NOW = datetime(2026, 12, 2, 1, 30, 15, tzinfo=UTC).timestamp()
TTL = 600.0
DAY = BudgetWindow(type="Day")


def definition(
    hard: int | None = 1000,
    soft: int | None = None,
    window: BudgetWindow = DAY,
    cost_hard: float | None = None,
    scope: str = "Namespace",
    agents: list[str] | None = None,
    workflow: str | None = None,
) -> BudgetDefinition:
    tokens = TokenLimits(hard=hard, soft=soft) if hard or soft else None
    cost = CostLimits(hard=cost_hard) if cost_hard else None
    return BudgetDefinition.model_validate(
        {
            "name": "cap",
            "generation": 1,
            "scope": scope,
            "agents": agents,
            "workflow": workflow,
            "window": window,
            "limits": BudgetLimits(tokens=tokens, cost_usd=cost),
        }
    )


def fresh(d: BudgetDefinition, now: float = NOW, run: str | None = "run-1") -> Ledger:
    wid = b.window_id(d.window, now, run)
    assert wid is not None
    return b.fresh_ledger(d.window, wid, now)


def granted(outcome: Ledger | Refused) -> Ledger:
    assert isinstance(outcome, Ledger), outcome
    return outcome


# Windows.


def test_calendar_window_ids_are_utc() -> None:
    assert b.window_id(BudgetWindow(type="Hour"), NOW, None) == "h2026120201"
    assert b.window_id(DAY, NOW, None) == "d20261202"
    assert b.window_id(BudgetWindow(type="Month"), NOW, None) == "m202612"
    assert (
        b.window_id(BudgetWindow(type="Rolling", duration=timedelta(hours=6)), NOW, None)
        == "rolling"
    )


def test_a_run_window_is_the_digest_of_the_run_and_none_without_one() -> None:
    run = BudgetWindow(type="Run")
    assert b.window_id(run, NOW, "order 42/é") == naming.run_window_token("order 42/é")
    assert b.window_id(run, NOW, None) is None
    assert b.window_id(run, NOW, "a") != b.window_id(run, NOW, "b")


def test_month_bounds_roll_into_the_next_year() -> None:
    month = BudgetWindow(type="Month")
    ledger = b.fresh_ledger(month, "m202612", NOW)
    start, end = b.window_bounds(month, ledger, NOW)
    assert start == datetime(2026, 12, 1, tzinfo=UTC).timestamp() == ledger.started
    assert end == datetime(2027, 1, 1, tzinfo=UTC).timestamp()


@given(
    st.sampled_from(["Hour", "Day", "Month"]),
    st.floats(min_value=0, max_value=4102444800, allow_nan=False),
)
def test_calendar_bounds_hold_now_and_only_their_window(kind: str, now: float) -> None:
    window = BudgetWindow.model_validate({"type": kind})
    wid = b.window_id(window, now, None)
    assert wid is not None
    assert naming.budget_ledger_key("x", wid).count(".") == 2
    start, end = b.window_bounds(window, b.fresh_ledger(window, wid, now), now)
    assert end is not None
    assert start <= now < end
    assert b.window_id(window, start, None) == wid
    assert b.window_id(window, end, None) != wid
    assert b.window_id(window, end - 0.001, None) == wid


# Which budgets apply.


def spend(agent: str = "a", workflow: str | None = None, run: str | None = None) -> SpendContext:
    return SpendContext(agent=agent, workflow=workflow, run=run, hold_id="h")


def test_which_budgets_apply() -> None:
    assert definition().applies(spend())
    agents = definition(scope="Agents", agents=["a", "b"])
    assert agents.applies(spend("a"))
    assert not agents.applies(spend("c"))
    wf = definition(scope="Workflow", workflow="wf")
    assert wf.applies(spend(workflow="wf"))
    assert not wf.applies(spend(workflow="other"))
    assert not wf.applies(spend())
    per_run = definition(window=BudgetWindow(type="Run"))
    assert per_run.applies(spend(run="r"))
    assert not per_run.applies(spend())


def test_label_selectors_as_kubernetes() -> None:
    def sel(op: str, values: list[str] | None = None) -> LabelSelector:
        requirement = LabelSelectorRequirement.model_validate(
            {"key": "tier", "operator": op, "values": values or []}
        )
        return LabelSelector(match_expressions=[requirement])

    assert LabelSelector().matches({})
    assert LabelSelector(match_labels={"team": "x"}).matches({"team": "x", "o": "1"})
    assert not LabelSelector(match_labels={"team": "x"}).matches({"team": "y"})
    assert sel("In", ["a", "b"]).matches({"tier": "a"})
    assert not sel("In", ["a"]).matches({})
    assert sel("NotIn", ["a"]).matches({})
    assert sel("NotIn", ["a"]).matches({"tier": "b"})
    assert not sel("NotIn", ["a"]).matches({"tier": "a"})
    assert sel("Exists").matches({"tier": ""})
    assert not sel("Exists").matches({})
    assert sel("DoesNotExist").matches({})
    assert not sel("DoesNotExist").matches({"tier": "a"})


labels = st.dictionaries(st.sampled_from("abc"), st.sampled_from("xyz"), max_size=3)


@given(labels, labels)
def test_match_labels_is_a_subset_test(wanted: dict[str, str], have: dict[str, str]) -> None:
    selector = LabelSelector(match_labels=wanted)
    assert selector.matches(have) == (wanted.items() <= have.items())


# Holds, commits, releases.


def test_a_hold_is_refused_when_spent_plus_held_plus_asked_passes_hard() -> None:
    d = definition(hard=100)
    ledger = granted(b.reserve(d, fresh(d), "h1", Amount(tokens=60), NOW, TTL))
    refused = b.reserve(d, ledger, "h2", Amount(tokens=41), NOW, TTL)
    assert isinstance(refused, Refused)
    assert refused.error.unit == "tokens"
    assert refused.error.limit == 100
    assert refused.ledger.refusals == 1
    assert "h2" not in refused.ledger.holds
    exact = granted(b.reserve(d, ledger, "h2", Amount(tokens=40), NOW, TTL))
    assert b.held(exact, NOW) == Amount(tokens=100)


def test_cost_is_capped_too() -> None:
    d = definition(hard=None, cost_hard=1.0)
    ledger = granted(b.reserve(d, fresh(d), "h1", Amount(tokens=5, cost_usd=0.75), NOW, TTL))
    refused = b.reserve(d, ledger, "h2", Amount(cost_usd=0.5), NOW, TTL)
    assert isinstance(refused, Refused)
    assert refused.error.unit == "costUsd"


def test_reserving_the_same_hold_twice_is_one_hold() -> None:
    d = definition(hard=100)
    once = granted(b.reserve(d, fresh(d), "h1", Amount(tokens=60), NOW, TTL))
    assert b.reserve(d, once, "h1", Amount(tokens=60), NOW + 1, TTL) is once


def test_commit_replaces_the_hold_by_the_actual() -> None:
    d = definition(hard=100)
    ledger = granted(b.reserve(d, fresh(d), "h1", Amount(tokens=60), NOW, TTL))
    done = b.commit(ledger, d.window, "h1", Amount(tokens=25, cost_usd=0.1), NOW + 2)
    assert done.holds == {}
    assert done.spent == Amount(tokens=25, cost_usd=0.1)
    assert b.commit(done, d.window, "h1", Amount(tokens=25), NOW + 3) is done
    assert b.release(done, "h1") is done


def test_an_expired_hold_is_charged_in_full_and_a_late_commit_corrects_it() -> None:
    d = definition(hard=100)
    ledger = granted(b.reserve(d, fresh(d), "slow", Amount(tokens=60), NOW, 10))
    later = granted(b.reserve(d, ledger, "next", Amount(tokens=40), NOW + 11, TTL))
    assert later.spent == Amount(tokens=60)
    assert later.reaped == {"slow": Amount(tokens=60)}
    assert b.held(later, NOW + 11) == Amount(tokens=40)
    # A reader sees the expired hold as spent before any write reaps it.
    assert b.spent(ledger, d.window, NOW + 11) == Amount(tokens=60)
    corrected = b.commit(later, d.window, "slow", Amount(tokens=7), NOW + 12)
    assert corrected.spent == Amount(tokens=7)
    assert corrected.reaped == {}
    assert b.commit(corrected, d.window, "slow", Amount(tokens=7), NOW + 13) is corrected
    released = b.release(later, "slow")
    assert released.spent == Amount()
    assert released.reaped == {}


def test_a_hold_expiring_implausibly_late_is_junk_and_dropped_uncharged() -> None:
    d = definition(hard=100)
    huge = Amount(tokens=10**12)
    junk = fresh(d).model_copy(update={"holds": {"x": b.Hold(amount=huge, expires=NOW + 10**9)}})
    assert b.held(junk, NOW) == Amount()
    assert b.spent(junk, d.window, NOW) == Amount()
    kept = granted(b.reserve(d, junk, "h", Amount(tokens=100), NOW, TTL))
    assert list(kept.holds) == ["h"]
    assert kept.spent == Amount()


def test_too_many_holds_is_unavailable_not_exceeded() -> None:
    d = definition(hard=None, cost_hard=1e6)
    holds = {f"h{i}": b.Hold(amount=Amount(), expires=NOW + TTL) for i in range(b.MAX_HOLDS)}
    full = fresh(d).model_copy(update={"holds": holds})
    with pytest.raises(BudgetUnavailable):
        b.reserve(d, full, "one-more", Amount(), NOW, TTL)


def test_reaped_is_bounded_newest_kept() -> None:
    d = definition(hard=None, cost_hard=1e6)
    ledger = fresh(d)
    for i in range(b.MAX_REAPED + 10):
        ledger = granted(b.reserve(d, ledger, f"h{i}", Amount(tokens=1), NOW + i, 0.5))
    ledger = b.reap(ledger, d.window, NOW + 10**4)
    assert len(ledger.reaped) == b.MAX_REAPED
    assert f"h{b.MAX_REAPED + 9}" in ledger.reaped
    assert ledger.spent.tokens == b.MAX_REAPED + 10


# Rolling windows.


def test_rolling_spending_leaves_the_window_after_its_duration() -> None:
    window = BudgetWindow(type="Rolling", duration=timedelta(hours=1))
    d = definition(hard=100, window=window)
    ledger = granted(b.reserve(d, fresh(d), "h1", Amount(tokens=60), NOW, TTL))
    ledger = b.commit(ledger, window, "h1", Amount(tokens=60), NOW + 1)
    assert b.spent(ledger, window, NOW + 1800) == Amount(tokens=60)
    assert isinstance(b.reserve(d, ledger, "h2", Amount(tokens=50), NOW + 1800, TTL), Refused)
    assert b.spent(ledger, window, NOW + 3600 + 61) == Amount()
    again = granted(b.reserve(d, ledger, "h2", Amount(tokens=100), NOW + 3600 + 61, TTL))
    assert again.slots == {}
    assert again.spent == Amount()


def test_a_rolling_late_commit_corrects_the_slot_it_was_charged_to() -> None:
    window = BudgetWindow(type="Rolling", duration=timedelta(hours=1))
    d = definition(hard=1000, window=window)
    ledger = granted(b.reserve(d, fresh(d), "slow", Amount(tokens=100), NOW, 5))
    ledger = b.reap(ledger, window, NOW + 6)
    slot = b.slot_index(window, NOW + 6)
    assert ledger.reaped_slots == {"slow": slot}
    assert ledger.slots[slot].tokens == 100
    later = NOW + 600
    ledger = granted(b.reserve(d, ledger, "h2", Amount(tokens=5), later, TTL))
    ledger = b.commit(ledger, window, "h2", Amount(tokens=5), later)
    corrected = b.commit(ledger, window, "slow", Amount(tokens=30), later)
    assert corrected.slots[slot].tokens == 30
    assert b.spent(corrected, window, later) == Amount(tokens=35)
    # Once the charged slot left the window, so did the charge: the rest stays.
    gone = b.commit(ledger, window, "slow", Amount(tokens=30), NOW + 3600 + 120)
    assert b.spent(gone, window, NOW + 3600 + 120) == Amount(tokens=5)


# Limits crossed, burn rate, exhaustion.


def test_crossed_reports_each_limit_once() -> None:
    limits = BudgetLimits(
        tokens=TokenLimits(soft=50, hard=100), cost_usd=CostLimits(soft=1.0, hard=2.0)
    )
    assert b.crossed(Amount(tokens=10), Amount(tokens=60), limits) == [("soft", "tokens")]
    assert b.crossed(Amount(tokens=60), Amount(tokens=70), limits) == []
    assert b.crossed(Amount(tokens=40, cost_usd=0.5), Amount(tokens=100, cost_usd=3), limits) == [
        ("soft", "tokens"),
        ("soft", "costUsd"),
        ("hard", "tokens"),
        ("hard", "costUsd"),
    ]


@given(
    st.integers(0, 200),
    st.integers(0, 200),
    st.integers(1, 150),
    st.integers(1, 150),
)
def test_crossed_is_before_below_and_after_at_or_past(
    before: int, after: int, soft: int, hard: int
) -> None:
    soft, hard = min(soft, hard), max(soft, hard)
    limits = BudgetLimits(tokens=TokenLimits(soft=soft, hard=hard))
    got = b.crossed(Amount(tokens=before), Amount(tokens=after), limits)
    assert (("soft", "tokens") in got) == (before < soft <= after)
    assert (("hard", "tokens") in got) == (before < hard <= after)


def test_burn_rate_and_projected_exhaustion() -> None:
    d = definition(hard=1000)
    start = datetime(2026, 12, 2, tzinfo=UTC).timestamp()
    ledger = b.fresh_ledger(DAY, "d20261202", start).model_copy(
        update={"spent": Amount(tokens=200)}
    )
    two_hours = start + 7200
    assert b.burn_rate(ledger, DAY, two_hours) == Amount(tokens=100)
    assert b.projected_exhaustion(ledger, d, two_hours) == datetime(2026, 12, 2, 10, tzinfo=UTC)
    # At 100 an hour, 10 000 is not reached before the day ends.
    assert b.projected_exhaustion(ledger, definition(hard=10_000), two_hours) is None
    assert b.projected_exhaustion(ledger, definition(hard=None, soft=5), two_hours) is None
    assert b.projected_exhaustion(
        ledger, definition(hard=200), two_hours
    ) == datetime.fromtimestamp(two_hours, UTC)
    assert b.burn_rate(b.fresh_ledger(DAY, "d20261202", start), DAY, start + 1) == Amount()


# Properties: any interleaving of holds, commits, releases and time.

op = st.one_of(
    st.tuples(st.just("reserve"), st.integers(0, 9), st.integers(0, 400), st.integers(1, 900)),
    st.tuples(st.just("commit"), st.integers(0, 9), st.integers(0, 400), st.just(0)),
    st.tuples(st.just("release"), st.integers(0, 9), st.just(0), st.just(0)),
    st.tuples(st.just("wait"), st.just(0), st.just(0), st.integers(1, 700)),
)
windows = st.sampled_from(
    [DAY, BudgetWindow(type="Run"), BudgetWindow(type="Rolling", duration=timedelta(hours=2))]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=60), windows, st.integers(1, 2000))
def test_the_ledger_is_exact_and_never_overspent_past_holds(
    ops: list[tuple[str, int, int, int]], window: BudgetWindow, hard: int
) -> None:
    """Against a model of what was spent (actuals committed, at most their hold; holds
    that expired charged in full until a late commit or release corrects them) the ledger
    counts exactly that; spent plus held never passes hard; commit and release are
    idempotent; every ledger survives its own encoding."""
    d = definition(hard=hard, window=window)
    now = NOW
    ledger = fresh(d, now)
    live: dict[str, tuple[int, float]] = {}  # held: tokens, expires
    reaped: set[str] = set()
    charged: dict[str, int] = {}  # what the model counts per hold id, once not held

    def model_reap() -> None:
        for hid, (tokens, expires) in list(live.items()):
            if expires <= now:
                charged[hid] = tokens
                reaped.add(hid)
                del live[hid]

    for kind, index, tokens, extra in ops:
        hold_id = f"h{index}"
        if kind == "wait":
            now += extra
            continue
        if kind == "reserve":
            if hold_id in charged and hold_id not in reaped:
                continue  # hold ids are unique per attempt: never held again once settled
            outcome = b.reserve(d, ledger, hold_id, Amount(tokens=tokens), now, float(extra))
            model_reap()
            if isinstance(outcome, Refused):
                assert hold_id not in live
                assert hold_id not in reaped
                ledger = outcome.ledger
            else:
                if hold_id not in live and hold_id not in reaped:
                    live[hold_id] = (tokens, now + extra)
                ledger = outcome
        elif kind == "commit":
            full = live[hold_id][0] if hold_id in live else charged.get(hold_id, 0)
            actual = Amount(tokens=min(tokens, full))
            after = b.commit(ledger, d.window, hold_id, actual, now)
            assert b.commit(after, d.window, hold_id, actual, now) == after
            if hold_id in live or hold_id in reaped:
                charged[hold_id] = actual.tokens
                live.pop(hold_id, None)
                reaped.discard(hold_id)
                model_reap()  # a commit that changes nothing writes nothing, reaps nothing
            ledger = after
        else:
            after = b.release(ledger, hold_id)
            assert b.release(after, hold_id) == after
            if hold_id in live or hold_id in reaped:
                charged[hold_id] = 0
                live.pop(hold_id, None)
                reaped.discard(hold_id)
            ledger = after
        spent_now = b.spent(ledger, d.window, now).tokens
        held_now = b.held(ledger, now).tokens
        expired = sum(t for t, e in live.values() if e <= now)
        assert held_now == sum(t for t, e in live.values() if e > now)
        assert spent_now + held_now <= hard
        if window.type == "Rolling":
            assert spent_now <= sum(charged.values()) + expired
        else:
            assert spent_now == sum(charged.values()) + expired
        assert set(ledger.reaped) == reaped
        assert decode(encode(ledger), ledger.window) == ledger


@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_junk_never_parses_as_a_ledger_by_accident(raw: bytes) -> None:
    ledger = decode(raw, "d20261202")
    assert ledger is None or ledger.window == "d20261202"


def test_a_ledger_of_another_window_is_junk() -> None:
    d = definition()
    assert decode(encode(fresh(d)), "d20261203") is None
    assert decode(b'{"window": "d20261202", "started": "soon"}', "d20261202") is None


requirements = st.builds(
    lambda key, op, values: LabelSelectorRequirement.model_validate(
        {"key": key, "operator": op, "values": values if op in ("In", "NotIn") else []}
    ),
    st.sampled_from("abc"),
    st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]),
    st.lists(st.sampled_from("xyz"), max_size=2),
)


@given(labels, st.lists(requirements, max_size=3), labels)
def test_match_expressions_as_sets(
    wanted: dict[str, str], expressions: list[LabelSelectorRequirement], have: dict[str, str]
) -> None:
    """Each requirement read as a set of label maps (Kubernetes' definition), every one and
    matchLabels together."""

    def holds(r: LabelSelectorRequirement) -> bool:
        value = have.get(r.key)
        return {
            "In": value is not None and value in set(r.values),
            "NotIn": value is None or value not in set(r.values),
            "Exists": value is not None,
            "DoesNotExist": value is None,
        }[r.operator]

    selector = LabelSelector(match_labels=wanted, match_expressions=expressions)
    expected = wanted.items() <= have.items() and all(holds(r) for r in expressions)
    assert selector.matches(have) == expected


@given(
    st.integers(0, 1000),
    st.integers(0, 1000),
    st.integers(0, 1000),
    st.integers(1, 2000),
    st.floats(0, 5, allow_nan=False),
    st.floats(0, 5, allow_nan=False),
    st.floats(0.01, 10, allow_nan=False),
)
def test_a_hold_is_refused_exactly_when_it_would_pass_a_hard_limit(
    spent_tokens: int,
    held_tokens: int,
    asked: int,
    hard: int,
    spent_usd: float,
    asked_usd: float,
    hard_usd: float,
) -> None:
    d = definition(hard=hard, cost_hard=hard_usd)
    ledger = fresh(d).model_copy(
        update={
            "spent": Amount(tokens=spent_tokens, cost_usd=spent_usd),
            "holds": {"other": b.Hold(amount=Amount(tokens=held_tokens), expires=NOW + 60)},
        }
    )
    outcome = b.reserve(d, ledger, "mine", Amount(tokens=asked, cost_usd=asked_usd), NOW, TTL)
    past = spent_tokens + held_tokens + asked > hard or spent_usd + asked_usd > hard_usd
    assert isinstance(outcome, Refused) == past
    if isinstance(outcome, Refused):
        assert outcome.error.unit == (
            "tokens" if spent_tokens + held_tokens + asked > hard else "costUsd"
        )
        assert outcome.ledger.holds == ledger.holds


@given(
    st.sampled_from(["Hour", "Day", "Month", "Run"]),
    st.integers(0, 10**6),
    st.floats(0, 0.999, allow_nan=False),
    st.integers(1, 10**7),
)
def test_projected_exhaustion_is_now_or_later_and_within_the_window(
    kind: str, tokens: int, fraction: float, hard: int
) -> None:
    """Read while the window lasts (a Run window: up to 40 days on)."""
    window = BudgetWindow.model_validate({"type": kind})
    d = definition(hard=hard, window=window)
    ledger = fresh(d).model_copy(update={"spent": Amount(tokens=tokens)})
    start, end = b.window_bounds(window, ledger, ledger.started)
    now = start + fraction * ((end if end is not None else start + 40 * 86400) - start)
    when = b.projected_exhaustion(ledger, d, now)
    if tokens >= hard:
        assert when == datetime.fromtimestamp(now, UTC)
    if when is not None:
        assert when.timestamp() >= now - 1e-6
        assert end is None or when.timestamp() <= end + 1e-6
    assert b.burn_rate(ledger, window, now).tokens >= 0
    assert start <= now


@given(
    started=st.floats(allow_nan=True, allow_infinity=True),
    updated=st.floats(allow_nan=True, allow_infinity=True),
    tokens=st.integers(min_value=-1, max_value=2**70),
    cost=st.floats(allow_nan=True, allow_infinity=True),
)
@settings(max_examples=300, deadline=None)
def test_a_ledger_from_the_bucket_is_refused_or_its_figures_are_computable(
    started: float, updated: float, tokens: int, cost: float
) -> None:
    """A ledger anyone may write: NaN, infinities and huge amounts are refused when read,
    and whatever is accepted gives figures the status and the CLI can carry."""
    amount = f'{{"tokens": {tokens}, "costUsd": {cost!r}}}'
    raw = (
        f'{{"window": "d20261202", "started": {started!r}, "updated": {updated!r}, '
        f'"spent": {amount}, "slots": {{}}, '
        f'"holds": {{"h": {{"amount": {amount}, "expires": 1}}}}}}'
    )
    raw = raw.replace("nan", "NaN").replace("inf", "Infinity")
    try:
        ledger = Ledger.model_validate_json(raw)
    except ValueError:
        return
    assert 0 <= ledger.started <= b.LATEST_PROJECTION
    d = definition(hard=1000, cost_hard=1.0)
    total = b.spent(ledger, DAY, NOW) + b.held(ledger, NOW) + ledger.spent
    assert total.tokens <= 3 * b.MAX_AMOUNT_TOKENS
    b.burn_rate(ledger, DAY, NOW)
    b.projected_exhaustion(ledger, d, NOW)
