"""Token streams in the CLI: what a stream message may hold, how it is laid out, and how a
run's streams are named by step. Anyone may publish on a stream subject."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from troupe_cli import deltas
from troupe_cli.deltas import (
    Chunk,
    Delta,
    StepStreams,
    StreamLayout,
    ToolCall,
    TurnDone,
    chunk_json,
    parse_chunk,
    terminal_safe,
)
from troupe_runtime.contract import naming
from troupe_runtime.contract.run_events import (
    CompensationDispatched,
    StepDispatched,
    dispatch_id,
)

T0 = datetime(2025, 1, 2, tzinfo=UTC)


def stream_of(step: str, attempt: int | str = 1) -> str:
    return naming.token_stream_subject("ns", "r1", dispatch_id("r1", step, attempt))


def test_the_three_chunk_shapes_are_read_and_nothing_else() -> None:
    assert parse_chunk(b'{"delta": "Hi", "turn": 1}') == Delta("Hi", 1)
    assert parse_chunk(b'{"tool": "search", "turn": 2}') == ToolCall("search", 2)
    assert parse_chunk(b'{"done": true, "turn": 2, "final": true}') == TurnDone(2, True)
    assert parse_chunk(b'{"done": true}') == TurnDone(None, False)
    for junk in (
        b"",
        b"x",
        b"[]",
        b'"delta"',
        b'{"delta": 1}',
        b'{"done": 1}',
        b"NaN",
        b"[" * 9999,
    ):
        assert parse_chunk(junk) is None


def test_a_turn_that_is_not_a_small_number_reads_as_unknown() -> None:
    for turn in ("1", True, -1, 10**9, 1.5):
        body = json.dumps({"delta": "x", "turn": turn}).encode()
        assert parse_chunk(body) == Delta("x", None)


def test_a_message_too_large_to_be_a_delta_is_not_parsed_and_a_long_one_is_cut() -> None:
    assert parse_chunk(b'{"delta": "' + b"x" * deltas.MAX_MESSAGE_BYTES + b'"}') is None
    long = parse_chunk(json.dumps({"delta": "y" * 40000}).encode())
    assert isinstance(long, Delta)
    assert len(long.text) == deltas.MAX_DELTA_CHARS
    assert long.text.endswith(deltas.CUT)


def test_escape_sequences_and_control_characters_are_stripped_newlines_and_tabs_kept() -> None:
    hostile = "\x1b[2J\x1b[31mred\x1b[0m\x1b]0;title\x07\ttab\r\nline\x9b5m\u202eevil\x1bc\x00"

    assert terminal_safe(hostile) == "red\ttab\nline" + "evil"


def test_an_unterminated_title_sequence_swallows_the_rest_rather_than_reaching_the_terminal() -> (
    None
):
    assert terminal_safe("ok\x1b]0;no end") == "ok"


def test_a_tool_name_is_one_short_clean_line() -> None:
    chunk = parse_chunk(json.dumps({"tool": "a\nb\x1b[2J" + "c" * 500}).encode())

    assert isinstance(chunk, ToolCall)
    assert "\n" not in chunk.name
    assert chunk.name.startswith("a b")
    assert len(chunk.name) == deltas.MAX_TOOL_CHARS


@given(
    st.binary(max_size=300) | st.text(max_size=300).map(lambda t: json.dumps({"delta": t}).encode())
)
def test_no_message_breaks_the_stream_or_reaches_the_terminal_raw(data: bytes) -> None:
    chunk = parse_chunk(data)
    if chunk is None:
        return
    text = StreamLayout().text(chunk, "step")
    text.encode("utf-8")
    assert not any(ord(c) < 0x20 and c not in "\n\t" for c in text)
    assert not any(0x7F <= ord(c) <= 0x9F for c in text)
    json.loads(json.dumps(chunk_json(chunk, "step")))


def test_deltas_run_on_and_a_tool_call_gets_a_line_of_its_own() -> None:
    layout = StreamLayout()
    chunks: list[Chunk] = [
        Delta("Hel"),
        Delta("lo"),
        ToolCall("search"),
        TurnDone(1),
        Delta(" world"),
    ]

    printed = "".join(layout.text(chunk) for chunk in chunks) + layout.end_line()

    assert printed == "Hello\n[tool: search]\n world\n"


def test_each_line_names_its_step_when_steps_take_turns() -> None:
    layout = StreamLayout()
    printed = "".join(
        [
            layout.text(Delta("one\ntw"), "a"),
            layout.text(Delta("o"), "a"),
            layout.text(Delta("three"), "b"),
            layout.text(ToolCall("search"), "b"),
            layout.end_line(),
        ]
    )

    assert printed == "[a] one\n[a] two\n[b] three\n[b] [tool: search]\n"


def test_a_stream_the_log_names_shows_under_its_step_attempt_or_compensation() -> None:
    streams = StepStreams("ns", "r1", hold_seconds=1)
    streams.learn(StepDispatched(run_id="r1", at=T0, step="a", attempt=1))
    streams.learn(StepDispatched(run_id="r1", at=T0, step="b", attempt=2))
    streams.learn(CompensationDispatched(run_id="r1", at=T0, step="a"))

    assert streams.take(stream_of("a"), b"1", 0) == [("a", b"1")]
    assert streams.take(stream_of("b", 2), b"2", 0) == [("b#2", b"2")]
    assert streams.take(stream_of("a", "compensate"), b"3", 0) == [("a:compensate", b"3")]


def test_deltas_before_the_log_names_their_stream_wait_for_it_in_order() -> None:
    streams = StepStreams("ns", "r1", hold_seconds=1)

    assert streams.take(stream_of("a"), b"1", 0.0) == []
    assert streams.take(stream_of("a"), b"2", 0.1) == []
    assert streams.next_expiry() == 1.0
    shown = streams.learn(StepDispatched(run_id="r1", at=T0, step="a", attempt=1))

    assert shown == [("a", b"1"), ("a", b"2")]
    assert streams.next_expiry() is None


def test_a_stream_the_log_never_names_shows_under_its_digest_after_the_hold() -> None:
    streams = StepStreams("ns", "r1", hold_seconds=1)
    subject = naming.token_stream_subject("ns", "r1", "someone-else")
    streams.take(subject, b"1", 0.0)

    assert streams.expired(0.5) == []
    assert streams.expired(1.0) == [(subject.rsplit(".", 1)[-1][:8], b"1")]


def test_a_flood_of_unnamed_streams_is_shown_at_once_instead_of_held() -> None:
    streams = StepStreams("ns", "r1", hold_seconds=60)
    for index in range(StepStreams.MAX_HELD):
        assert streams.take(naming.token_stream_subject("ns", "r1", str(index)), b"x", 0) == []

    flooded = streams.take(naming.token_stream_subject("ns", "r1", "more"), b"y", 0)

    assert [data for _, data in flooded] == [b"y"]
    assert len(streams.release_all()) == StepStreams.MAX_HELD
