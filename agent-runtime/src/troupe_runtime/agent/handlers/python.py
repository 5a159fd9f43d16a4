"""Python handlers: ``module:function``, async or plain (a plain one runs in a thread)."""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
from typing import Any

from troupe_runtime.agent.context import Context, HandlerFn


def load_callable(entrypoint: str) -> HandlerFn:
    module_name, _, name = entrypoint.partition(":")
    target = getattr(importlib.import_module(module_name), name, None)
    if not callable(target):
        raise ValueError(f"handler.entrypoint {entrypoint!r} does not name a function")
    if inspect.iscoroutinefunction(target):
        coroutine_function: HandlerFn = target
        return coroutine_function

    @functools.wraps(target)
    async def in_thread(ctx: Context) -> Any:
        # A thread cannot be cancelled: on timeout the message is retried while
        # the thread runs on to its end.
        return await asyncio.to_thread(target, ctx)

    return in_thread
