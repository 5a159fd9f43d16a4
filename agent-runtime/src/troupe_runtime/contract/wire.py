"""What the NATS wire allows a publish to carry, decided before anything is sent.

The server counts a message's header block together with its payload against
``max_payload`` and answers an oversized publish by closing the connection;
nats-py checks the payload alone. So every publish is sized here, headers
included, exactly as nats-py encodes them: ``NATS/1.0``, CRLF, one
``key: value`` line per header (both trimmed, CR and LF in a value turned
into spaces, empty keys skipped), and a closing CRLF.
"""

from __future__ import annotations

from collections.abc import Mapping

HEADER_STATUS_LINE = b"NATS/1.0\r\n"
CRLF = b"\r\n"
HEADER_SEPARATOR = b": "
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})


def header_block_size(headers: Mapping[str, str] | None) -> int:
    """Bytes the header block takes on the wire; 0 without headers."""
    if headers is None:
        return 0
    size = len(HEADER_STATUS_LINE) + len(CRLF)
    for key, value in headers.items():
        name = key.strip()
        if not name:
            continue
        line = value.strip().translate(_NEWLINES)
        size += utf8_size(name) + len(HEADER_SEPARATOR) + utf8_size(line) + len(CRLF)
    return size


def utf8_size(text: str) -> int:
    """UTF-8 size of ``text``; a lone surrogate (from hostile input) counts as its 3 bytes."""
    return len(text.encode("utf-8", "surrogatepass"))


def message_size(payload: bytes, headers: Mapping[str, str] | None) -> int:
    """What the server compares with ``max_payload``: payload and header block together."""
    return len(payload) + header_block_size(headers)


def oversize_reason(
    what: str, subject: str, payload: bytes, headers: Mapping[str, str] | None, max_payload: int
) -> str | None:
    """Why ``payload`` with ``headers`` cannot be published to ``subject``, or None if it fits."""
    headers_size = header_block_size(headers)
    size = len(payload) + headers_size
    if size <= max_payload:
        return None
    return (
        f"{what} to {subject!r} is {size} bytes with its headers (payload {len(payload)}, "
        f"headers {headers_size}), over the server's max_payload of {max_payload} bytes; "
        "publish less data (or raise max_payload on the NATS server)"
    )
