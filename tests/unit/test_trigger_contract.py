"""The Trigger contract's parsers and the webhook signature check, on hostile input."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from troupe_runtime.contract import triggers

WINDOW = timedelta(minutes=5)


@given(st.text(max_size=200))
def test_schedule_problem_never_raises(text: str) -> None:
    problem = triggers.schedule_problem(text)
    if problem is None:
        cron = triggers.CronSource(schedule=text)
        assert triggers.next_fire(cron, datetime(2026, 1, 1, tzinfo=UTC)) > datetime(
            2026, 1, 1, tzinfo=UTC
        )


@given(st.text(max_size=80))
def test_time_zone_problem_never_raises(text: str) -> None:
    triggers.time_zone_problem(text)


@given(st.binary(max_size=512), st.binary(min_size=1, max_size=64), st.integers(0, 2**40))
def test_a_signature_verifies_and_any_change_refuses(body: bytes, secret: bytes, now: int) -> None:
    stamp = str(now)
    good = triggers.sign(secret, stamp, body)
    assert triggers.signature_problem(secret, stamp, good, body, now, WINDOW) is None
    assert triggers.signature_problem(secret, stamp, good, body + b"x", now, WINDOW)
    assert triggers.signature_problem(secret + b"x", stamp, good, body, now, WINDOW)
    assert triggers.signature_problem(secret, stamp, good, body, now + 301, WINDOW)


@given(st.text(max_size=40), st.text(max_size=300), st.binary(max_size=64))
def test_hostile_headers_are_refused_not_raised(stamp: str, signature: str, body: bytes) -> None:
    assert triggers.signature_problem(b"k", stamp, signature, body, 0, WINDOW) is not None


def test_missed_runs_policy() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    now = start + timedelta(minutes=10, seconds=30)
    skip = triggers.CronSource(schedule="* * * * *")
    once = triggers.CronSource.model_validate(
        {"schedule": "* * * * *", "missedRuns": "RunOnce", "startingDeadline": "1m"}
    )
    due = triggers.due_fires(skip, start, now)
    assert len(due) == 10
    assert triggers.missed_plan(skip, due, now) == []
    assert triggers.missed_plan(once, due, now) == [due[-1]]
    assert triggers.missed_plan(once, due, now + timedelta(minutes=5)) == []


def test_fire_ids_are_deterministic() -> None:
    at = datetime(2026, 1, 1, 12, tzinfo=UTC)
    assert triggers.fire_id("u", at) == triggers.fire_id("u", at)
    assert triggers.dedupe_id("u", {"a": 1}) == triggers.dedupe_id("u", {"a": 1})
    assert triggers.directory_key("nightly") == "triggers.nightly"
