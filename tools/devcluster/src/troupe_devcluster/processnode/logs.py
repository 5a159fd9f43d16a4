"""Container logs kept as a kubelet keeps them, and read back as it serves them.

Each container instance (each restart) writes to a file of its own,
``<pod dir>/logs/<container>/<restart count>.log``, in the CRI log format a
container runtime writes for the kubelet, one entry per line:

    2026-12-01T19:14:48.123456789Z stdout F the line's content

``F`` ends a line (or the stream's last bytes, as containerd writes them),
``P`` is a piece of a line longer than ``MAX_LINE_BYTES``. The timestamps are what make
``kubectl logs --timestamps`` and ``--since`` work; they are why the node pumps
a container's stdout and stderr through pipes instead of handing it a file.
The pump also appends the raw bytes to ``<pod dir>/<container>.log``, the
plain log of every instance that people and tests read directly.

Only the current and the previous instance are kept, as the kubelet's garbage
collection keeps them: enough for ``--previous``.
"""

from __future__ import annotations

import calendar
import os
import re
import selectors
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

MAX_LINE_BYTES = 16 * 1024
READ_BYTES = 64 * 1024
FOLLOW_POLL_SECONDS = 0.1
# The kubelet's termination-message fallback: the log's last 80 lines, at most 2 KiB.
FALLBACK_LINES = 80
FALLBACK_BYTES = 2048
_STREAMS = ("stdout", "stderr")


def log_dir(pod_directory: Path, container: str) -> Path:
    return pod_directory / "logs" / container


def instance_log(pod_directory: Path, container: str, index: int) -> Path:
    return log_dir(pod_directory, container) / f"{index}.log"


def instances(pod_directory: Path, container: str) -> list[int]:
    """The restart counts that have a log file, oldest first."""
    try:
        names = os.listdir(log_dir(pod_directory, container))
    except OSError:
        return []
    return sorted(int(name[:-4]) for name in names if re.fullmatch(r"\d+\.log", name))


def prune(pod_directory: Path, container: str, current: int) -> None:
    """Remove instance logs older than the one before ``current``."""
    for index in instances(pod_directory, container):
        if index < current - 1:
            Path(instance_log(pod_directory, container, index)).unlink(missing_ok=True)


def cri_timestamp(nanoseconds: int) -> bytes:
    """RFC 3339 with nine fractional digits in UTC: the kubelet's RFC3339NanoFixed."""
    seconds, fraction = divmod(nanoseconds, 1_000_000_000)
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{whole}.{fraction:09d}Z".encode()


def parse_timestamp(stamp: bytes) -> int:
    """Nanoseconds since the epoch of a timestamp ``cri_timestamp`` wrote."""
    text = stamp.decode()
    whole, _, rest = text.partition(".")
    seconds = calendar.timegm(time.strptime(whole.rstrip("Z"), "%Y-%m-%dT%H:%M:%S"))
    digits = rest.rstrip("Z")
    return seconds * 1_000_000_000 + int((digits + "000000000")[:9] or "0")


def entries(stream: str, data: bytes, now: int, final: bool) -> tuple[bytes, bytes]:
    """CRI lines for the complete lines in ``data``, and the rest to keep for later.

    Lines longer than ``MAX_LINE_BYTES`` go out in ``P`` pieces; with ``final``
    (the stream ended) the bytes after the last newline go out as a line too.
    """
    stamp = cri_timestamp(now)
    out: list[bytes] = []
    start = 0
    while True:
        end = data.find(b"\n", start)
        if end < 0 or end - start > MAX_LINE_BYTES:
            if len(data) - start > MAX_LINE_BYTES:
                piece = data[start : start + MAX_LINE_BYTES]
                out.append(b"%s %s P %s\n" % (stamp, stream.encode(), piece))
                start += MAX_LINE_BYTES
                continue
            break
        out.append(b"%s %s F %s\n" % (stamp, stream.encode(), data[start:end]))
        start = end + 1
    rest = data[start:]
    if final and rest:
        out.append(b"%s %s F %s\n" % (stamp, stream.encode(), rest))
        rest = b""
    return b"".join(out), rest


class LogPump:
    """Copies a container's stdout and stderr pipes into its CRI log and its plain log.

    One thread per container instance, ended by the end of both pipes (the
    container and everything in its process group are gone); ``done`` is set
    once every byte is on disk.
    """

    def __init__(self, stdout: int, stderr: int, log: Path, plain: Path | None) -> None:
        self.done = threading.Event()
        self._fds = {stdout: "stdout", stderr: "stderr"}
        self._log = log
        self._plain = plain
        self._thread = threading.Thread(target=self._run, name=f"logs {log}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wait(self, timeout: float) -> bool:
        """Whether the pump has written everything within ``timeout`` seconds."""
        return self.done.wait(timeout)

    def _run(self) -> None:
        pending = dict.fromkeys(self._fds, b"")
        selector = selectors.DefaultSelector()
        try:
            self._log.parent.mkdir(parents=True, exist_ok=True)
            with (
                self._log.open("ab", buffering=0) as log,
                open(self._plain or os.devnull, "ab", buffering=0) as plain,
            ):
                for fd in self._fds:
                    selector.register(fd, selectors.EVENT_READ)
                while selector.get_map():
                    for key, _ in selector.select():
                        fd = int(key.fd)
                        chunk = os.read(fd, READ_BYTES)
                        if not chunk:
                            selector.unregister(fd)
                        else:
                            plain.write(chunk)
                        lines, pending[fd] = entries(
                            self._fds[fd], pending[fd] + chunk, time.time_ns(), not chunk
                        )
                        if lines:
                            log.write(lines)
        finally:
            selector.close()
            for fd in self._fds:
                os.close(fd)
            self.done.set()


@dataclass(frozen=True)
class LogOptions:
    """What the kubelet's containerLogs endpoint takes, parsed."""

    tail_lines: int | None = None
    limit_bytes: int | None = None
    timestamps: bool = False
    since_nanoseconds: int | None = None
    follow: bool = False
    previous: bool = False


class OptionError(ValueError):
    """A query parameter the endpoint cannot use (400)."""


def _integer(query: dict[str, str], name: str) -> int | None:
    if name not in query:
        return None
    try:
        value = int(query[name])
    except ValueError:
        raise OptionError(f'{name} must be an integer, not "{query[name]}"') from None
    if value < 0:
        raise OptionError(f"{name} must not be negative")
    return value


def _boolean(query: dict[str, str], name: str) -> bool:
    value = query.get(name, "false").lower()
    if value in ("true", "1"):
        return True
    if value in ("false", "0", ""):
        return False
    raise OptionError(f'{name} must be true or false, not "{query[name]}"')


def parse_options(query: dict[str, str], now: float) -> LogOptions:
    """The options of a containerLogs query (first value of each parameter)."""
    since: int | None = None
    seconds = _integer(query, "sinceSeconds")
    if seconds is not None:
        since = int((now - seconds) * 1_000_000_000)
    if "sinceTime" in query:
        try:
            moment = datetime.fromisoformat(query["sinceTime"])
        except ValueError:
            raise OptionError(f'sinceTime "{query["sinceTime"]}" is not RFC 3339') from None
        if moment.tzinfo is None:
            raise OptionError(f'sinceTime "{query["sinceTime"]}" has no time zone')
        since = int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000
    return LogOptions(
        tail_lines=_integer(query, "tailLines"),
        limit_bytes=_integer(query, "limitBytes"),
        timestamps=_boolean(query, "timestamps"),
        since_nanoseconds=since,
        follow=_boolean(query, "follow"),
        previous=_boolean(query, "previous"),
    )


def tail_offset(path: Path, lines: int) -> int:
    """Where the last ``lines`` complete lines of the file start (0 if it has fewer)."""
    with path.open("rb") as file:
        end = file.seek(0, os.SEEK_END)
        position = end
        # A last line without its newline is still being written: not one of ours.
        file.seek(max(end - 1, 0))
        seen = -1 if end and file.read(1) != b"\n" else 0
        while position > 0:
            step = min(READ_BYTES, position)
            position -= step
            file.seek(position)
            block = file.read(step)
            index = len(block)
            while True:
                index = block.rfind(b"\n", 0, index)
                if index < 0:
                    break
                seen += 1
                if seen > lines:
                    return position + index + 1
    return 0


def render(line: bytes, options: LogOptions) -> bytes | None:
    """What one CRI line shows to a client, or None when ``since`` filters it out."""
    stamp, stream, tag, content = [*line.split(b" ", 3), b"", b"", b""][:4]
    if stream not in (b"stdout", b"stderr"):
        # Not a CRI line (a file from before the node wrote them): show it as it is.
        return line + b"\n"
    if options.since_nanoseconds is not None:
        try:
            if parse_timestamp(stamp) < options.since_nanoseconds:
                return None
        except ValueError:
            pass
    shown = content + (b"\n" if tag == b"F" else b"")
    return stamp + b" " + shown if options.timestamps else shown


def read_log(
    path: Path,
    options: LogOptions,
    write: Callable[[bytes], None],
    finished: Callable[[], bool],
) -> None:
    """Write the log at ``path`` as the kubelet shows it; with ``follow`` keep going
    until ``finished()`` says the instance has stopped and everything is read."""
    budget = options.limit_bytes
    start = 0 if options.tail_lines is None else tail_offset(path, options.tail_lines)
    with path.open("rb") as file:
        file.seek(start)
        rest = b""
        while True:
            # Read whether it was finished before reading, so nothing written last is lost.
            ended = finished() or not options.follow
            chunk = file.read(READ_BYTES)
            if not chunk:
                if ended:
                    return
                time.sleep(FOLLOW_POLL_SECONDS)
                continue
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                shown = render(line, options)
                if shown is None:
                    continue
                if budget is not None:
                    shown = shown[:budget]
                    budget -= len(shown)
                write(shown)
                if budget == 0:
                    return


def last_lines(path: Path, lines: int = FALLBACK_LINES, limit: int = FALLBACK_BYTES) -> str:
    """The log's last ``lines`` lines, at most ``limit`` bytes of their end: the fallback
    termination message of ``FallbackToLogsOnError``."""
    out: list[bytes] = []
    try:
        read_log(path, LogOptions(tail_lines=lines), out.append, lambda: True)
    except OSError:
        return ""
    return b"".join(out)[-limit:].decode(errors="replace")
