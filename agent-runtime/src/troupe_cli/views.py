"""Pure derivations behind the commands: step timelines, agent load, dead letters, budgets.

``nats_ops`` gathers raw facts (events, consumer counters, stored messages);
these functions turn them into what a person asks about, and are unit-tested
without a server.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from troupe_runtime.contract import budget, dead_letters, envelope, naming
from troupe_runtime.contract.budget import (
    Amount,
    BudgetDefinition,
    BudgetLimits,
    BudgetWindow,
    Ledger,
)
from troupe_runtime.contract.dead_letters import header_map
from troupe_runtime.contract.run_events import (
    BUDGET_EXCEEDED_REASON,
    ApprovalDecided,
    ApprovalRequested,
    CompensationDispatched,
    CompensationFinished,
    Event,
    StepDispatched,
    StepFailed,
    StepFellBack,
    StepSucceeded,
)
from troupe_runtime.contract.run_state import approval_error
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
    agent: str | None = None
    """The agent the attempt went to (a fallback's, after a hand-over); None for a
    compensation, an approval, and runs logged before fallbacks existed."""

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
    compensation shows as an attempt of ``None``; an approval step shows as attempt 1,
    WaitingForApproval until it is decided (Approved, Denied or TimedOut). An attempt
    after which the step went on with a fallback agent shows as ``FellBack``, and the
    attempts after it name that agent.
    """
    attempts: dict[tuple[str, int | None], StepAttempt] = {}
    for event in events:
        match event:
            case StepDispatched():
                attempts[(event.step, event.attempt)] = StepAttempt(
                    event.step, event.attempt, "Running", event.at, agent=event.agent
                )
            case StepFellBack():
                failed = attempts.get((event.step, event.attempt))
                if failed is not None and failed.status == "Failed":
                    attempts[(event.step, event.attempt)] = replace(failed, status="FellBack")
            case CompensationDispatched():
                attempts[(event.step, None)] = StepAttempt(event.step, None, "Running", event.at)
            case ApprovalRequested():
                attempts[(event.step, 1)] = StepAttempt(
                    event.step, 1, "WaitingForApproval", event.at
                )
            case ApprovalDecided():
                started = attempts.get((event.step, 1))
                if started is None or started.finished_at is not None:
                    continue
                attempts[(event.step, 1)] = StepAttempt(
                    started.step,
                    1,
                    event.phase,
                    started.dispatched_at,
                    event.at,
                    None if event.approved else approval_error(event),
                )
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
                    started.agent,
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


LATEST_EPOCH = budget.LATEST_PROJECTION
"""A ledger said to start later is junk (and past what a datetime holds)."""


@dataclass(frozen=True)
class BudgetRecords:
    """What a namespace's budget bucket holds: definitions, every window's ledger by budget,
    and the keys whose value did not read (anyone with access may write there)."""

    definitions: dict[str, BudgetDefinition]
    ledgers: dict[str, dict[str, Ledger]]
    unreadable: list[str]


def budget_records(entries: Mapping[str, bytes]) -> BudgetRecords:
    """Sort the bucket's raw entries (key to value) into definitions and their ledgers.

    A ledger belongs to a budget by its key: ``naming.budget_ledger_key(name, window)``,
    one window token after the budget's; ledgers of no definition (a Budget being
    deleted) are left out. Values that do not validate are named in ``unreadable``."""
    definitions: dict[str, BudgetDefinition] = {}
    unreadable: list[str] = []
    raw_ledgers: dict[str, bytes] = {}
    definition_prefix = naming.budget_definition_key("")
    for key, value in sorted(entries.items()):
        if key.startswith(definition_prefix):
            try:
                definition = BudgetDefinition.model_validate_json(value)
            except ValidationError:
                unreadable.append(key)
                continue
            if naming.budget_definition_key(definition.name) != key:
                unreadable.append(key)  # a definition filed under another budget's key
                continue
            definitions[definition.name] = definition
        else:
            raw_ledgers[key] = value
    ledgers: dict[str, dict[str, Ledger]] = {name: {} for name in definitions}
    for name in definitions:
        prefix = naming.budget_ledger_key(name, "")
        for key, value in raw_ledgers.items():
            window = key.removeprefix(prefix)
            if not key.startswith(prefix) or not window or "." in window:
                continue
            try:
                ledger = Ledger.model_validate_json(value)
            except ValidationError:
                unreadable.append(key)
                continue
            if ledger.window != window or not 0 <= ledger.started <= LATEST_EPOCH:
                unreadable.append(key)  # another window's ledger, or no time there is
                continue
            ledgers[name][window] = ledger
    return BudgetRecords(definitions, ledgers, sorted(unreadable))


@dataclass(frozen=True)
class WindowFigures:
    """One window's ledger as a person reads it."""

    window: str
    started: datetime
    spent: Amount
    held: Amount
    holds: int
    refusals: int


@dataclass(frozen=True)
class BudgetView:
    """A budget now: the figures of its current window (Run windows: every run's ledger
    summed, remaining that of the run closest to its limit), and every window kept."""

    definition: BudgetDefinition
    window: str
    """The current window's id; ``runs`` for a Run window."""
    window_start: datetime | None
    window_end: datetime | None
    spent: Amount
    held: Amount
    remaining_tokens: int | None
    remaining_cost: float | None
    burn_rate: Amount
    projected_exhaustion: datetime | None
    refusals: int
    runs: int | None
    """Run windows: runs with a ledger; None for other windows."""
    runs_exceeded: int | None
    largest_run: Amount | None
    windows: list[WindowFigures]
    """Every ledger kept, newest window first (Run windows: the run that spent most first)."""


def _zero() -> Amount:
    return Amount()


def _remaining(limits: BudgetLimits, used: Amount) -> tuple[int | None, float | None]:
    """What the hard limits leave past ``used`` (spent + held), per unit with a hard
    limit, never below zero."""
    tokens = limits.tokens.hard if limits.tokens else None
    cost = limits.cost_usd.hard if limits.cost_usd else None
    return (
        None if tokens is None else max(0, tokens - used.tokens),
        None if cost is None else max(0.0, cost - used.cost_usd),
    )


def _exceeded(limits: BudgetLimits, ledger_spent: Amount, refusals: int) -> bool:
    tokens = limits.tokens.hard if limits.tokens else None
    cost = limits.cost_usd.hard if limits.cost_usd else None
    return (
        refusals > 0
        or (tokens is not None and ledger_spent.tokens >= tokens)
        or (cost is not None and ledger_spent.cost_usd >= cost)
    )


def _figures(window: BudgetWindow, wid: str, ledger: Ledger, now: float) -> WindowFigures:
    return WindowFigures(
        window=wid,
        started=datetime.fromtimestamp(ledger.started, UTC),
        spent=budget.spent(ledger, window, now),
        held=budget.held(ledger, now),
        holds=len(ledger.holds),
        refusals=ledger.refusals,
    )


_WINDOW_IDS = {
    "Run": re.compile(r"run-[0-9a-f]+"),
    "Hour": re.compile(r"h[0-9]{10}"),
    "Day": re.compile(r"d[0-9]{8}"),
    "Month": re.compile(r"m[0-9]{6}"),
    "Rolling": re.compile(re.escape(budget.ROLLING_WINDOW_ID)),
}


def _own(window: BudgetWindow, ledgers: Mapping[str, Ledger]) -> dict[str, Ledger]:
    """The ledgers of windows of ``window``'s type: a Budget whose window type changed
    keeps its old ledgers a while, and they are not this window's."""
    pattern = _WINDOW_IDS[window.type]
    return {wid: ledger for wid, ledger in ledgers.items() if pattern.fullmatch(wid)}


def _moment(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


def budget_view(
    definition: BudgetDefinition, ledgers: Mapping[str, Ledger], now: float
) -> BudgetView:
    """``definition``'s figures at ``now`` (epoch seconds), from its ledgers by window id,
    computed by the contract's own ledger functions, as the runtimes and the operator do."""
    window = definition.window
    limits = definition.limits
    if window.type == "Run":
        return _run_view(definition, ledgers, now)
    wid = budget.window_id(window, now, None)
    assert wid is not None  # only Run windows are outside every window
    ledger = _own(window, ledgers).get(wid) or budget.fresh_ledger(window, wid, now)
    current = _figures(window, wid, ledger, now)
    start, end = budget.window_bounds(window, ledger, now)
    tokens_left, cost_left = _remaining(limits, current.spent + current.held)
    kept = [_figures(window, w, kept, now) for w, kept in _own(window, ledgers).items()]
    return BudgetView(
        definition=definition,
        window=wid,
        window_start=_moment(start),
        window_end=None if window.type == "Rolling" else _moment(end),
        spent=current.spent,
        held=current.held,
        remaining_tokens=tokens_left,
        remaining_cost=cost_left,
        burn_rate=budget.burn_rate(ledger, window, now),
        projected_exhaustion=budget.projected_exhaustion(ledger, definition, now),
        refusals=current.refusals,
        runs=None,
        runs_exceeded=None,
        largest_run=None,
        windows=sorted(kept, key=lambda f: f.started, reverse=True),
    )


def _run_view(
    definition: BudgetDefinition, ledgers: Mapping[str, Ledger], now: float
) -> BudgetView:
    """Each run is a window of its own: the figures sum the runs; remaining is what the
    run closest to its limit has left; the burn rate is the runs' spending per hour since
    the first of them began; no exhaustion is projected (runs end, and a new run starts
    from zero)."""
    window, limits = definition.window, definition.limits
    runs = [_figures(window, w, kept, now) for w, kept in _own(window, ledgers).items()]
    spent_all = sum((r.spent for r in runs), _zero())
    held_all = sum((r.held for r in runs), _zero())
    closest = [_remaining(limits, r.spent + r.held) for r in runs] or [_remaining(limits, _zero())]
    tokens_left = [t for t, _ in closest if t is not None]
    cost_left = [c for _, c in closest if c is not None]
    first = min((r.started.timestamp() for r in runs), default=now)
    hours = max(now - first, budget.MIN_BURN_SECONDS) / 3600.0
    largest = max(runs, key=lambda r: (r.spent.tokens, r.spent.cost_usd), default=None)
    return BudgetView(
        definition=definition,
        window="runs",
        window_start=None,
        window_end=None,
        spent=spent_all,
        held=held_all,
        remaining_tokens=min(tokens_left) if tokens_left else None,
        remaining_cost=min(cost_left) if cost_left else None,
        burn_rate=Amount(
            tokens=round(spent_all.tokens / hours), cost_usd=spent_all.cost_usd / hours
        ),
        projected_exhaustion=None,
        refusals=sum(r.refusals for r in runs),
        runs=len(runs),
        runs_exceeded=sum(_exceeded(limits, r.spent, r.refusals) for r in runs),
        largest_run=largest.spent if largest else _zero(),
        windows=sorted(runs, key=lambda r: (r.spent.tokens, r.spent.cost_usd), reverse=True),
    )
