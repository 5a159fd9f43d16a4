"""Handlers that misbehave on purpose, loaded by ``module:function`` in the runtime's tests.

Each does what its input says: ``"exit"`` calls ``sys.exit``, ``"interrupt"``
raises ``KeyboardInterrupt``, ``"cancel"`` raises ``CancelledError``,
``"block"`` blocks its thread for good; anything else is echoed, upper-cased.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any

from troupe_runtime.agent.context import Context

_NEVER = threading.Event()


def _misbehave(ctx: Context) -> Any:
    match ctx.event.data:
        case "exit":
            sys.exit(3)
        case "interrupt":
            raise KeyboardInterrupt
        case "cancel":
            raise asyncio.CancelledError
        case "block":
            _NEVER.wait()
    return {"upper": str(ctx.event.data).upper()}


async def misbehave(ctx: Context) -> Any:
    """The async flavour: it misbehaves on the event loop itself."""
    return _misbehave(ctx)


def misbehave_in_thread(ctx: Context) -> Any:
    """The plain flavour: the runtime runs it on a handler thread."""
    return _misbehave(ctx)
