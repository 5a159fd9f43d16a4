"""The process node's container logs (CRI format, per instance) and termination messages,
without a cluster: what the kubelet endpoint serves and what a failed container reports."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from troupe_devcluster.fixtures import wait_for
from troupe_devcluster.processnode import logs
from troupe_devcluster.processnode.logs import LogOptions, LogPump, OptionError
from troupe_devcluster.processnode.runtime import termination_message

T0 = 1_764_000_000 * 1_000_000_000
QUERY_KEYS = (
    "tailLines",
    "limitBytes",
    "timestamps",
    "follow",
    "previous",
    "sinceSeconds",
    "sinceTime",
)


def _cri(*lines: str, stream: str = "stdout", at: int = T0) -> bytes:
    return b"".join(logs.entries(stream, f"{line}\n".encode(), at, False)[0] for line in lines)


def _read(path: Path, options: LogOptions) -> bytes:
    out: list[bytes] = []
    logs.read_log(path, options, out.append, lambda: True)
    return b"".join(out)


def test_a_line_becomes_one_full_cri_entry_with_a_fixed_nanosecond_timestamp() -> None:
    lines, rest = logs.entries("stderr", b"hello\npart", T0 + 5, False)
    assert lines == b"2025-11-24T16:00:00.000000005Z stderr F hello\n"
    assert rest == b"part"


def test_a_long_line_goes_out_in_partial_pieces() -> None:
    data = b"x" * (logs.MAX_LINE_BYTES + 10) + b"\n"
    lines, rest = logs.entries("stdout", data, T0, False)
    tags = [line.split(b" ")[2] for line in lines.splitlines()]
    assert (tags, rest) == ([b"P", b"F"], b"")


def test_the_end_of_a_stream_flushes_a_last_line_without_newline() -> None:
    lines, rest = logs.entries("stdout", b"bye", T0, True)
    assert (lines.endswith(b" stdout F bye\n"), rest) == (True, b"")


def test_timestamps_round_trip() -> None:
    assert logs.parse_timestamp(logs.cri_timestamp(T0 + 123_456_789)) == T0 + 123_456_789


def test_read_shows_content_and_joins_partial_pieces(tmp_path: Path) -> None:
    path = tmp_path / "0.log"
    long = "y" * (logs.MAX_LINE_BYTES + 3)
    path.write_bytes(_cri("one", long, "two"))
    assert _read(path, LogOptions()) == f"one\n{long}\ntwo\n".encode()


def test_tail_lines_keeps_the_last_lines(tmp_path: Path) -> None:
    path = tmp_path / "0.log"
    path.write_bytes(_cri(*(f"line {i}" for i in range(10))))
    assert _read(path, LogOptions(tail_lines=2)) == b"line 8\nline 9\n"
    assert _read(path, LogOptions(tail_lines=0)) == b""
    assert _read(path, LogOptions(tail_lines=50)).count(b"\n") == 10


def test_limit_bytes_cuts_the_output(tmp_path: Path) -> None:
    path = tmp_path / "0.log"
    path.write_bytes(_cri("abcdef", "ghij"))
    assert _read(path, LogOptions(limit_bytes=9)) == b"abcdef\ngh"


def test_timestamps_prefix_each_line(tmp_path: Path) -> None:
    path = tmp_path / "0.log"
    path.write_bytes(_cri("a"))
    assert _read(path, LogOptions(timestamps=True)) == b"2025-11-24T16:00:00.000000000Z a\n"


def test_since_leaves_out_older_lines(tmp_path: Path) -> None:
    path = tmp_path / "0.log"
    path.write_bytes(_cri("old", at=T0) + _cri("new", at=T0 + 10**9))
    assert _read(path, LogOptions(since_nanoseconds=T0 + 1)) == b"new\n"


def test_follow_streams_what_is_written_until_the_instance_finishes(tmp_path: Path) -> None:
    path = tmp_path / "0.log"
    path.write_bytes(_cri("first"))
    out: list[bytes] = []
    done = threading.Event()
    reader = threading.Thread(
        target=logs.read_log, args=(path, LogOptions(follow=True), out.append, done.is_set)
    )
    reader.start()
    wait_for(lambda: out == [b"first\n"], 10, "the first line")
    with path.open("ab") as file:
        file.write(_cri("second"))
    wait_for(lambda: b"second\n" in out, 10, "the line written later")
    done.set()
    reader.join(10)
    assert not reader.is_alive()


def test_parse_options_reads_the_kubelet_parameters() -> None:
    query = {"tailLines": "5", "limitBytes": "10", "timestamps": "true", "follow": "true"}
    options = logs.parse_options({**query, "previous": "false", "sinceSeconds": "2"}, 100.0)
    assert options == LogOptions(5, 10, True, 98 * 10**9, True, False)


@pytest.mark.parametrize(
    "query", [{"tailLines": "x"}, {"limitBytes": "-1"}, {"follow": "maybe"}, {"sinceTime": "y"}]
)
def test_parse_options_refuses_bad_values(query: dict[str, str]) -> None:
    with pytest.raises(OptionError):
        logs.parse_options(query, 0.0)


def test_only_the_current_and_previous_instance_logs_are_kept(tmp_path: Path) -> None:
    for index in range(4):
        path = logs.instance_log(tmp_path, "app", index)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    logs.prune(tmp_path, "app", 4)
    assert logs.instances(tmp_path, "app") == [3]


def test_the_pump_writes_both_streams_and_the_plain_log(tmp_path: Path) -> None:
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    pump = LogPump(out_read, err_read, tmp_path / "logs" / "0.log", tmp_path / "plain.log")
    pump.start()
    os.write(out_write, b"to out\nmore")
    os.write(err_write, b"to err\n")
    os.close(out_write)
    os.close(err_write)
    assert pump.wait(10)
    cri = (tmp_path / "logs" / "0.log").read_bytes().splitlines()
    assert sorted(line.split(b" ", 1)[1] for line in cri) == [
        b"stderr F to err",
        b"stdout F more",
        b"stdout F to out",
    ]
    # The plain log has the raw bytes as they came, the streams interleaved.
    plain = (tmp_path / "plain.log").read_bytes()
    assert len(plain) == len(b"to out\nmoreto err\n")
    assert all(part in plain for part in (b"to out\n", b"more", b"to err\n"))


@given(st.lists(st.binary(max_size=300), max_size=20))
def test_any_output_reads_back_as_written(chunks: list[bytes]) -> None:
    """Whatever a container writes, in whatever pieces, `kubectl logs` shows it unchanged
    (the stream's last bytes get the newline that ends their entry)."""
    written = b"".join(chunks)
    log, rest = b"", b""
    for chunk in chunks:
        lines, rest = logs.entries("stdout", rest + chunk, T0, False)
        log += lines
    lines, _ = logs.entries("stdout", rest, T0, True)
    log += lines
    shown: list[bytes] = []
    for line in log.split(b"\n")[:-1]:
        rendered = logs.render(line, LogOptions())
        assert rendered is not None
        shown.append(rendered)
    expected = written if not written or written.endswith(b"\n") else written + b"\n"
    assert b"".join(shown) == expected


@given(
    st.lists(st.text(alphabet="ab \t", max_size=8), max_size=15),
    st.none() | st.integers(min_value=0, max_value=20),
    st.none() | st.integers(min_value=0, max_value=80),
)
def test_tail_and_limit_show_the_end_of_the_log_cut_to_the_limit(
    lines: list[str], tail: int | None, limit: int | None
) -> None:
    """``tailLines`` keeps the last lines, ``limitBytes`` then cuts what is shown."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "0.log"
        path.write_bytes(_cri(*lines))
        shown = _read(path, LogOptions(tail_lines=tail, limit_bytes=limit))
    kept = lines if tail is None else lines[len(lines) - min(tail, len(lines)) :]
    expected = "".join(f"{line}\n" for line in kept).encode()
    assert shown == (expected if limit is None else expected[:limit])


@given(st.dictionaries(st.sampled_from(QUERY_KEYS), st.text(max_size=12), max_size=4))
def test_any_query_is_parsed_or_refused_as_a_bad_request(query: dict[str, str]) -> None:
    try:
        options = logs.parse_options(query, 1_000.0)
    except OptionError:
        return
    assert options.tail_lines is None or options.tail_lines >= 0
    assert options.limit_bytes is None or options.limit_bytes >= 0


def _files(tmp_path: Path, message: bytes, output: str) -> tuple[Path, Path]:
    message_file = tmp_path / "termination"
    message_file.write_bytes(message)
    log = tmp_path / "0.log"
    log.write_bytes(_cri(*output.splitlines()))
    return message_file, log


def test_the_termination_message_file_wins_under_either_policy(tmp_path: Path) -> None:
    message_file, log = _files(tmp_path, b"disk full", "some output")
    for policy in ("File", "FallbackToLogsOnError"):
        container = {"terminationMessagePolicy": policy}
        assert termination_message(container, 1, message_file, log) == "disk full"


def test_only_the_end_of_a_long_termination_message_is_kept(tmp_path: Path) -> None:
    message_file, log = _files(tmp_path, b"a" * 5000 + b"END", "")
    message = termination_message({}, 1, message_file, log)
    assert (len(message), message[-3:]) == (4096, "END")


def test_a_failed_container_falls_back_to_its_last_80_lines_at_most_2048_bytes(
    tmp_path: Path,
) -> None:
    output = "".join(f"line {i:03d} {'.' * 30}\n" for i in range(100))
    message_file, log = _files(tmp_path, b"", output)
    container = {"terminationMessagePolicy": "FallbackToLogsOnError"}
    last_80 = "".join(output.splitlines(keepends=True)[-80:])
    assert termination_message(container, 2, message_file, log) == last_80[-2048:]


def test_no_fallback_on_success_or_under_the_file_policy(tmp_path: Path) -> None:
    message_file, log = _files(tmp_path, b"", "output")
    fallback = {"terminationMessagePolicy": "FallbackToLogsOnError"}
    assert termination_message(fallback, 0, message_file, log) == ""
    assert termination_message({"terminationMessagePolicy": "File"}, 1, message_file, log) == ""
