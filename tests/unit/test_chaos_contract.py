"""The chaos contract: rolls hit exactly their ratios' share, and hostile entries inject nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from troupe_runtime.contract import chaos, naming

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
ratios = st.floats(min_value=0, max_value=1)
draws = st.floats(min_value=0, max_value=1, exclude_max=True)


def entry(until: datetime, **faults: object) -> chaos.AgentFaults:
    return chaos.AgentFaults.model_validate(
        {"experiment": "e", "run": "r1", "until": until.isoformat(), "faults": faults}
    )


@given(ratios, ratios, draws, draws)
def test_a_call_roll_hits_when_its_draw_is_below_the_ratio(
    latency_ratio: float, error_ratio: float, latency_draw: float, error_draw: float
) -> None:
    fault = chaos.CallFault(
        latency=timedelta(seconds=1), latency_ratio=latency_ratio, error_ratio=error_ratio
    )
    roll = chaos.roll_call(fault, latency_draw, error_draw)
    assert roll.fail == (error_draw < error_ratio)
    assert (roll.delay == timedelta(seconds=1)) == (latency_draw < latency_ratio)


@given(draws, draws)
def test_no_fault_rolls_calm(first: float, second: float) -> None:
    assert chaos.roll_call(None, first, second).harmless
    assert chaos.roll_message(None, first, second).harmless
    assert chaos.roll_call(chaos.CallFault(), first, second).harmless


@given(st.binary(max_size=512))
def test_any_bytes_parse_to_faults_or_to_none(raw: bytes) -> None:
    parsed = chaos.parse_entry(raw, NOW)
    assert parsed is None or parsed.active(NOW)


def test_an_entry_past_its_until_injects_nothing() -> None:
    live = entry(NOW + timedelta(minutes=1), handler={"errorRatio": 0.5})
    assert chaos.parse_entry(live.model_dump_json(by_alias=True).encode(), NOW) == live
    stale = entry(NOW - timedelta(seconds=1), handler={"errorRatio": 0.5})
    assert chaos.parse_entry(stale.model_dump_json(by_alias=True).encode(), NOW) is None
    empty = entry(NOW + timedelta(minutes=1))
    assert chaos.parse_entry(empty.model_dump_json(by_alias=True).encode(), NOW) is None


def test_a_latency_past_the_bound_is_refused() -> None:
    with pytest.raises(ValidationError, match="at most 10m"):
        chaos.CallFault(latency=timedelta(minutes=11))
    with pytest.raises(ValidationError, match="at most 10m"):
        chaos.MessageFault(delay=timedelta(minutes=11))


def test_faults_are_keyed_per_agent_in_a_bucket_per_namespace() -> None:
    assert naming.chaos_bucket("team-a") == "troupe_team-a_chaos"
    assert naming.chaos_faults_key("writer") == "faults.writer"


@given(st.timedeltas(min_value=timedelta(days=-400), max_value=timedelta(days=400 * 365)))
def test_an_entry_is_in_force_only_between_now_and_the_longest_run(ahead: timedelta) -> None:
    # The operator's until is its run's end, at most LONGEST_RUN away: any other until (a
    # hostile year-9999 one above all) injects nothing rather than make the agent faulty
    # for good.
    raw = entry(NOW + ahead, handler={"errorRatio": 1}).model_dump_json(by_alias=True).encode()
    in_force = timedelta(0) < ahead <= chaos.LONGEST_RUN + chaos.CLOCK_SKEW
    assert (chaos.parse_entry(raw, NOW) is not None) == in_force


def test_an_entry_ending_far_beyond_any_run_injects_nothing() -> None:
    far = entry(datetime(9999, 1, 1, tzinfo=UTC), handler={"errorRatio": 1})
    assert chaos.parse_entry(far.model_dump_json(by_alias=True).encode(), NOW) is None
