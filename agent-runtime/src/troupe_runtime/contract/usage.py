"""Token usage: what one completion cost, and how outputs carry it as CloudEvent extensions.

An LLM agent's outputs and reply carry the message's totals as extension attributes, so the
workflow engine adds them to the run without reading the agent's logs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import Field

from troupe_runtime.contract.policies import WireModel

TOKENS_IN_ATTRIBUTE = "troupetokensin"
TOKENS_OUT_ATTRIBUTE = "troupetokensout"
COST_ATTRIBUTE = "troupecostusd"
"""Dollars as a decimal string (CloudEvents has no float type)."""
MAX_TOKENS_ATTRIBUTE = 2**31 - 1
"""The CloudEvents integer range: a count above it did not come from a Troupe agent."""
MAX_COST_ATTRIBUTE = 1e9
"""Dollars one message may claim; far above any real bill, far below where sums overflow."""
MAX_COST_TEXT = 64


class Usage(WireModel):
    """Tokens and dollars; ``estimated`` when a provider sent no usage and Troupe counted."""

    tokens_in: int = Field(default=0, ge=0)
    tokens_out: int = Field(default=0, ge=0)
    cost_usd: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    estimated: bool = False

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            tokens_in=self.tokens_in + other.tokens_in,
            tokens_out=self.tokens_out + other.tokens_out,
            cost_usd=self.cost_usd + other.cost_usd,
            estimated=self.estimated or other.estimated,
        )

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out

    def attributes(self) -> dict[str, Any]:
        """The CloudEvent extension attributes carrying this usage."""
        return {
            TOKENS_IN_ATTRIBUTE: self.tokens_in,
            TOKENS_OUT_ATTRIBUTE: self.tokens_out,
            COST_ATTRIBUTE: f"{self.cost_usd:.9f}",
        }

    @classmethod
    def from_attributes(cls, attributes: Mapping[str, Any]) -> Usage | None:
        """The usage an event carries; None when it carries none or it is not well formed.

        Anyone may publish a reply, so a value out of range (negative, past
        ``MAX_TOKENS_ATTRIBUTE`` or ``MAX_COST_ATTRIBUTE``, not finite) makes it None too:
        what the engine adds up must stay a number JSON can carry."""
        if TOKENS_IN_ATTRIBUTE not in attributes and TOKENS_OUT_ATTRIBUTE not in attributes:
            return None
        tokens_in = _count(attributes.get(TOKENS_IN_ATTRIBUTE, 0))
        tokens_out = _count(attributes.get(TOKENS_OUT_ATTRIBUTE, 0))
        cost = _dollars(attributes.get(COST_ATTRIBUTE, 0))
        if tokens_in is None or tokens_out is None or cost is None:
            return None
        return cls(tokens_in=tokens_in, tokens_out=tokens_out, cost_usd=cost)


def _count(value: Any) -> int | None:
    """A token count from an integer attribute, or from its decimal text (binary mode)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    text = value.strip() if isinstance(value, str) else str(value)
    if not (text.isascii() and text.isdecimal()) or len(text) > len(str(MAX_TOKENS_ATTRIBUTE)):
        return None
    count = int(text)
    return count if count <= MAX_TOKENS_ATTRIBUTE else None


def _dollars(value: Any) -> float | None:
    """Dollars from a decimal string (or a number); None unless finite and in range."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    if isinstance(value, str) and (len(value) > MAX_COST_TEXT or not value.isascii()):
        return None
    try:
        dollars = float(value or 0)
    except ValueError:
        return None
    return dollars if math.isfinite(dollars) and 0 <= dollars <= MAX_COST_ATTRIBUTE else None
