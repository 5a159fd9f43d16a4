"""Python handlers: ``module:function``, async or plain (a plain one runs on a thread).

Plain functions run through ``HandlerThreads``: bounded capacity, and a thread
left running past its timeout is counted as stuck instead of holding a slot.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import typing
from collections.abc import Callable
from typing import Any

from troupe_runtime.agent.context import Context, HandlerFn
from troupe_runtime.agent.handlers.threads import HandlerThreads


class SyncHandler:
    """A plain handler function, called on the runtime's handler threads."""

    def __init__(self, target: Callable[[Context], Any], threads: HandlerThreads) -> None:
        self.threads = threads
        self._target = target
        functools.update_wrapper(self, target)

    async def __call__(self, ctx: Context) -> Any:
        # A thread cannot be cancelled: on timeout the message is retried while
        # the thread runs on, counted as stuck, to its end.
        return await self.threads.call(self._target, ctx)


def import_entrypoint(
    entrypoint: str, field: str, not_callable: str = "does not name a function"
) -> Callable[..., Any]:
    """The callable ``module:function`` names; ``ValueError`` naming ``field`` when it cannot
    be used (the user's module: anything its import raises means it cannot load)."""
    module_name, _, name = entrypoint.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise ValueError(
            f"{field} {entrypoint!r} cannot be imported: {type(error).__name__}: {error}"
        ) from error
    target = getattr(module, name, None)
    if not callable(target):
        raise ValueError(f"{field} {entrypoint!r} {not_callable}")
    return typing.cast(Callable[..., Any], target)


def load_callable(entrypoint: str, threads: int = 1) -> HandlerFn:
    """The function ``entrypoint`` names; a plain one gets ``threads`` threads to run on."""
    target = import_entrypoint(entrypoint, "handler.entrypoint")
    if inspect.iscoroutinefunction(target):
        coroutine_function: HandlerFn = target
        return coroutine_function
    return SyncHandler(target, HandlerThreads(threads))
