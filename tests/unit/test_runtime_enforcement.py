"""Pure policy logic: GCRA, priority shares, retry delays, dead-letter headers, schemas."""

from __future__ import annotations

import itertools

import pytest

from troupe_runtime.agent.ratelimit import gcra
from troupe_runtime.agent.scheduling import PriorityScheduler, priority_weights
from troupe_runtime.agent.schemas import ContractChecker, SchemaViolation
from troupe_runtime.contract.dead_letters import DeadLetterReason, Origin, dead_letter_headers
from troupe_runtime.contract.policies import Contract, retry_delay


def test_gcra_allows_a_burst_then_one_message_per_interval() -> None:
    tat, now, allowed = 0.0, 100.0, []
    for _ in range(5):
        decision = gcra(tat, now, rate=10, burst=3)
        allowed.append(decision.allowed)
        tat = decision.tat

    assert allowed == [True, True, True, False, False]
    assert gcra(tat, now, rate=10, burst=3).wait == pytest.approx(0.1)
    assert gcra(tat, now + 0.1, rate=10, burst=3).allowed


def test_priority_weights_double_per_level_and_floor_the_lowest() -> None:
    assert priority_weights(2) == pytest.approx([1 / 3, 2 / 3])
    weights = priority_weights(10)
    assert sum(weights) == pytest.approx(1)
    assert weights == sorted(weights)
    assert min(weights) >= 0.04


def test_the_scheduler_interleaves_levels_and_starves_none() -> None:
    scheduler = PriorityScheduler(3)
    picks = [scheduler.next() for _ in range(70)]

    assert picks[0] == 2
    assert [picks.count(level) for level in range(3)] == [10, 20, 40]
    longest_wait = max(len(list(run)) for level, run in itertools.groupby(picks) if level != 0)
    assert longest_wait <= 7
    assert sum(PriorityScheduler(4).allot(9)) == 9


def test_retry_delays_follow_the_backoff_and_repeat_its_last_entry() -> None:
    assert [retry_delay([1.0, 5.0], attempt) for attempt in (1, 2, 3, 9)] == [1, 5, 5, 5]
    assert retry_delay([], 1) == 0


def test_dead_letter_headers_name_reason_error_attempts_agent_and_origin() -> None:
    headers = dead_letter_headers(
        {"ce-id": "e-1", "Nats-Msg-Id": "original"},
        reason=DeadLetterReason.EXHAUSTED,
        error="Traceback\n  line 1\r\n  ValueError: bad",
        attempts=3,
        agent="ns/agent",
        origin=Origin(
            subject="troupe.ns.agents.agent.in.p0", stream="TROUPE_ns_agent", sequence=42
        ),
    )

    assert headers == {
        "ce-id": "e-1",
        "Troupe-Dead-Letter-Reason": "exhausted",
        "Troupe-Error": "Traceback line 1 ValueError: bad",
        "Troupe-Attempts": "3",
        "Troupe-Agent": "ns/agent",
        "Troupe-Original-Subject": "troupe.ns.agents.agent.in.p0",
        "Troupe-Original-Stream": "TROUPE_ns_agent",
        "Troupe-Original-Sequence": "42",
        "Nats-Msg-Id": "dlq:TROUPE_ns_agent:42",
    }


def test_the_contract_checker_names_where_data_violates_the_schema() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}
    checker = ContractChecker(Contract(input_schema=schema))
    checker.check_input({"n": 1})
    checker.check_output("anything: no output schema declared")

    with pytest.raises(SchemaViolation, match=r"at n: -1 is less than the minimum of 0"):
        checker.check_input({"n": -1})


def test_an_invalid_schema_is_refused_at_start_up() -> None:
    with pytest.raises(
        ValueError, match=r"contract.outputSchema: not a valid JSON Schema: .* \(at /type\)"
    ):
        ContractChecker(Contract(output_schema={"type": "no-such-type"}))
