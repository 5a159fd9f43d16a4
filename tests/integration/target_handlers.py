"""Handlers the target and health tests load by ``module:function`` in a runtime process."""

from __future__ import annotations

from typing import Any

from troupe_runtime.agent.context import Context


async def fill_to(ctx: Context) -> Any:
    """An output whose JSON payload is ``data["outputBytes"]`` bytes: a string of that size."""
    return "z" * (int(ctx.event.data["outputBytes"]) - 2)
