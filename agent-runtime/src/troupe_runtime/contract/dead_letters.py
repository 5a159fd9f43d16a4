"""The dead-letter contract: the headers a dead letter carries and the reasons it names.

The agent writes them, the workflow engine writes its own, and the CLI reads
both; a dead letter keeps the original payload and CloudEvent headers, so it
can be replayed as it was.

Its ``Nats-Msg-Id`` is first ``dlq:<stream>:<sequence>``: a message
dead-lettered twice (by a replica and by the MAX_DELIVERIES rescuer, say) is
stored once. That id is predictable, so a sender could publish a forged letter
under it first and JetStream would drop the real one as a duplicate. The
writer therefore reads the letter a duplicate ack points at and keeps it only
if it is ``equivalent`` (same payload, same original message and headers);
otherwise it publishes again under ``letter_id(origin, nonce)``, with a random
nonce no sender can know in advance. Deduplication between honest writers
still holds, since they write equivalent letters; a forger who pre-empts with
an equivalent letter has stored the real message, so nothing is lost.

A letter must also fit the server's ``max_payload`` with its headers, or the
server drops the connection: ``fitted`` sheds what matters least (long
original headers, then the payload, marked by ``DROPPED_HEADER``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from email.header import Header as EmailHeader
from email.header import decode_header
from enum import StrEnum

from nats.js.api import Header

from troupe_runtime.contract.wire import message_size

REASON_HEADER = "Troupe-Dead-Letter-Reason"
ERROR_HEADER = "Troupe-Error"
ATTEMPTS_HEADER = "Troupe-Attempts"
AGENT_HEADER = "Troupe-Agent"
SUBJECT_HEADER = "Troupe-Original-Subject"
STREAM_HEADER = "Troupe-Original-Stream"
SEQUENCE_HEADER = "Troupe-Original-Sequence"
DROPPED_HEADER = "Troupe-Dead-Letter-Dropped"
MAX_ERROR_LENGTH = 1000
SHORT_ERROR_LENGTH = 200
# Original headers longer than this go first when a letter does not fit.
LONG_HEADER_BYTES = 256
# The headers two honest writers of one message's letter may set differently.
_WRITER_HEADERS = frozenset({REASON_HEADER, ERROR_HEADER, ATTEMPTS_HEADER, DROPPED_HEADER})
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})


class DeadLetterReason(StrEnum):
    """Why a message was dead-lettered; kebab-case like the rest, on the wire and in metrics.

    ``rejected`` covers both a non-retryable error state and a model that refused the
    request (400, 401, 403, 404, 413, context length): either way the same input fails
    again, and the error names which. ``rate-limited``: an LLM agent's message deferred
    more often than ``MAX_DEFERRALS`` by 429s. ``budget-exceeded``: a hard limit of a
    Budget refused a model call (``contract.budget.BudgetExceeded``); no retry helps
    before the window turns. ``session-busy``: a message of a session that was running
    elsewhere, under ``doubleTexting: reject``; ``session-rolled-back``: a running message a
    newer one of its session stopped under ``rollback`` (its turns discarded);
    ``session-interrupted``: one stopped under ``interrupt`` whose contract wants structured
    output, which no partial answer is.
    """

    MALFORMED = "malformed"
    INVALID_INPUT = "invalid-input"
    INVALID_OUTPUT = "invalid-output"
    UNDELIVERABLE = "undeliverable"
    EXPIRED = "expired"
    REJECTED = "rejected"
    EXHAUSTED = "exhausted"
    MAX_DELIVERIES = "max-deliveries"
    RATE_LIMITED = "rate-limited"
    BUDGET_EXCEEDED = "budget-exceeded"
    SESSION_BUSY = "session-busy"
    SESSION_ROLLED_BACK = "session-rolled-back"
    SESSION_INTERRUPTED = "session-interrupted"


@dataclass(frozen=True)
class Origin:
    """Where a message was stored before it was dead-lettered."""

    subject: str
    stream: str
    sequence: int


def header_safe(text: str) -> str:
    """NATS header values are single lines; long errors are cut."""
    return re.sub(r"\s+", " ", text).strip()[:MAX_ERROR_LENGTH]


def header_text(value: object) -> str:
    """A header value as nats-py reads and writes it: one trimmed line of text.

    nats-py parses stored messages with ``email``'s parser, which hands back a
    value with non-ASCII bytes as an ``email.header.Header``; its bytes are
    decoded as UTF-8 here (invalid bytes replaced), so every value is a ``str``
    that encodes again.
    """
    if isinstance(value, EmailHeader):
        text = "".join(
            part.decode("utf-8", "replace") if isinstance(part, bytes) else part
            for part, _ in decode_header(value)
        )
    else:
        text = str(value)
    text = text.encode("utf-8", "replace").decode("utf-8")  # no lone surrogates
    return text.translate(_NEWLINES).strip()


def header_map(headers: Mapping[str, object] | None) -> dict[str, str]:
    """Any parsed headers as plain ``str`` to ``str``, each value as ``header_text``."""
    return {
        header_text(key): header_text(value)
        for key, value in (headers or {}).items()
        if header_text(key)
    }


def letter_id(origin: Origin, nonce: str | None = None) -> str:
    """The letter's ``Nats-Msg-Id``; with a ``nonce`` when the plain one was pre-empted."""
    plain = f"dlq:{origin.stream}:{origin.sequence}"
    return plain if nonce is None else f"{plain}:{nonce}"


def dead_letter_headers(
    original: Mapping[str, object] | None,
    *,
    reason: DeadLetterReason,
    error: str,
    attempts: int,
    agent: str,
    origin: Origin,
) -> dict[str, str]:
    kept = {
        key: value
        for key, value in header_map(original).items()
        if not key.lower().startswith("nats-")
        and key != Header.STATUS.value
        and not key.lower().startswith("troupe-")
    }
    return {
        **kept,
        REASON_HEADER: reason.value,
        ERROR_HEADER: header_text(header_safe(error)) or reason.value,
        ATTEMPTS_HEADER: str(attempts),
        AGENT_HEADER: header_text(agent),
        SUBJECT_HEADER: header_text(origin.subject),
        STREAM_HEADER: origin.stream,
        SEQUENCE_HEADER: str(origin.sequence),
        Header.MSG_ID.value: letter_id(origin),
    }


def _identity(headers: Mapping[str, object] | None) -> dict[str, str]:
    return {
        key: value
        for key, value in header_map(headers).items()
        if key not in _WRITER_HEADERS and not key.lower().startswith("nats-")
    }


def equivalent(
    ours: Mapping[str, str],
    payload: bytes,
    stored: Mapping[str, object] | None,
    stored_payload: bytes,
) -> bool:
    """Whether a stored letter is ours as another honest writer would have written it:
    the same payload, original message and headers (reason, error and attempts aside)."""
    return (
        stored_payload == payload
        and DROPPED_HEADER not in header_map(stored)
        and _identity(stored) == _identity(ours)
    )


def fitted(
    headers: dict[str, str], payload: bytes, max_payload: int
) -> tuple[dict[str, str], bytes]:
    """The letter as it fits under ``max_payload`` (headers included), shedding in order:
    long original headers, the payload, every original header; each shedding is named
    in ``DROPPED_HEADER`` so the letter says what it lost (and is not replayed as is)."""
    if message_size(payload, headers) <= max_payload:
        return headers, payload
    troupe = {k: v for k, v in headers.items() if k.startswith("Troupe-") or k.startswith("Nats-")}
    troupe[ERROR_HEADER] = headers.get(ERROR_HEADER, "")[:SHORT_ERROR_LENGTH]
    short = {
        k: v
        for k, v in headers.items()
        if k not in troupe and len(k) + len(v.encode()) <= LONG_HEADER_BYTES
    }
    long_dropped = len(headers) - len(troupe) - len(short)
    candidates = [
        (
            {**short, **troupe},
            payload,
            f"{long_dropped} original headers over {LONG_HEADER_BYTES} bytes",
        ),
        ({**short, **troupe}, b"", f"the payload of {len(payload)} bytes"),
        (dict(troupe), b"", f"the payload of {len(payload)} bytes and every original header"),
    ]
    for kept, data, what in candidates:
        letter = {**kept, DROPPED_HEADER: f"{what}: the letter did not fit max_payload"}
        if message_size(data, letter) <= max_payload:
            return letter, data
    return {**candidates[-1][0], DROPPED_HEADER: candidates[-1][2]}, b""
