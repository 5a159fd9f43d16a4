"""Kubernetes-style durations (``500ms``, ``30s``, ``5m``, ``1h30m``) as pydantic types.

Manifests carry durations as strings, the way Kubernetes and NATS users write them; the
models work with ``timedelta``. The CRD validates the same strings with the same pattern and
with CEL's ``duration()``, which is Go's ``time.ParseDuration``; the parse below computes the
value exactly as Go does (integer nanoseconds), so the API server and the models refuse the
same strings:

- the resolution is a millisecond: ``ms`` takes no fraction, ``s`` up to 3 decimals, ``m``
  up to 4 and ``h`` up to 5, so every value is a whole number of milliseconds and prints back
  unchanged;
- NATS carries durations as int64 nanoseconds, so nothing above ``MAX_DURATION`` (about 292
  years) is accepted, and Go's parser refuses it too;
- ``Duration`` is positive (a zero timeout, ackWait, deadline or retention makes no sense, and
  NATS reads a zero retention as "forever"); ``Delay`` may be zero (retry at once).
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

DURATION_PATTERN = (
    r"^([0-9]+ms|[0-9]+(\.[0-9]{1,3})?s|[0-9]+(\.[0-9]{1,4})?m|[0-9]+(\.[0-9]{1,5})?h)+$"
)
DURATION_MAX_LENGTH = 64
MAX_NANOSECONDS = 2**63 - 1
"""The largest duration NATS (and Go) can represent, in nanoseconds."""
MAX_DURATION = timedelta(milliseconds=MAX_NANOSECONDS // 1_000_000)
"""The largest duration a manifest may carry at millisecond resolution: 2562047h47m16.854s."""
_PART = re.compile(r"([0-9]+)(?:\.([0-9]+))?(ms|s|m|h)")
_UNIT_NANOSECONDS = {"ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}
_NANOSECONDS_PER_MILLISECOND = 10**6

CEL_KEY = "x-kubernetes-validations"
"""Where the CRD keeps CEL rules (``troupe_operator.api.common`` attaches its own there)."""


def nanoseconds(text: str) -> int:
    """The exact value of a duration string, as Go's ``time.ParseDuration`` computes it."""
    if (
        not isinstance(text, str)
        or len(text) > DURATION_MAX_LENGTH
        or not re.fullmatch(DURATION_PATTERN, text)
    ):
        raise ValueError(f"{text!r} is not a duration such as 500ms, 30s, 1.5m or 1h30m")
    total = 0
    for whole, fraction, unit in _PART.findall(text):
        size = _UNIT_NANOSECONDS[unit]
        total += int(whole) * size
        if fraction:
            total += int(fraction) * size // 10 ** len(fraction)
    return total


def _checked(value: timedelta, minimum: timedelta) -> timedelta:
    if value % timedelta(milliseconds=1):
        raise ValueError(f"{value} is not a whole number of milliseconds")
    if not minimum <= value <= MAX_DURATION:
        raise ValueError(POSITIVE_MESSAGE if minimum else NON_NEGATIVE_MESSAGE)
    return value


def parse_duration(value: Any, minimum: timedelta = timedelta(milliseconds=1)) -> timedelta:
    """Parse ``1h30m``-style text (or take a timedelta or seconds) at least ``minimum`` long."""
    if isinstance(value, timedelta):
        return _checked(value, minimum)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _checked(timedelta(seconds=value), minimum)
    total = nanoseconds(value)
    if total > MAX_NANOSECONDS:
        raise ValueError(POSITIVE_MESSAGE if minimum else NON_NEGATIVE_MESSAGE)
    return _checked(timedelta(milliseconds=total // _NANOSECONDS_PER_MILLISECOND), minimum)


def parse_delay(value: Any) -> timedelta:
    """Like ``parse_duration``, but zero is allowed."""
    return parse_duration(value, minimum=timedelta())


def format_duration(value: timedelta) -> str:
    """The shortest exact text for ``value``, such as ``90s`` or ``250ms``."""
    milliseconds = round(value.total_seconds() * 1000)
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if milliseconds and milliseconds % size == 0:
            return f"{milliseconds // size}{unit}"
    return f"{milliseconds}ms"


MAX_DURATION_TEXT = "2562047h47m16.854s"
"""``MAX_DURATION`` as people write it."""
POSITIVE_MESSAGE = f"must be a duration greater than 0 and at most {MAX_DURATION_TEXT}"
NON_NEGATIVE_MESSAGE = f"must be a duration of at most {MAX_DURATION_TEXT}"


def cel_matches(field: str) -> str:
    """A CEL test that ``field`` is duration text; guard ``duration(field)`` with it."""
    return f"{field}.matches(r'{DURATION_PATTERN}')"


def _schema(positive: bool) -> dict[str, Any]:
    # duration() fails on what Go cannot represent; the rule's message then says why. Text
    # the pattern refuses is left to the pattern: converting it would be an evaluation error,
    # which the API server never ratchets, so an object stored under an older, looser CRD
    # could not even lose its finalizer.
    guard = f"!{cel_matches('self')} || "
    rule = (
        {"rule": guard + "duration(self) > duration('0s')", "message": POSITIVE_MESSAGE}
        if positive
        else {"rule": guard + "duration(self) >= duration('0s')", "message": NON_NEGATIVE_MESSAGE}
    )
    return {
        "type": "string",
        "pattern": DURATION_PATTERN,
        "maxLength": DURATION_MAX_LENGTH,
        CEL_KEY: [rule],
    }


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(_schema(positive=True)),
]
"""A positive duration: timeouts, ackWait, deadlines, retention."""

Delay = Annotated[
    timedelta,
    BeforeValidator(parse_delay),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(_schema(positive=False)),
]
"""A duration that may be zero: a retry's backoff (``0s`` retries at once)."""
