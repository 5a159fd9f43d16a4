"""Chaos in an LLM agent's model and tool calls: each fault as the failure it stands for.

- A model call (``model_fault``, from the router, per model of the chain): the latency is
  part of the call's time limit, as a slow provider's would be, so latency past the limit is
  a ``ModelTimeout``; an error is ``ModelUnavailable`` (a 5xx, in effect), so the breaker
  counts it, the chain falls back to its next model, and an exhausted chain is retried
  like any unavailable model.
- A tool call (``ChaoticToolBox``): the latency comes before the tool runs; an error is the
  error result the model reads (``is_error``), and the tool does not run: the model's own
  handling of a failed tool is what the experiment looks at.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from troupe_runtime.agent.chaos import Chaos
from troupe_runtime.agent.llm.client import ModelTimeout
from troupe_runtime.agent.llm.types import (
    ModelUnavailable,
    ToolBox,
    ToolCall,
    ToolResult,
    ToolSpec,
)


class InjectedModelError(ModelUnavailable):
    """A model call chaos failed: taken as the provider's 5xx."""


async def model_fault(chaos: Chaos, where: str, time_limit: float) -> float:
    """The injected latency and error of one model call; the time left for the call.

    Raises ``InjectedModelError`` (or ``ModelTimeout`` when the latency outlasts
    ``time_limit``). Costs one attribute check when nothing is in force."""
    if not chaos.armed:
        return time_limit
    roll = chaos.roll("model")
    delay = roll.delay.total_seconds()
    if delay >= time_limit > 0:
        await chaos.sleep(time_limit)
        raise ModelTimeout(f"{where}: no answer within {time_limit:g}s ({chaos.reason('model')})")
    if delay > 0:
        await chaos.sleep(delay)
    if roll.fail:
        raise InjectedModelError(f"{where}: {chaos.reason('model')}")
    return time_limit - delay


class ChaoticToolBox:
    """A ``ToolBox`` whose calls pass the tool faults in force first."""

    def __init__(self, inner: ToolBox, chaos: Chaos) -> None:
        self._inner = inner
        self._chaos = chaos

    async def specs(self) -> list[ToolSpec]:
        return await self._inner.specs()

    async def call(self, call: ToolCall, arguments: dict[str, Any]) -> ToolResult:
        chaos = self._chaos
        if chaos.armed:
            roll = chaos.roll("tools")
            if roll.delay > timedelta(0):
                await chaos.sleep(roll.delay.total_seconds())
            if roll.fail:
                return ToolResult(
                    f"error: the tool {call.name!r} failed: {chaos.reason('tools')}", True
                )
        return await self._inner.call(call, arguments)

    async def aclose(self) -> None:
        await self._inner.aclose()
