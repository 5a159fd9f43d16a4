"""Pure derivations behind the commands: step timelines, agent load, dead letters.

``nats_ops`` gathers raw facts (events, consumer counters, stored messages);
these functions turn them into what a person asks about, and are unit-tested
without a server.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from troupe_runtime.contract import dead_letters, envelope
from troupe_runtime.contract.dead_letters import header_map
from troupe_runtime.contract.run_events import (
    BUDGET_EXCEEDED_REASON,
    CompensationDispatched,
    CompensationFinished,
    Event,
    StepDispatched,
    StepFailed,
    StepSucceeded,
)
from troupe_runtime.contract.usage import Usage

# Data nested deeper than this is shown as its text: printing it would recurse too far.
MAX_SHOWN_DEPTH = 100
MAX_ATTEMPTS_DIGITS = 18
DEAD_LETTER_HEADERS = frozenset(
    {
        dead_letters.DROPPED_HEADER,
        dead_letters.REASON_HEADER,
        dead_letters.ERROR_HEADER,
        dead_letters.ATTEMPTS_HEADER,
        dead_letters.AGENT_HEADER,
        dead_letters.SUBJECT_HEADER,
        dead_letters.STREAM_HEADER,
        dead_letters.SEQUENCE_HEADER,
    }
)


@dataclass(frozen=True)
class RunResult:
    """What a run's engine published on its results subject."""

    run_id: str
    status: str
    output: Any
    error: str | None

    @property
    def succeeded(self) -> bool:
        return self.status == "Succeeded"


@dataclass(frozen=True)
class StepAttempt:
    """One dispatch of a step (or of its compensation) and how it ended."""

    step: str
    attempt: int | None
    status: str
    dispatched_at: datetime
    finished_at: datetime | None = None
    error: str | None = None
    usage: Usage | None = None
    """The tokens and cost the agent's reply reported; None when it reported none."""

    @property
    def compensation(self) -> bool:
        return self.attempt is None

    @property
    def seconds(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.dispatched_at).total_seconds()


def timeline(events: list[Event]) -> list[StepAttempt]:
    """Every dispatch of a run in log order, each with its outcome if it has one.

    A step that timed out and was retried shows once per attempt; a
    compensation shows as an attempt of ``None``.
    """
    attempts: dict[tuple[str, int | None], StepAttempt] = {}
    for event in events:
        match event:
            case StepDispatched():
                attempts[(event.step, event.attempt)] = StepAttempt(
                    event.step, event.attempt, "Running", event.at
                )
            case CompensationDispatched():
                attempts[(event.step, None)] = StepAttempt(event.step, None, "Running", event.at)
            case StepSucceeded() | StepFailed() | CompensationFinished():
                key = (
                    event.step,
                    None if isinstance(event, CompensationFinished) else event.attempt,
                )
                started = attempts.get(key)
                if started is None or started.finished_at is not None:
                    continue
                attempts[key] = StepAttempt(
                    started.step,
                    started.attempt,
                    _finished_status(event),
                    started.dispatched_at,
                    event.at,
                    None if isinstance(event, StepSucceeded) else event.error,
                    event.usage,
                )
    return list(attempts.values())


def _finished_status(event: StepSucceeded | StepFailed | CompensationFinished) -> str:
    """An attempt a Budget refused shows as ``BudgetExceeded``, not as any failure."""
    if isinstance(event, CompensationFinished):
        return "Failed" if event.error else "Done"
    if isinstance(event, StepFailed):
        return "BudgetExceeded" if event.reason == BUDGET_EXCEEDED_REASON else "Failed"
    return "Succeeded"


@dataclass(frozen=True)
class ConsumerCounters:
    """One consumer's counters at one moment, as the server reports them."""

    pending: int
    ack_pending: int
    redelivered: int
    ack_floor: int


@dataclass(frozen=True)
class AgentSample:
    """An agent's inbox consumers (all priorities) and dead letters at one moment."""

    agent: str
    consumers: tuple[ConsumerCounters, ...]
    dead_letters: int | None

    @property
    def acked(self) -> int:
        return sum(c.ack_floor for c in self.consumers)


@dataclass(frozen=True)
class AgentLoad:
    """What ``troupe top`` shows per agent."""

    agent: str
    throughput: float
    lag: int
    ack_pending: int
    redelivered: int
    dead_letters: int | None


def agent_loads(
    before: list[AgentSample], after: list[AgentSample], seconds: float
) -> list[AgentLoad]:
    """Load between two samples ``seconds`` apart, sorted by agent.

    Throughput is the advance of the consumers' ack floors (deliveries
    acknowledged) per second; an agent absent from ``before`` (deployed
    between the samples) or whose consumers were recreated counts from zero.
    """
    earlier = {sample.agent: sample.acked for sample in before}
    loads = []
    for sample in sorted(after, key=lambda s: s.agent):
        acked = max(sample.acked - earlier.get(sample.agent, sample.acked), 0)
        loads.append(
            AgentLoad(
                agent=sample.agent,
                throughput=acked / seconds if seconds > 0 else 0.0,
                lag=sum(c.pending for c in sample.consumers),
                ack_pending=sum(c.ack_pending for c in sample.consumers),
                redelivered=sum(c.redelivered for c in sample.consumers),
                dead_letters=sample.dead_letters,
            )
        )
    return loads


@dataclass(frozen=True)
class DeadLetter:
    """A message in an agent's dead-letter stream, with the headers the runtime added.

    Anyone may have written it, so nothing in it is trusted: the headers are
    taken as plain one-line text (``header_map``), whatever nats-py parsed.
    """

    sequence: int
    time: datetime | None
    headers: dict[str, str]
    data: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", header_map(self.headers))

    @property
    def reason(self) -> str:
        return self.headers.get(dead_letters.REASON_HEADER, "")

    @property
    def error(self) -> str:
        return self.headers.get(dead_letters.ERROR_HEADER, "")

    @property
    def attempts(self) -> int | None:
        value = self.headers.get(dead_letters.ATTEMPTS_HEADER, "")
        ascii_digits = value.isascii() and value.isdecimal()
        return int(value) if ascii_digits and len(value) <= MAX_ATTEMPTS_DIGITS else None

    @property
    def original_subject(self) -> str | None:
        return self.headers.get(dead_letters.SUBJECT_HEADER) or None

    @property
    def dropped(self) -> str | None:
        """What the runtime left out to make the letter fit, if anything."""
        return self.headers.get(dead_letters.DROPPED_HEADER) or None

    @property
    def content_type(self) -> str | None:
        return _header(self.headers, envelope.CONTENT_TYPE_HEADER)

    @property
    def event_id(self) -> str | None:
        return _header(self.headers, f"{envelope.HEADER_PREFIX}id")


def _header(headers: dict[str, str], name: str) -> str | None:
    """NATS header names are case-sensitive on the wire; CloudEvents' are not."""
    return next((value for key, value in headers.items() if key.lower() == name), None)


def replay_headers(dead: DeadLetter, dead_letter_stream: str) -> dict[str, str]:
    """The original headers of a dead letter, for publishing it again as it was.

    The dead-letter bookkeeping goes; a message id derived from the dead
    letter makes a replay repeated within the duplicate window harmless.
    """
    kept = {
        key: value
        for key, value in dead.headers.items()
        if key not in DEAD_LETTER_HEADERS and not key.lower().startswith("nats-")
    }
    return {**kept, "Nats-Msg-Id": f"replay:{dead_letter_stream}:{dead.sequence}"}


def json_depth(data: bytes) -> int:
    """How deeply ``data`` nests arrays and objects, counted without parsing (so without
    recursion); brackets inside strings do not count."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


def readable_data(data: bytes, content_type: str | None) -> Any:
    """A payload as a person should see it: JSON decoded, else text, else base64.

    JSON that only Python reads (NaN, Infinity) or that nests deeper than
    ``MAX_SHOWN_DEPTH`` is shown as its text, so printing it always works.
    """
    if envelope.is_json(content_type) and json_depth(data) <= MAX_SHOWN_DEPTH:
        try:
            return json.loads(data, parse_constant=envelope.refuse_json_constant) if data else None
        except (ValueError, RecursionError):
            pass
    try:
        return data.decode()
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode()}
