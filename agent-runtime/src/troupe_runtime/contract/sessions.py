"""Sessions of an LLM agent: what ``spec.llm.session`` declares, what a session keeps in NATS,
and the pure decisions over both (the cap on a history, the per-session queue of messages).

A message belongs to a session when its envelope carries the ``sessionid`` extension
(``envelope.SESSION_ATTRIBUTE``; the gateway sets it from A2A's contextId). The agent's
sessions live in one KV bucket per Agent (``naming.session_bucket``): per Agent because the
retention (the bucket's TTL) is the Agent's, and because deleting the Agent then deletes its
conversations with it. Each session has two keys, both named by a digest of the session id
(``naming.session_history_key``, ``naming.session_queue_key``), so no caller's text ever
becomes a subject token:

- the history (``SessionHistory``): the finished exchanges (the user's input and the final
  answer, not the tool chatter: tool results are the message's own business and may be
  large), oldest first, and a summary of older ones when the Agent summarises;
- the queue (``SessionQueue``): the messages of the session being handled or waiting, in
  the order they arrived, each with an expiry its replica renews, so a crashed replica holds
  a session for one lease at most.

Both are written with revision checks (compare-and-set), so two replicas never lose a turn
or a place in the queue. ``fold`` (pure) enforces the cap on every write; ``admit`` (pure)
is the double-texting policy.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
)

from troupe_runtime.contract.dead_letters import DeadLetterReason
from troupe_runtime.contract.durations import (
    CEL_KEY,
    DURATION_MAX_LENGTH,
    DURATION_PATTERN,
    cel_matches,
    format_duration,
    parse_duration,
)
from troupe_runtime.contract.policies import WireModel

DoubleTexting = Literal["reject", "enqueue", "interrupt", "rollback"]
Overflow = Literal["trim", "summarize"]
StopMark = Literal["interrupt", "rollback"]

MIN_RETENTION = timedelta(minutes=1)
RETENTION_MESSAGE = "must be a duration of at least 1m (and at most 2562047h47m16.854s)"
MAX_BYTES_MIN = 1024
MAX_BYTES_MAX = 512 * 1024
"""Well inside NATS's default 1 MiB message, with the key's headers."""
SUMMARY_SHARE = 4
"""With ``overflow: summarize``, a quarter of ``maxBytes`` is kept for the summary."""
INTERRUPTED_STOP = "interrupted"
"""``stopped`` of an answer cut short by a newer message of its session."""


def _at_least_a_minute(value: timedelta) -> timedelta:
    if value < MIN_RETENTION:
        raise ValueError(RETENTION_MESSAGE)
    return value


Retention = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    AfterValidator(_at_least_a_minute),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": DURATION_PATTERN,
            "maxLength": DURATION_MAX_LENGTH,
            CEL_KEY: [
                {
                    "rule": f"!{cel_matches('self')} || duration(self) >= duration('1m')",
                    "message": RETENTION_MESSAGE,
                }
            ],
        }
    ),
]
"""A session's retention: at least a minute, so it outlasts a slot's lease renewals."""


class SessionPolicy(WireModel):
    """A conversation kept across messages, per session id (A2A's contextId)."""

    enabled: bool = Field(
        default=True,
        description="Keep a history per session; default true. When false (or no session "
        "block) messages are independent and the agent does no session I/O at all.",
    )
    retention: Retention = Field(
        default=timedelta(days=7),
        description="How long a session is kept after its last message: a duration such as "
        "24h; at least 1m; default 168h (7 days).",
    )
    max_turns: int = Field(
        default=20,
        ge=1,
        le=1000,
        description="Exchanges (an input and its final answer) kept per session; older ones "
        "are trimmed or summarised. Default 20.",
    )
    max_bytes: int = Field(
        default=65536,
        ge=MAX_BYTES_MIN,
        le=MAX_BYTES_MAX,
        description="The stored history's size in bytes (JSON), summary included; older "
        "exchanges go first, and an exchange larger than this alone is cut. Default 65536.",
    )
    overflow: Overflow = Field(
        default="trim",
        description="What happens to exchanges past the cap: trim (drop the oldest) or "
        "summarize (the agent's own model summarises them into a system note kept at the "
        "head of the history). Default trim.",
    )
    double_texting: DoubleTexting = Field(
        default="enqueue",
        description="A message arriving while another of its session runs, on any replica: "
        "reject (dead-letter it, reason session-busy), enqueue (run it after, in arrival "
        "order), interrupt (stop the running one at its next turn boundary, its answer so "
        "far kept, then run it) or rollback (stop the running one and discard its turns, "
        "reason session-rolled-back). Default enqueue.",
    )


class Exchange(BaseModel):
    """One finished message of a session: its input and its final answer, as text."""

    model_config = ConfigDict(frozen=True)

    event: str = Field(max_length=64)
    """The input event's ``event_marker``: a redelivered message is recorded once."""
    user: str
    assistant: str


class SessionHistory(BaseModel):
    """What a session remembers; stored as JSON under its history key."""

    model_config = ConfigDict(frozen=True)

    summary: str | None = None
    turns: tuple[Exchange, ...] = ()

    def encoded(self) -> bytes:
        return self.model_dump_json().encode()

    def has(self, event: str) -> bool:
        return any(turn.event == event for turn in self.turns)


def event_marker(event_id: str) -> str:
    """How a session names one message (its event's id, digested): of fixed size, so a long
    id neither breaks the cap nor the queue."""
    return hashlib.sha256(event_id.encode()).hexdigest()[:32]


def _cut(text: str, size: int) -> str:
    """``text`` at most ``size`` UTF-8 bytes, never splitting a character."""
    return text.encode()[: max(0, size)].decode(errors="ignore")


def summary_budget(policy: SessionPolicy) -> int:
    """Bytes a summary may take (0 when the Agent trims)."""
    return policy.max_bytes // SUMMARY_SHARE if policy.overflow == "summarize" else 0


def bounded_summary(summary: str, policy: SessionPolicy) -> str:
    """A summary as the history keeps it: cut so escaped as JSON it fits its share."""
    budget = summary_budget(policy)
    text = _cut(summary, budget)
    while text and len(SessionHistory(summary=text).encoded()) > budget:
        text = text[: len(text) // 2]
    return text


def _shrunk(exchange: Exchange, budget: int, summary: str | None) -> Exchange:
    """``exchange`` cut (halving its texts) until a history of it alone fits ``budget``."""
    while len(SessionHistory(summary=summary, turns=(exchange,)).encoded()) > budget:
        if not exchange.user and not exchange.assistant:
            break
        exchange = exchange.model_copy(
            update={
                "user": exchange.user[: len(exchange.user) // 2],
                "assistant": exchange.assistant[: len(exchange.assistant) // 2],
            }
        )
    return exchange


def fold(
    history: SessionHistory, exchange: Exchange, policy: SessionPolicy
) -> tuple[SessionHistory, tuple[Exchange, ...]]:
    """``history`` with ``exchange`` appended and the cap enforced (pure); the exchanges it
    dropped, oldest first, for a summary.

    At most ``maxTurns`` exchanges, and the JSON at most ``maxBytes`` (less the summary's
    share when summarising, so any summary of the dropped ones fits beside what is kept):
    the oldest go first; the newest is kept, cut if it alone is too large. An exchange
    already recorded (a redelivery) changes nothing."""
    if history.has(exchange.event):
        return history, ()
    budget = policy.max_bytes - summary_budget(policy)
    summary = history.summary if policy.overflow == "summarize" else None
    turns = [*history.turns, exchange]
    dropped: list[Exchange] = []
    while len(turns) > policy.max_turns:
        dropped.append(turns.pop(0))
    while len(turns) > 1 and len(SessionHistory(turns=tuple(turns)).encoded()) > budget:
        dropped.append(turns.pop(0))
    turns[-1] = _shrunk(turns[-1], budget, None)
    return SessionHistory(summary=summary, turns=tuple(turns)), tuple(dropped)


def summarised(history: SessionHistory, summary: str, policy: SessionPolicy) -> SessionHistory:
    """``history`` with ``summary`` (bounded) as its note on what came before."""
    return history.model_copy(update={"summary": bounded_summary(summary, policy) or None})


class Slot(BaseModel):
    """One message of a session being handled (the first) or waiting for its turn."""

    model_config = ConfigDict(frozen=True)

    event: str = Field(max_length=64)
    """The message's ``event_marker``."""
    expires: float
    """Epoch seconds; its replica renews it while it runs or waits."""
    stop: StopMark | None = None
    """A newer message asked it to stop (``interrupt`` or ``rollback``)."""


class SessionQueue(BaseModel):
    """The in-flight marker of one session, shared by every replica."""

    model_config = ConfigDict(frozen=True)

    slots: tuple[Slot, ...] = ()

    def live(self, now: float, own: str | None = None) -> SessionQueue:
        """Without the slots whose replica stopped renewing them (crashed); ``own`` stays."""
        return SessionQueue(slots=tuple(s for s in self.slots if s.expires > now or s.event == own))

    def slot(self, event: str) -> Slot | None:
        return next((slot for slot in self.slots if slot.event == event), None)

    def first(self, event: str) -> bool:
        return bool(self.slots) and self.slots[0].event == event

    def without(self, event: str) -> SessionQueue:
        return SessionQueue(slots=tuple(s for s in self.slots if s.event != event))

    def renewed(self, event: str, expires: float) -> SessionQueue:
        return SessionQueue(
            slots=tuple(
                s.model_copy(update={"expires": expires}) if s.event == event else s
                for s in self.slots
            )
        )


class SessionBusy(Exception):
    """A message of a session that is running elsewhere, under ``doubleTexting: reject``."""


def admit(
    queue: SessionQueue, event: str, now: float, lease: float, policy: DoubleTexting
) -> SessionQueue:
    """The queue once ``event`` arrives (pure); ``SessionBusy`` when the policy refuses it.

    Expired slots are dropped first. A message already queued (a redelivery) keeps its place
    and renews it; into an empty queue it goes first; otherwise ``reject`` refuses it, and the
    others append it, ``interrupt`` and ``rollback`` marking the running message (the first)
    to stop at its next turn boundary."""
    live = queue.live(now, own=event)
    if live.slot(event) is not None:
        return live.renewed(event, now + lease)
    mine = Slot(event=event, expires=now + lease)
    if not live.slots:
        return SessionQueue(slots=(mine,))
    if policy == "reject":
        raise SessionBusy(
            "another message of this session is running (spec.llm.session.doubleTexting: "
            "reject); send it again once that one is answered"
        )
    slots = list(live.slots)
    if policy in ("interrupt", "rollback") and slots[0].stop is None:
        slots[0] = slots[0].model_copy(update={"stop": policy})
    return SessionQueue(slots=(*slots, mine))


class SessionStopped(Exception):
    """The running message was stopped by a newer one of its session; its reason is the dead
    letter's: ``session-rolled-back`` (its turns discarded) or ``session-interrupted`` (an
    interrupted message whose contract wants structured output, which no partial answer is)."""

    def __init__(self, reason: DeadLetterReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


ROLLED_BACK = (
    "a newer message of this session rolled this one back (spec.llm.session.doubleTexting: "
    "rollback); its turns are not kept"
)
INTERRUPTED_STRUCTURED = (
    "a newer message of this session interrupted this one (spec.llm.session.doubleTexting: "
    "interrupt), and its contract's outputSchema admits no partial answer"
)
