"""MAX_DELIVERIES advisories: which ones to believe, decided from the consumer's own state.

Anyone who may publish on an agent's advisory subject can forge one, so an
advisory is only a hint naming a message. ``parse`` refuses what is not a
well-formed advisory about one of the agent's own consumers (the rescuer acks
and logs it). ``judge`` then rescues the message only when the consumer's
state proves the server gave up on it: it is still stored (a handled message
leaves the work queue), on the consumer's subject, the claimed deliveries
reach the consumer's ``max_deliver``, and it is not pending an
acknowledgement. JetStream reports no per-message pending state, so "not
pending" is proved one of two ways: the message lies at or below the ack
floor (every pending message lies above it), or nothing at all is pending.
Otherwise the verdict is to look again later: a forged advisory for a message
in flight never moves it, and a genuine one waits until the consumer's state
proves it (the server holds the ack floor below a message it gave up on, so
under unbroken load that is the first moment nothing is in flight).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum

from troupe_runtime.contract import naming

ADVISORY_TYPE = "io.nats.jetstream.advisory.v1.max_deliver"
# A genuine advisory is about 250 bytes; the advisory stream refuses larger messages.
MAX_ADVISORY_BYTES = 2048


@dataclass(frozen=True)
class Advisory:
    """What a well-formed advisory claims: message ``sequence`` of ``stream`` was
    delivered ``deliveries`` times by ``consumer`` without an acknowledgement."""

    stream: str
    consumer: str
    sequence: int
    deliveries: int


@dataclass(frozen=True)
class ConsumerState:
    """The facts ``judge`` needs, from the server's consumer info."""

    filter_subject: str | None
    max_deliver: int
    delivered_stream_seq: int
    ack_floor_stream_seq: int
    ack_pending: int
    filter_subjects: tuple[str, ...] = ()
    """A consumer of several subjects (an LLM agent's priority 0 and approvals)."""

    def filters(self) -> set[str]:
        """Every subject the consumer reads; empty: any."""
        return {s for s in (self.filter_subject, *self.filter_subjects) if s is not None}


class Verdict(StrEnum):
    RESCUE = "rescue"  # dead-letter the message and delete it from the inbox
    DEFER = "defer"  # not proved yet: look again later
    DROP = "drop"  # nothing to do (handled already, or forged): ack the advisory


class Junk(ValueError):
    """Not an advisory the rescuer acts on; the message says why."""


def _positive_int(body: dict[str, object], field: str) -> int:
    value = body.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise Junk(f"field {field!r} is {value!r}, not a positive integer")
    return value


def parse(subject: str, data: bytes, stream: str, consumers: Collection[str]) -> Advisory:
    """The advisory in ``data``, received on ``subject``, about one of ``consumers`` of
    ``stream``; ``Junk`` for anything else."""
    if len(data) > MAX_ADVISORY_BYTES:
        raise Junk(f"{len(data)} bytes, over the {MAX_ADVISORY_BYTES} an advisory takes")
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as error:
        raise Junk(f"not JSON ({type(error).__name__})") from None
    if not isinstance(body, dict):
        raise Junk(f"JSON {type(body).__name__}, not an object")
    if body.get("type") != ADVISORY_TYPE:
        raise Junk(f"type {body.get('type')!r}, not {ADVISORY_TYPE!r}")
    if body.get("stream") != stream:
        raise Junk(f"stream {body.get('stream')!r}, not this agent's {stream!r}")
    consumer = body.get("consumer")
    if not isinstance(consumer, str) or consumer not in consumers:
        raise Junk(f"consumer {consumer!r} is not one of this agent's {sorted(consumers)}")
    if subject != naming.max_deliveries_advisory(stream, consumer):
        raise Junk(f"subject {subject!r} does not match consumer {consumer!r}")
    return Advisory(
        stream, consumer, _positive_int(body, "stream_seq"), _positive_int(body, "deliveries")
    )


def judge(
    advisory: Advisory, state: ConsumerState, stored_subject: str | None
) -> tuple[Verdict, str]:
    """What to do about ``advisory``; ``stored_subject`` is the message's subject, None
    when the inbox no longer holds it. The text says why, for the log."""
    seq, consumer = advisory.sequence, advisory.consumer
    if stored_subject is None:
        return Verdict.DROP, f"message {seq} is no longer in the inbox (handled or rescued)"
    if (filters := state.filters()) and stored_subject not in filters:
        return Verdict.DROP, (
            f"forged: message {seq} is on {stored_subject!r}, not consumer {consumer}'s "
            f"{' or '.join(repr(f) for f in sorted(filters))}"
        )
    if state.max_deliver < 1 or advisory.deliveries < state.max_deliver:
        return Verdict.DROP, (
            f"forged: it claims {advisory.deliveries} deliveries of message {seq}; consumer "
            f"{consumer} gives up only after {state.max_deliver}"
        )
    if seq > state.delivered_stream_seq:
        return Verdict.DROP, (
            f"forged: consumer {consumer} has delivered only up to message "
            f"{state.delivered_stream_seq}, not {seq}"
        )
    if seq <= state.ack_floor_stream_seq or state.ack_pending == 0:
        return Verdict.RESCUE, f"message {seq} was delivered {advisory.deliveries} times"
    return Verdict.DEFER, (
        f"message {seq} may still be in flight: consumer {consumer} has "
        f"{state.ack_pending} pending above its ack floor {state.ack_floor_stream_seq}"
    )
