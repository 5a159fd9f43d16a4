"""Token streams as a person watches them (pure): messages read, sanitised and laid out.

An LLM agent publishes its answer's deltas on core NATS (``naming.token_stream_subject``)
as ``{"delta": text, "turn": n}``, announces a tool call as ``{"tool": name, "turn": n}``
and ends each turn with ``{"done": true, "turn": n, "final": bool}``. Anyone who may
publish there can send anything else, so a message is only believed when it has exactly
that shape, its text is cut to size, and terminal control sequences are stripped: a delta
can never move the cursor, retitle the window or clear the screen.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from troupe_runtime.contract import envelope, naming
from troupe_runtime.contract.run_events import (
    COMPENSATE,
    CompensationDispatched,
    Event,
    StepDispatched,
    dispatch_id,
)

MAX_MESSAGE_BYTES = 64 * 1024
"""A delta is a few tokens; a message larger than this is not one, and is not parsed."""
MAX_DELTA_CHARS = 16 * 1024
MAX_TOOL_CHARS = 120
MAX_TURN = 10**6
CUT = "…"

# ESC sequences (CSI with its parameters, OSC/DCS/APC/PM/SOS strings up to their
# terminator, two-character escapes), then any control character but newline and tab,
# and the Unicode controls that reorder or hide text (bidi overrides, isolates).
_ESCAPE_SEQUENCE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]?"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f]).*?(?:\x07|\x1b\\|\x9c|$)"
    r"|\x1b[ -/]*[0-~]?"
    r"|\x9b[0-?]*[ -/]*[@-~]?",
    re.DOTALL,
)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def terminal_safe(text: str) -> str:
    """``text`` with escape sequences and control characters removed (newline and tab
    kept; a carriage return becomes nothing, so it cannot overwrite a line) and lone
    surrogates escaped."""
    text = _CONTROL.sub("", _ESCAPE_SEQUENCE.sub("", text))
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class Delta:
    text: str
    turn: int | None = None


@dataclass(frozen=True)
class ToolCall:
    name: str
    turn: int | None = None


@dataclass(frozen=True)
class TurnDone:
    turn: int | None = None
    final: bool = False


Chunk = Delta | ToolCall | TurnDone


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + CUT


def _turn(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TURN:
        return None
    return value


def parse_chunk(data: bytes) -> Chunk | None:
    """The chunk a stream message holds; None for anything that is not one."""
    if len(data) > MAX_MESSAGE_BYTES:
        return None
    try:
        body = json.loads(data, parse_constant=envelope.refuse_json_constant)
    except (ValueError, RecursionError):
        return None
    if not isinstance(body, dict):
        return None
    turn = _turn(body.get("turn"))
    if isinstance(body.get("delta"), str):
        return Delta(terminal_safe(_cut(body["delta"], MAX_DELTA_CHARS)), turn)
    if isinstance(body.get("tool"), str):
        name = " ".join(terminal_safe(body["tool"]).split())
        return ToolCall(_cut(name, MAX_TOOL_CHARS) or "?", turn)
    if body.get("done") is True:
        return TurnDone(turn, body.get("final") is True)
    return None


def chunk_json(chunk: Chunk, label: str | None = None) -> dict[str, object]:
    """One chunk for ``-o json``: the wire shape, sanitised, with the step it came from."""
    document: dict[str, object]
    match chunk:
        case Delta():
            document = {"delta": chunk.text, "turn": chunk.turn}
        case ToolCall():
            document = {"tool": chunk.name, "turn": chunk.turn}
        case TurnDone():
            document = {"done": True, "turn": chunk.turn, "final": chunk.final}
    return document if label is None else {"step": label, **document}


class StreamLayout:
    """Lays chunks out as text: deltas run on as they come, a tool call gets a line of its
    own, and when several steps stream at once each line names its step (``[label] ``)."""

    def __init__(self) -> None:
        self._label: str | None = None
        self._line_start = True

    def text(self, chunk: Chunk, label: str | None = None) -> str:
        """What to print for ``chunk`` from ``label`` (None: the only stream)."""
        out: list[str] = []
        if label != self._label and not self._line_start:
            out.append("\n")
            self._line_start = True
        self._label = label
        match chunk:
            case Delta(text=text):
                for piece in re.split(r"(\n)", text):
                    if piece == "\n":
                        out.append("\n")
                        self._line_start = True
                    elif piece:
                        out.append(self._prefix() + piece)
                        self._line_start = False
            case ToolCall(name=name):
                out.append(self.end_line() + self._prefix() + f"[tool: {name}]\n")
                self._line_start = True
            case TurnDone():
                out.append(self.end_line())
        return "".join(out)

    def end_line(self) -> str:
        """A newline if the last text printed left a line open."""
        if self._line_start:
            return ""
        self._line_start = True
        return "\n"

    def _prefix(self) -> str:
        return f"[{self._label}] " if self._line_start and self._label is not None else ""


Shown = tuple[str, bytes]
"""A stream message to show now, with the label of the step it answers."""


class StepStreams:
    """Which step each of a run's token streams answers, and the messages held until
    that is known.

    A stream's subject ends in a digest of its dispatch's event id, so it is named by
    matching against the dispatches the run's log records (``step``, ``step#2`` for a
    retry, ``step:compensate``). The engine sends a dispatch before it logs it, so an
    agent may stream before the log names the stream: its messages wait, in order, up
    to ``hold_seconds`` (then they show under the digest's first characters) and at most
    ``MAX_HELD`` in all (past that they show at once), so a flood cannot grow memory.
    """

    MAX_HELD = 4096

    def __init__(self, namespace: str, run_id: str, hold_seconds: float) -> None:
        self._namespace = namespace
        self._run_id = run_id
        self._hold = hold_seconds
        self._labels: dict[str, str] = {}
        self._held: dict[str, list[tuple[float, bytes]]] = {}
        self._count = 0

    def learn(self, event: Event) -> list[Shown]:
        """Name the stream a logged dispatch answers; return its held messages."""
        token: int | str
        match event:
            case StepDispatched(step=step, attempt=attempt):
                token, label = attempt, step if attempt == 1 else f"{step}#{attempt}"
            case CompensationDispatched(step=step):
                token, label = COMPENSATE, f"{step}:{COMPENSATE}"
            case _:
                return []
        event_id = dispatch_id(self._run_id, step, token)
        subject = naming.token_stream_subject(self._namespace, self._run_id, event_id)
        self._labels[subject] = label
        return self._release(subject, label)

    def take(self, subject: str, data: bytes, now: float) -> list[Shown]:
        """What to show now that ``data`` came on ``subject``."""
        label = self._labels.get(subject)
        if label is not None:
            return [(label, data)]
        if self._count >= self.MAX_HELD:
            return [*self._release(subject, _digest_label(subject)), (_digest_label(subject), data)]
        self._held.setdefault(subject, []).append((now, data))
        self._count += 1
        return []

    def expired(self, now: float) -> list[Shown]:
        """Held messages whose stream stayed unnamed for ``hold_seconds``."""
        shown: list[Shown] = []
        for subject, held in list(self._held.items()):
            if now - held[0][0] >= self._hold:
                shown += self._release(subject, _digest_label(subject))
        return shown

    def next_expiry(self) -> float | None:
        return min((held[0][0] + self._hold for held in self._held.values()), default=None)

    def release_all(self) -> list[Shown]:
        shown: list[Shown] = []
        for subject in list(self._held):
            shown += self._release(subject, _digest_label(subject))
        return shown

    def _release(self, subject: str, label: str) -> list[Shown]:
        held = self._held.pop(subject, [])
        self._count -= len(held)
        return [(label, data) for _, data in held]


def _digest_label(subject: str) -> str:
    return subject.rsplit(".", 1)[-1][:8]
