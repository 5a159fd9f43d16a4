"""The CLI's pure parts: step timelines, agent load, dead-letter replay headers, output."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from troupe_cli import render
from troupe_cli.main import build_parser
from troupe_cli.views import (
    AgentSample,
    ConsumerCounters,
    DeadLetter,
    agent_loads,
    readable_data,
    replay_headers,
    timeline,
)
from troupe_runtime.contract import dead_letters
from troupe_runtime.contract.run_events import (
    CompensationDispatched,
    CompensationFinished,
    Event,
    RunFinished,
    RunStarted,
    StepDispatched,
    StepFailed,
    StepSucceeded,
)
from troupe_runtime.contract.run_state import replay
from troupe_runtime.state import Change

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def at(ms: int) -> datetime:
    return T0 + timedelta(milliseconds=ms)


def retried_and_compensated_run() -> list[Event]:
    run = "r1"
    return [
        RunStarted(run_id=run, at=at(0), input=[]),
        StepDispatched(run_id=run, at=at(1), step="a", attempt=1),
        StepSucceeded(run_id=run, at=at(11), step="a", attempt=1, output=["a"]),
        StepDispatched(run_id=run, at=at(12), step="b", attempt=1),
        StepFailed(run_id=run, at=at(112), step="b", attempt=1, error="timed out"),
        StepDispatched(run_id=run, at=at(200), step="b", attempt=2),
        StepFailed(run_id=run, at=at(210), step="b", attempt=2, error="boom"),
        # A late reply to the first attempt changes nothing.
        StepSucceeded(run_id=run, at=at(220), step="b", attempt=1, output="late"),
        CompensationDispatched(run_id=run, at=at(230), step="a"),
        CompensationFinished(run_id=run, at=at(240), step="a"),
        RunFinished(run_id=run, at=at(250), status="Failed", error="step b failed: boom"),
    ]


def test_the_timeline_shows_each_attempt_and_compensation_in_log_order() -> None:
    attempts = timeline(retried_and_compensated_run())

    assert [(a.step, a.attempt, a.status, a.error) for a in attempts] == [
        ("a", 1, "Succeeded", None),
        ("b", 1, "Failed", "timed out"),
        ("b", 2, "Failed", "boom"),
        ("a", None, "Done", None),
    ]
    assert [a.seconds for a in attempts] == [0.01, 0.1, 0.01, 0.01]


def test_a_step_still_running_has_no_finish_and_no_duration() -> None:
    events: list[Event] = [
        RunStarted(run_id="r", at=at(0)),
        StepDispatched(run_id="r", at=at(5), step="a", attempt=1),
    ]

    (attempt,) = timeline(events)

    assert (attempt.status, attempt.finished_at, attempt.seconds) == ("Running", None, None)


def test_the_run_text_shows_the_timeline_relative_to_the_start_and_the_error() -> None:
    events = retried_and_compensated_run()
    state = replay(events)
    assert state is not None

    text = render.run_text(state, timeline(events))

    assert "status:    Failed" in text
    assert "duration:  250ms" in text
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("STEP"))
    assert header.split() == [
        "STEP",
        "ATTEMPT",
        "STATUS",
        "DISPATCHED",
        "FINISHED",
        "DURATION",
        "ERROR",
    ]
    assert any(
        line.split()[:6] == ["b", "2", "Failed", "+200ms", "+210ms", "10ms"] for line in lines
    )
    assert any(line.split()[:3] == ["a", "compensate", "Done"] for line in lines)
    assert lines[-1] == "error: step b failed: boom"


def test_the_run_json_is_plain_json_with_iso_times_and_seconds() -> None:
    events = retried_and_compensated_run()
    state = replay(events)
    assert state is not None

    document = json.loads(render.dumps(render.run_json(state, timeline(events))))

    assert document["status"] == "Failed"
    assert document["started"] == "2025-01-02T03:04:05Z"
    assert document["durationSeconds"] == 0.25
    assert document["steps"][3] == {
        "step": "a",
        "attempt": None,
        "compensation": True,
        "agent": None,
        "status": "Done",
        "dispatched": "2025-01-02T03:04:05.230000Z",
        "finished": "2025-01-02T03:04:05.240000Z",
        "durationSeconds": 0.01,
        "error": None,
        "usage": None,
    }


def test_runs_are_listed_one_row_each_with_their_duration() -> None:
    finished = replay(retried_and_compensated_run())
    running = replay([RunStarted(run_id="r2", at=at(1000))])
    assert finished is not None
    assert running is not None

    lines = render.runs_text([finished, running]).splitlines()

    assert lines[0].split() == ["RUN", "STATUS", "STARTED", "FINISHED", "DURATION"]
    assert lines[1].split() == ["r1", "Failed", *["2025-01-02", "03:04:05Z"] * 2, "250ms"]
    assert lines[2].split() == ["r2", "Running", "2025-01-02", "03:04:06Z", "-", "-"]


def test_durations_read_at_the_scale_they_have() -> None:
    assert [render.duration(s) for s in (None, 0.0123, 3.256, 125, 3725)] == [
        "-",
        "12ms",
        "3.26s",
        "2m05s",
        "1h02m",
    ]


def test_a_table_aligns_columns_and_cuts_long_cells() -> None:
    text = render.table(["name", "error"], [["a", "x" * 100], ["long-name", "multi\nline"]])

    assert text.splitlines() == [
        "NAME       ERROR",
        f"a          {'x' * (render.MAX_CELL - 1)}…",
        "long-name  multi line",
    ]


def sample(agent: str, acked: int, pending: int = 0, dead: int | None = 0) -> AgentSample:
    counters = ConsumerCounters(pending=pending, ack_pending=1, redelivered=2, ack_floor=acked)
    return AgentSample(agent, (counters, counters), dead)


def test_throughput_is_the_ack_floor_advance_per_second_summed_over_priorities() -> None:
    loads = agent_loads([sample("b", 10), sample("a", 0)], [sample("a", 5), sample("b", 10)], 2.0)

    assert [(load.agent, load.throughput) for load in loads] == [("a", 5.0), ("b", 0.0)]


def test_an_agent_new_or_recreated_between_samples_counts_from_zero() -> None:
    loads = agent_loads([sample("old", 50)], [sample("old", 3), sample("new", 7)], 1.0)

    assert {load.agent: load.throughput for load in loads} == {"new": 0.0, "old": 0.0}


def test_lag_ack_pending_and_redelivered_are_summed_over_an_agents_consumers() -> None:
    (load,) = agent_loads([], [sample("a", 0, pending=3, dead=4)], 1.0)

    assert (load.lag, load.ack_pending, load.redelivered, load.dead_letters) == (6, 2, 4, 4)


def test_top_shows_a_dash_for_an_agent_without_a_dead_letter_stream() -> None:
    (load,) = agent_loads([], [sample("a", 0, dead=None)], 1.0)

    lines = render.loads_text([load]).splitlines()

    assert lines[0].split() == ["AGENT", "MSG/S", "LAG", "ACK", "PENDING", "REDELIVERED", "DLQ"]
    assert lines[1].split() == ["a", "0.0", "0", "2", "4", "-"]
    assert render.loads_json([load])[0]["deadLetters"] is None


def dead_letter(headers: dict[str, str], data: bytes = b'{"x":1}') -> DeadLetter:
    return DeadLetter(7, T0, headers, data)


def test_a_replay_keeps_the_cloudevent_headers_and_drops_the_dead_letter_ones() -> None:
    origin = dead_letters.Origin(
        subject="troupe.ns.agents.a.in.p0", stream="TROUPE_ns_a", sequence=3
    )
    headers = dead_letters.dead_letter_headers(
        {"ce-id": "e1", "ce-type": "t", "content-type": "application/json"},
        reason=dead_letters.DeadLetterReason.EXHAUSTED,
        error="boom",
        attempts=3,
        agent="ns/a",
        origin=origin,
    )

    replayed = replay_headers(dead_letter(headers), "TROUPE_DLQ_ns_a")

    assert replayed == {
        "ce-id": "e1",
        "ce-type": "t",
        "content-type": "application/json",
        "Nats-Msg-Id": "replay:TROUPE_DLQ_ns_a:7",
    }


def test_a_dead_letter_reads_its_reason_attempts_and_origin_from_headers() -> None:
    letter = dead_letter(
        {
            dead_letters.REASON_HEADER: "exhausted",
            dead_letters.ATTEMPTS_HEADER: "3",
            dead_letters.SUBJECT_HEADER: "troupe.ns.agents.a.in.p0",
            "Ce-Id": "e1",
        }
    )

    assert (letter.reason, letter.attempts, letter.original_subject, letter.event_id) == (
        "exhausted",
        3,
        "troupe.ns.agents.a.in.p0",
        "e1",
    )
    assert render.dead_letters_text([letter]).splitlines()[1].split()[3:6] == [
        "exhausted",
        "3",
        "troupe.ns.agents.a.in.p0",
    ]


def test_payloads_are_shown_as_json_else_text_else_base64() -> None:
    assert readable_data(b'{"x":1}', None) == {"x": 1}
    assert readable_data(b"not json", "application/json") == "not json"
    assert readable_data(b"plain", "text/plain") == "plain"
    assert readable_data(b"\xff\x00", "application/octet-stream") == {"base64": "/wA="}


def test_a_watched_change_is_one_line() -> None:
    assert render.change_text(Change("k", {"n": 1}, 4, False)) == '4  PUT  k  {"n": 1}'
    assert render.change_text(Change("k", None, 5, True)) == "5  DEL  k"


def test_global_flags_are_accepted_before_and_after_the_command() -> None:
    parser = build_parser()

    before = parser.parse_args(["-n", "ns", "-o", "json", "runs", "list", "wf"])
    after = parser.parse_args(["runs", "list", "wf", "-n", "ns", "-o", "json"])
    default = parser.parse_args(["runs", "list", "wf"])

    assert (before.namespace, before.output) == (after.namespace, after.output) == ("ns", "json")
    assert (default.namespace, default.output) == ("default", "text")


def test_an_attempts_header_that_is_not_a_plain_number_reads_as_unknown() -> None:
    for value in ("²", "9" * 5000, "-1", "3.0", "x"):
        assert dead_letter({dead_letters.ATTEMPTS_HEADER: value}).attempts is None


def test_json_nested_too_deeply_to_print_is_shown_as_its_text() -> None:
    deep = b"[" * 5000 + b"]" * 5000

    assert readable_data(deep, "application/json") == deep.decode()
    assert readable_data(b"[NaN, 1e400]", None) == "[NaN, 1e400]"
    assert json.loads(render.dumps(readable_data(b'{"a": [1, {"b": "[{"}]}', None))) == {
        "a": [1, {"b": "[{"}]
    }


def test_output_escapes_control_characters_and_lone_surrogates() -> None:
    letter = dead_letter({dead_letters.ERROR_HEADER: "\x1b[2J wiped \ud800"}, b'"\\ud800"')

    text = render.printable(render.dead_letter_text(letter))
    document = render.dumps(render.dead_letter_json(letter))

    assert "\x1b" not in text
    assert "\\x1b[2J wiped" in text
    text.encode("ascii", "backslashreplace").decode().encode("utf-8")
    assert json.loads(document)["data"] == "\ud800"
    document.encode("utf-8")


_header_names = st.text(min_size=1, max_size=30).filter(lambda name: name.strip())
_any_text = st.text(max_size=200) | st.sampled_from(["\ud800", "\x1b[31m", "²", "9" * 5000])
_any_payload = st.binary(max_size=2000) | st.sampled_from(
    [
        b"[" * 3000 + b"]" * 3000,
        b'{"a":' * 2000 + b"1" + b"}" * 2000,
        b'"\\ud800"',
        b"NaN",
        b"1" * 5000,
        b"\xed\xa0\x80",
    ]
)
_letters = st.builds(
    lambda headers, known, data: dead_letter({**headers, **known}, data),
    st.dictionaries(_header_names, _any_text, max_size=5),
    st.fixed_dictionaries(
        {},
        optional={
            dead_letters.REASON_HEADER: _any_text,
            dead_letters.ERROR_HEADER: _any_text,
            dead_letters.ATTEMPTS_HEADER: _any_text,
            dead_letters.SUBJECT_HEADER: _any_text,
            "content-type": st.sampled_from(["application/json", "text/plain", "+json", ""]),
            "ce-id": _any_text,
        },
    ),
    _any_payload,
)


@given(st.lists(_letters, max_size=3))
def test_every_dead_letter_view_prints_whatever_a_letter_holds(letters: list[DeadLetter]) -> None:
    """What ``dlq list``, ``dlq show`` and a replay make of any letter, in both outputs."""
    outputs = [
        render.printable(render.dead_letters_text(letters)),
        render.dumps(render.dead_letters_json(letters)),
        *(render.printable(render.dead_letter_text(letter)) for letter in letters),
        *(render.dumps(render.dead_letter_json(letter)) for letter in letters),
    ]

    for output in outputs:
        output.encode("utf-8")
    for letter in letters:
        assert json.loads(render.dumps(render.dead_letter_json(letter)))["sequence"] == 7
        replayed = replay_headers(letter, "TROUPE_DLQ_ns_a")
        assert all(isinstance(v, str) and "\n" not in v for v in replayed.values())
