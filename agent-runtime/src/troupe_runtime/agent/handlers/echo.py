"""The ``echo`` handler: publishes the input's data unchanged."""

from __future__ import annotations

from typing import Any

from troupe_runtime.agent.context import Context


async def echo(ctx: Context) -> Any:
    return ctx.event.data
