"""The limits of the message boundary: what one input may weigh, and why each value.

``envelope.parse`` checks every input against ``Limits`` before it decodes a
byte of it, and refuses what breaks one with ``MalformedMessage`` naming the
limit and the size, so the message is dead-lettered at once instead of being
retried. The values:

- ``payload_bytes``, 1 MiB: the NATS server's default ``max_payload``. A larger
  payload cannot come from a server left at its default, and nothing the agent
  derived from it (an echo, a transformation) could be published to one.
- ``header_bytes``, 16 KiB for all headers of one message, on the wire. Headers
  count against ``max_payload`` too, and an output carries copies of its
  input's ids (``causationid``, ``correlationid``): a bound on the input keeps
  every output, reply and dead letter small enough to publish. 16 KiB is the
  size many HTTP servers accept for a request's headers, which binary-mode
  CloudEvents share with NATS.
- ``header_value_bytes``, 4 KiB for one header value. CloudEvents attributes are
  identifiers, URIs, types and timestamps; 4 KiB holds any sensible one many
  times over, and naming the one header that is too long is the precise reason
  a sender needs.
- ``json_depth``, 64 levels of nested arrays and objects. Agents exchange
  records, not trees thousands deep; 64 is far beyond any real payload and far
  below the depth at which decoding, schema validation (several Python frames
  per level) or encoding would hit Python's recursion limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from troupe_runtime.contract import wire

MAX_PAYLOAD_BYTES = 1024 * 1024
MAX_HEADER_BYTES = 16 * 1024
MAX_HEADER_VALUE_BYTES = 4 * 1024
MAX_JSON_DEPTH = 64


@dataclass(frozen=True)
class Limits:
    """What one input may weigh; the defaults are the module's constants."""

    payload_bytes: int = MAX_PAYLOAD_BYTES
    header_bytes: int = MAX_HEADER_BYTES
    header_value_bytes: int = MAX_HEADER_VALUE_BYTES
    json_depth: int = MAX_JSON_DEPTH


DEFAULT_LIMITS = Limits()


def oversize(headers: Mapping[str, str], payload: bytes, limits: Limits) -> str | None:
    """Why a message is too large to be read, or None when it is within ``limits``."""
    if len(payload) > limits.payload_bytes:
        return (
            f"payload is {len(payload)} bytes, over the limit of {limits.payload_bytes} bytes; "
            "send less data per message"
        )
    for key, value in headers.items():
        size = wire.utf8_size(value)
        if size > limits.header_value_bytes:
            return (
                f"header {key} is {size} bytes, over the limit of "
                f"{limits.header_value_bytes} bytes for one header value"
            )
    total = wire.header_block_size(headers)
    if total > limits.header_bytes:
        return (
            f"headers are {total} bytes, over the limit of {limits.header_bytes} bytes "
            "for all headers of a message"
        )
    return None
