"""Plain (sync) handler functions on threads, with bounded capacity and stuck-thread accounting.

Python cannot kill a thread. A sync handler that blocks past its timeout keeps
its thread until the function returns, perhaps never. With a shared executor
those threads pile up: after a few timed-out calls every worker is taken and
good messages wait in the executor's queue until they, too, time out (and at
exit the interpreter waits for the stuck threads forever).

So each call gets a daemon thread of its own, and the threads are counted:

- at most ``capacity`` calls run at once (the Agent's ``maxInFlight``, so a
  call never waits for one);
- a call whose awaiting task is cancelled (its timeout, or shutdown) gives its
  capacity back at once; its thread is *stuck* until the function returns;
- once ``stuck_limit`` threads (4 per slot) are stuck, a new call is refused
  with ``HandlerThreadsExhausted`` (a failed attempt, retried per the retry
  policy), and ``wedged()`` is true: only a restart reclaims the threads, so
  the runtime should stop reporting live.

Daemon threads do not hold up the process's exit. ``stuck`` is exported as the
``troupe_handler_stuck_threads`` gauge.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

STUCK_THREADS_PER_SLOT = 4
"""How many timed-out calls each ``maxInFlight`` slot may leave running."""


class HandlerThreadsExhausted(Exception):
    """Every thread the runtime may spend on sync handler calls is stuck."""


class HandlerThreads:
    """Runs blocking functions on daemon threads; see the module docstring for the limits."""

    def __init__(self, capacity: int, stuck_limit: int | None = None) -> None:
        if capacity < 1:
            raise ValueError("HandlerThreads capacity must be at least 1")
        self.capacity = capacity
        self.stuck_limit = capacity * STUCK_THREADS_PER_SLOT if stuck_limit is None else stuck_limit
        self._slots = asyncio.Semaphore(capacity)
        self._lock = threading.Lock()
        self._running = 0
        self._stuck = 0

    @property
    def running(self) -> int:
        """Calls whose caller still waits for them."""
        return self._running

    @property
    def stuck(self) -> int:
        """Threads still running a call whose caller gave up on it."""
        return self._stuck

    def wedged(self) -> bool:
        """True when no thread may be started: only a restart frees the stuck ones."""
        return self._stuck >= self.stuck_limit

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on a thread of its own, in a copy of the caller's context.

        Whatever the function raises, ``SystemExit`` included, is raised here.
        """
        if self.wedged():
            raise HandlerThreadsExhausted(
                f"{self._stuck} sync handler threads are still running after their timeout "
                f"(the limit is {self.stuck_limit}); the handler blocks without returning: "
                "fix it or give it a timeout of its own, and restart the pod to reclaim them"
            )
        async with self._slots:
            return await self._run(fn, *args)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        call = _Call()
        context = contextvars.copy_context()

        def run() -> None:
            try:
                result = context.run(fn, *args)
            except BaseException as error:  # a thread must hand on even SystemExit
                _resolve(loop, future, None, error)
            else:
                _resolve(loop, future, result, None)
            finally:
                self._ended(call)

        with self._lock:
            self._running += 1
        name = f"handler-{getattr(fn, '__name__', 'call')}"
        threading.Thread(target=run, name=name, daemon=True).start()
        try:
            return await future
        finally:
            # A future with its outcome means the function has returned: not stuck.
            self._given_up_unless_done(call, answered=future.done() and not future.cancelled())

    def _given_up_unless_done(self, call: _Call, *, answered: bool) -> None:
        """The caller is done waiting; a thread still running from here on is stuck."""
        with self._lock:
            self._running -= 1
            if not call.finished and not answered:
                call.abandoned = True
                self._stuck += 1

    def _ended(self, call: _Call) -> None:
        with self._lock:
            call.finished = True
            if call.abandoned:
                self._stuck -= 1


@dataclass
class _Call:
    """One call's two facts, changed under ``HandlerThreads._lock``."""

    finished: bool = False
    abandoned: bool = False


def _resolve(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    result: Any,
    error: BaseException | None,
) -> None:
    """Settle ``future`` from the thread; a loop already closed no longer cares."""

    def settle() -> None:
        if future.done():
            return  # the caller gave up (timeout, shutdown)
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        return
