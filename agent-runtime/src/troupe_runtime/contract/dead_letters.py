"""The dead-letter contract: the headers a dead letter carries and the reasons it names.

The agent writes them, the workflow engine writes its own, and the CLI reads
both; a dead letter keeps the original payload and CloudEvent headers, so it
can be replayed as it was. Its ``Nats-Msg-Id`` is derived from the original
stream sequence: a message dead-lettered twice is stored once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from nats.js.api import Header

REASON_HEADER = "Troupe-Dead-Letter-Reason"
ERROR_HEADER = "Troupe-Error"
ATTEMPTS_HEADER = "Troupe-Attempts"
AGENT_HEADER = "Troupe-Agent"
SUBJECT_HEADER = "Troupe-Original-Subject"
STREAM_HEADER = "Troupe-Original-Stream"
SEQUENCE_HEADER = "Troupe-Original-Sequence"
MAX_ERROR_LENGTH = 1000


class DeadLetterReason(StrEnum):
    MALFORMED = "malformed"
    INVALID_INPUT = "invalid-input"
    INVALID_OUTPUT = "invalid-output"
    UNDELIVERABLE = "undeliverable"
    EXPIRED = "expired"
    REJECTED = "rejected"
    EXHAUSTED = "exhausted"
    MAX_DELIVERIES = "max-deliveries"


@dataclass(frozen=True)
class Origin:
    """Where a message was stored before it was dead-lettered."""

    subject: str
    stream: str
    sequence: int


def header_safe(text: str) -> str:
    """NATS header values are single lines; long errors are cut."""
    return re.sub(r"\s+", " ", text).strip()[:MAX_ERROR_LENGTH]


def dead_letter_headers(
    original: dict[str, str] | None,
    *,
    reason: DeadLetterReason,
    error: str,
    attempts: int,
    agent: str,
    origin: Origin,
) -> dict[str, str]:
    kept = {
        key: value
        for key, value in (original or {}).items()
        if not key.lower().startswith("nats-") and key != Header.STATUS.value
    }
    return {
        **kept,
        REASON_HEADER: reason.value,
        ERROR_HEADER: header_safe(error) or reason.value,
        ATTEMPTS_HEADER: str(attempts),
        AGENT_HEADER: agent,
        SUBJECT_HEADER: origin.subject,
        STREAM_HEADER: origin.stream,
        SEQUENCE_HEADER: str(origin.sequence),
        Header.MSG_ID.value: f"dlq:{origin.stream}:{origin.sequence}",
    }
