"""The one place state values and event data become bytes and back: compact JSON."""

from __future__ import annotations

import json
from typing import Any

from troupe_runtime.contract.state_errors import InvalidValueError


def encode(value: Any) -> bytes:
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise InvalidValueError(f"state values must be JSON: {err}") from err
    return text.encode()


def decode(data: bytes | None, where: str) -> Any:
    """Decode the JSON at ``where`` (bucket/key or log/seq), for the error message."""
    try:
        return json.loads(data or b"null")
    except (ValueError, RecursionError) as err:
        raise InvalidValueError(f"{where} does not hold JSON: {err}") from err
