"""Token usage in runs: read from replies' extension attributes, folded into run state,
shown by ``troupe runs``. Replies come from anyone: no attribute may break a run."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from troupe_cli import render
from troupe_cli.views import timeline
from troupe_runtime.contract import envelope
from troupe_runtime.contract.envelope import CloudEvent, MalformedMessage
from troupe_runtime.contract.run_events import (
    CompensationDispatched,
    CompensationFinished,
    Event,
    RunFinished,
    RunStarted,
    StepDispatched,
    StepFailed,
    StepSucceeded,
    decode_event,
    encode_event,
)
from troupe_runtime.contract.run_state import RunState, apply, replay, run_usage
from troupe_runtime.contract.usage import (
    COST_ATTRIBUTE,
    TOKENS_IN_ATTRIBUTE,
    TOKENS_OUT_ATTRIBUTE,
    Usage,
)
from troupe_runtime.workflow.engine import reply_event

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
USAGE_HEADERS = [f"ce-{name}" for name in (TOKENS_IN_ATTRIBUTE, TOKENS_OUT_ATTRIBUTE)]


def at(ms: int) -> datetime:
    return T0 + timedelta(milliseconds=ms)


def usage(tokens_in: int, tokens_out: int, cost: float) -> Usage:
    return Usage(tokens_in=tokens_in, tokens_out=tokens_out, cost_usd=cost)


def reply(
    attributes: dict[str, Any], causation: str = "r1/a/1", type: str = "troupe.step.output"
) -> CloudEvent:
    """An agent's reply as the engine reads it off the wire (binary mode)."""
    event = CloudEvent(
        id="reply",
        source="/ns/agent",
        type=type,
        causationid=causation,
        data={"answer": 42},
        **attributes,
    )
    headers, payload = envelope.to_binary(event)
    return envelope.parse(headers, payload)


def counted_run() -> list[Event]:
    run = "r1"
    return [
        RunStarted(run_id=run, at=at(0)),
        StepDispatched(run_id=run, at=at(1), step="a", attempt=1),
        StepFailed(run_id=run, at=at(10), step="a", attempt=1, error="x", usage=usage(5, 1, 0.5)),
        StepDispatched(run_id=run, at=at(20), step="a", attempt=2),
        StepSucceeded(run_id=run, at=at(30), step="a", attempt=2, usage=usage(10, 2, 1.0)),
        StepDispatched(run_id=run, at=at(40), step="b", attempt=1),
        StepSucceeded(run_id=run, at=at(50), step="b", attempt=1),  # a plain agent: no usage
        CompensationDispatched(run_id=run, at=at(60), step="a"),
        CompensationFinished(run_id=run, at=at(70), step="a", usage=usage(1, 1, 0.25)),
        RunFinished(run_id=run, at=at(80), status="Failed", error="undone"),
    ]


def test_the_engine_reads_a_replys_usage_attributes_into_the_step_event() -> None:
    answer = reply(usage(120, 30, 0.00042).attributes())

    event = reply_event(answer, T0)

    assert isinstance(event, StepSucceeded)
    assert event.usage == usage(120, 30, 0.00042)


def test_a_failure_reply_and_a_compensation_reply_carry_their_usage_too() -> None:
    attributes = usage(7, 3, 0.01).attributes()
    failed = reply_event(reply(attributes, type=envelope.ERROR_TYPE), T0)
    compensated = reply_event(reply(attributes, causation="r1/a/compensate"), T0)

    assert isinstance(failed, StepFailed)
    assert isinstance(compensated, CompensationFinished)
    assert failed.usage == compensated.usage == usage(7, 3, 0.01)


def test_a_reply_without_usage_attributes_records_no_usage() -> None:
    event = reply_event(reply({}), T0)

    assert isinstance(event, StepSucceeded)
    assert event.usage is None


def test_a_run_totals_every_attempt_and_compensation_and_each_step_its_attempts() -> None:
    state = replay(counted_run())

    assert state is not None
    assert state.usage == usage(16, 4, 1.75)
    assert state.steps["a"].usage == usage(15, 3, 1.5)
    assert state.steps["b"].usage is None


def test_a_run_nobody_counted_has_no_usage_and_zero_for_a_status() -> None:
    state = replay([RunStarted(run_id="r", at=T0)])

    assert state is not None
    assert state.usage is None
    assert run_usage(state) == Usage()


def test_runs_and_events_recorded_before_usage_existed_still_load() -> None:
    old_state = '{"runId": "r", "status": "Succeeded", "startedAt": "2025-01-02T03:04:05Z",'
    old_state += ' "steps": {"a": {"status": "Succeeded", "attempt": 1}}, "events": 4}'
    old_event = '{"kind": "StepSucceeded", "runId": "r", "at": "2025-01-02T03:04:05Z",'
    old_event += ' "step": "a", "attempt": 1, "output": 1}'

    assert RunState.model_validate_json(old_state).usage is None
    assert decode_event(old_event.encode()) == StepSucceeded(
        run_id="r", at=T0, step="a", attempt=1, output=1
    )


def test_runs_show_prints_tokens_and_cost_per_attempt_and_the_total() -> None:
    events = counted_run()
    state = replay(events)
    assert state is not None

    lines = render.run_text(state, timeline(events)).splitlines()

    assert "tokens:    16/4 (in/out)" in lines
    assert "cost:      $1.75" in lines
    header = next(line for line in lines if line.startswith("STEP"))
    assert header.split()[6:] == ["TOKENS", "IN/OUT", "COST", "ERROR"]
    rows = [line.split() for line in lines[lines.index(header) + 1 :][:4]]
    assert [row[6:8] for row in rows] == [
        ["5/1", "$0.5"],
        ["10/2", "$1"],
        ["-", "-"],
        ["1/1", "$0.25"],
    ]


def test_runs_show_json_gives_usage_per_attempt_and_for_the_run() -> None:
    events = counted_run()
    state = replay(events)
    assert state is not None

    document = json.loads(render.dumps(render.run_json(state, timeline(events))))

    assert document["usage"] == {"tokensIn": 16, "tokensOut": 4, "costUsd": 1.75}
    assert [step["usage"] for step in document["steps"]][1:3] == [
        {"tokensIn": 10, "tokensOut": 2, "costUsd": 1.0},
        None,
    ]


def test_runs_list_adds_tokens_and_cost_only_when_a_run_counted() -> None:
    counted = replay(counted_run())
    plain = replay([RunStarted(run_id="r2", at=at(1000))])
    assert counted is not None
    assert plain is not None

    lines = render.runs_text([counted, plain]).splitlines()

    assert lines[0].split()[5:] == ["TOKENS", "IN/OUT", "COST"]
    assert lines[1].split()[-2:] == ["16/4", "$1.75"]
    assert lines[2].split()[-2:] == ["-", "-"]
    assert "TOKENS" not in render.runs_text([plain])


def test_small_costs_keep_their_fractions_of_a_cent() -> None:
    assert [render.dollars(c) for c in (0, 0.000125, 1.5, 12.0)] == [
        "$0",
        "$0.000125",
        "$1.5",
        "$12",
    ]


def test_usage_attributes_out_of_range_or_not_numbers_read_as_no_usage() -> None:
    for tokens, cost in [
        ("-1", "0"),
        ("1e3", "0"),
        ("²", "0"),
        ("9" * 5000, "0"),
        (str(2**31), "0"),
        ("1", "nan"),
        ("1", "inf"),
        ("1", "-0.5"),
        ("1", "1e308"),
        (True, "0"),
    ]:
        assert Usage.from_attributes({TOKENS_IN_ATTRIBUTE: tokens, COST_ATTRIBUTE: cost}) is None
    assert Usage.from_attributes({TOKENS_OUT_ATTRIBUTE: " 12 "}) == usage(0, 12, 0)


HOSTILE_VALUES = st.one_of(
    st.text(max_size=60),
    st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", " ", "1" * 11, "0x10", "1_000", "+5", "٣", "1e-400", "-0"]),
)


@given(
    st.dictionaries(
        st.sampled_from([*USAGE_HEADERS, f"ce-{COST_ATTRIBUTE}"]), HOSTILE_VALUES, max_size=3
    ),
    st.sampled_from(["r1/a/1", "r1/a/compensate", "r1/a/²", "r1/a/" + "9" * 40]),
    st.booleans(),
)
def test_no_reply_attributes_break_the_run_projection(
    hostile: dict[str, str], causation: str, failure: bool
) -> None:
    """Whatever the usage headers hold, the reply is dropped or recorded, and the state
    it folds into survives its round trip through the log and the KV projection."""
    headers = {
        "ce-specversion": "1.0",
        "ce-id": "reply",
        "ce-source": "/anyone",
        "ce-type": envelope.ERROR_TYPE if failure else "troupe.step.output",
        "ce-causationid": causation,
        "content-type": "application/json",
        **{name: envelope.percent_encode(value) for name, value in hostile.items()},
    }
    try:
        answer = envelope.parse(headers, b'{"error": "no"}')
    except MalformedMessage:
        return  # the engine drops it
    event = reply_event(answer, at(5))
    if event is None:
        return
    assert decode_event(encode_event(event)) == event
    state = replay(
        [
            RunStarted(run_id="r1", at=T0),
            StepDispatched(run_id="r1", at=at(1), step="a", attempt=1),
            CompensationDispatched(run_id="r1", at=at(2), step="a"),
        ]
    )
    assert state is not None
    twice = apply(apply(state, event), event)
    assert RunState.model_validate_json(twice.model_dump_json(by_alias=True)) == twice
    render.run_text(twice, timeline([event]))
