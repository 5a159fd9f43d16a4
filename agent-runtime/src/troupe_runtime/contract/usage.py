"""Token usage: what one completion cost, and how outputs carry it as CloudEvent extensions.

An LLM agent's outputs and reply carry the message's totals as extension attributes, so the
workflow engine adds them to the run without reading the agent's logs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field

from troupe_runtime.contract.policies import WireModel

TOKENS_IN_ATTRIBUTE = "troupetokensin"
TOKENS_OUT_ATTRIBUTE = "troupetokensout"
COST_ATTRIBUTE = "troupecostusd"
"""Dollars as a decimal string (CloudEvents has no float type)."""


class Usage(WireModel):
    """Tokens and dollars; ``estimated`` when a provider sent no usage and Troupe counted."""

    tokens_in: int = Field(default=0, ge=0)
    tokens_out: int = Field(default=0, ge=0)
    cost_usd: float = Field(default=0.0, ge=0)
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
        """The usage an event carries; None when it carries none or it is not well formed."""
        if TOKENS_IN_ATTRIBUTE not in attributes and TOKENS_OUT_ATTRIBUTE not in attributes:
            return None
        try:
            return cls(
                tokens_in=int(attributes.get(TOKENS_IN_ATTRIBUTE, 0)),
                tokens_out=int(attributes.get(TOKENS_OUT_ATTRIBUTE, 0)),
                cost_usd=float(attributes.get(COST_ATTRIBUTE, 0) or 0),
            )
        except (TypeError, ValueError):
            return None
